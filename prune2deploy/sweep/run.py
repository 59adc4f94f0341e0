"""Running a sweep on Ray: one dense export, masks scored in the driver, one Ray task per variant.

The driver (this process) validates every variant, exports the dense model once (or finds it in the export
cache), loads the torch model once to score each variant's masks (``prune_model`` on the loaded module:
scoring is milliseconds for magnitude and seconds for calibration criteria, while a load per task would cost
every variant the checkpoint load again), and submits each variant as a Ray task that compiles the cached
dense ONNX with those masks (:func:`prune2deploy.sweep.task.run_variant`). Variants with the same prune
options (a ``gpu`` or ``engine`` grid) share one scoring; scoring the next variant overlaps the compile of
the previous one.

Where tasks run is Ray's business, told by resources:

- a variant whose engine runs on a GPU (``tensorrt``, ``torch`` on CUDA, ``tensorrt-rtx`` with a ``gpu``
  target) asks for ``num_gpus=1`` and, when it names a GPU, that GPU's Ray ``accelerator_type`` (``L4``,
  ``A100``, ``H100`` …), so it lands on a matching worker; a type no node has is recorded as that variant's
  error instead of waiting forever;
- a variant measured on CPU asks for one unit of ``p2d_cpu_profiler`` where the cluster's nodes advertise
  it (one per machine: ``ray start --resources='{"p2d_cpu_profiler": 1}'``; the local cluster the sweep
  starts has it), otherwise for every CPU of the smallest node: either way one CPU measurement per machine
  at a time, so timings do not share cores. With ``profile: false`` CPU variants take one CPU each.

Variants are independent: a failure (in scoring, in the task, or a worker lost) is that variant's ``error``
and the others go on. ``sweep.json`` is rewritten after every variant, so an interrupted sweep resumes: a
variant whose options hash has a finished, error-free entry is skipped, its numbers read again from its own
report.json (:mod:`prune2deploy.sweep.resume`). Variants are submitted in a bounded window
(:func:`submit_window`), never all at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune2deploy.errors import ConfigError, P2DError
from prune2deploy.io import check_not_input
from prune2deploy.sweep.cache import default_cache_dir, dense_export, export_key
from prune2deploy.sweep.report import write_sweep
from prune2deploy.sweep.resume import previous_entries, resumed_entry, write_quality
from prune2deploy.sweep.spec import SweepSpec, Variant, expand, iter_variants
from prune2deploy.sweep.task import quality_input, run_variant

__all__ = [
    "MAX_IN_FLIGHT",
    "PROFILER_RESOURCE",
    "SweepResult",
    "accelerator_type",
    "mask_folder",
    "run_sweep",
    "submit_window",
    "task_resources",
]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: A custom Ray resource, one unit per machine, that serialises CPU measurements on that machine.
PROFILER_RESOURCE = "p2d_cpu_profiler"
PRUNE_DIR = "prune"
#: Variants submitted to Ray and not yet collected, at most (unless --max-parallel says otherwise).
MAX_IN_FLIGHT = 64

#: Catalog GPU (profiling/gpus.toml) → the accelerator_type Ray detects on such a worker (Ray's own names:
#: the model token of the NVIDIA device name, e.g. "NVIDIA A100-SXM4-80GB" → "A100").
_RAY_ACCELERATORS = {
    "h100": "H100",
    "h200": "H200",
    "a100": "A100",
    "l40s": "L40S",
    "l4": "L4",
    "a10": "A10",
    "a10g": "A10G",
    "a30": "A30",
    "t4": "T4",
    "v100": "V100",
    "rtx-4090": "GeForce-RTX-4090",
}

_INSTALL = 'prune2deploy sweep runs its variants on Ray: pip install -e ".[ray]" (or pip install "ray>=2.40")'


@dataclass
class SweepResult:
    out_dir: Path
    record: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def accelerator_type(gpu: str | None) -> str | None:
    """The Ray accelerator type of a catalog GPU name (``a100-sxm-80gb`` → ``A100``); None when unknown."""
    if not gpu:
        return None
    key = gpu.lower()
    if key in _RAY_ACCELERATORS:
        return _RAY_ACCELERATORS[key]
    head = key.split("-")[0]
    return _RAY_ACCELERATORS.get(head)


def _runs_on_gpu(compile_options: dict[str, Any]) -> bool:
    engine = compile_options.get("engine", "onnxruntime")
    device = str(compile_options.get("engine_options", {}).get("device", ""))
    if engine == "tensorrt":
        return True
    if engine == "torch":
        return device.startswith("cuda")
    return engine == "tensorrt-rtx" and bool(compile_options.get("gpus"))


def task_resources(compile_options: dict[str, Any], cluster: dict[str, float], node_cpus: list[float]) -> dict:
    """Ray task options for a variant (see the module docstring); ``cluster`` is ``ray.cluster_resources()``.

    Raises:
        ConfigError: the variant needs a GPU (type) that no node of the cluster has.
    """
    if _runs_on_gpu(compile_options):
        gpus = compile_options.get("gpus") or []
        wanted = accelerator_type(gpus[0]) if gpus else None
        if cluster.get("GPU", 0) < 1:
            raise ConfigError(
                f"engine {compile_options.get('engine')} needs a GPU worker and the Ray cluster has none; "
                "join a cluster with GPU nodes (--address) or use a CPU engine"
            )
        options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1}
        if wanted:
            if f"accelerator_type:{wanted}" not in cluster:
                have = sorted(k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:"))
                raise ConfigError(
                    f"gpu {gpus[0]} needs a Ray worker with accelerator_type {wanted}; the cluster has "
                    f"{', '.join(have) or 'no typed GPUs'}"
                )
            options["accelerator_type"] = wanted
        return options
    if not compile_options.get("profile", True):
        return {"num_cpus": 1}
    if cluster.get(PROFILER_RESOURCE, 0) >= 1:
        return {"num_cpus": 1, "resources": {PROFILER_RESOURCE: 1}}
    return {"num_cpus": max(1, int(min(node_cpus or [1])))}


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise P2DError(_INSTALL) from exc
    return ray


def _executor(ray, address: str | None) -> dict[str, Any]:
    workers = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        workers.append(
            {
                "node_id": node["NodeID"],
                "host": node.get("NodeManagerHostname") or node.get("NodeManagerAddress"),
                "cpus": resources.get("CPU", 0),
                "gpus": resources.get("GPU", 0),
                "accelerators": sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")),
                "cpu_profiler": resources.get(PROFILER_RESOURCE, 0) >= 1,
            }
        )
    context = ray.get_runtime_context()
    return {
        "name": "ray",
        "version": ray.__version__,
        "address": address or getattr(context, "gcs_address", None) or "local",
        "workers": workers,
    }


def submit_window(max_parallel: int | None, cluster: dict[str, float]) -> int:
    """How many variants may be submitted and not yet collected.

    Ray runs only what its resources allow; everything submitted beyond that waits in its queue, with its
    scored masks on disk and its arguments in the object store. So the driver submits in a window: two
    tasks per CPU of the cluster (one running, the next scored and waiting), at most :data:`MAX_IN_FLIGHT`;
    ``--max-parallel`` sets it exactly.
    """
    if max_parallel is not None:
        return max_parallel
    return max(2, min(MAX_IN_FLIGHT, 2 * int(cluster.get("CPU", 1))))


class _Model:
    """The torch model, loaded once and only if some variant needs scoring or the export is not cached."""

    def __init__(self, model: str, say: Progress) -> None:
        self.model, self.say, self._loaded, self.load_s = model, say, None, 0.0

    def __call__(self):
        if self._loaded is None:
            from prune2deploy.frontends.hf import load_hf_model

            self.say(f"loading {self.model} (once for the sweep)")
            start = time.perf_counter()
            self._loaded = load_hf_model(self.model)
            self.load_s = time.perf_counter() - start
        return self._loaded


def mask_folder(variant: Variant, root: Path, source_key: str) -> Path:
    """Where a variant's masks + plan go: one folder per distinct prune options (and checkpoint), so
    variants that differ only in compile options (gpu, engine, regroup_gqa …) share one scoring."""
    import hashlib

    text = json.dumps({"source": source_key, "prune": variant.prune.model_dump(mode="json")}, sort_keys=True)
    return root / f"{variant.prune.criterion}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _score(variant: Variant, model: _Model, folder: Path) -> Path | None:
    """The variant's plan: scored by ``prune_model`` on the once-loaded model, or reused when a variant
    with the same prune options already wrote it (None for a variant that prunes nothing)."""
    from prune2deploy.pruning.prune import PLAN_FILE, prune_model

    p = variant.prune
    if not p.prunes():
        return None
    if (folder / PLAN_FILE).is_file():
        return (folder / PLAN_FILE).resolve()
    loaded = model()
    model.say(f"scoring {p.criterion} {p.structures()}{f' nm={p.nm}' if p.nm else ''}")
    result = prune_model(
        loaded,
        criterion=p.criterion,
        structures=p.structures(),
        per_layer=p.per_layer,
        **({} if p.per_layer else {"global_scale": p.global_scale, "min_keep": p.min_keep}),
        round_to=p.round_to,
        nm=p.nm,
        calibration=p.calibration,
        num_samples=p.samples,
        seq_len=p.seq_len,
        batch_size=p.batch_size,
        head_grouping=p.head_grouping,
        out_dir=folder,
        overwrite=True,
    )
    return result.plan_path.resolve()


def _entry(variant: Variant, **fields: Any) -> dict[str, Any]:
    base = {
        "id": variant.id,
        "hash": variant.hash,
        "options": variant.options(),
        "out": variant.id,
        "error": None,
    }
    return {**base, **fields}


def run_sweep(
    spec: SweepSpec,
    out_dir: Path | str,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    cache_dir: Path | str | None = None,
    progress: Progress | None = None,
    where: str = "sweep",
) -> SweepResult:
    """Runs every variant of ``spec`` on Ray and writes ``sweep.json`` + ``sweep.html`` into ``out_dir``.

    Args:
        spec: the validated sweep file.
        out_dir: each variant's compile output goes to ``out_dir/<variant id>/``; masks and plans to
            ``out_dir/prune/<variant id>/``.
        address: a Ray cluster to join (``ray start --head`` prints it); None starts a local cluster, unless
            this process already called ``ray.init`` (then that cluster is used as it is).
        max_parallel: at most this many variants in flight (Ray's resources bound it too).
        cache_dir: the dense-export cache (default ``.p2d-cache`` or ``$P2D_CACHE_DIR``).

    Raises:
        ConfigError: an invalid variant (before anything is loaded); P2DError: Ray is not installed.
    """
    ray = _import_ray()
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir).resolve()
    cache = Path(cache_dir or default_cache_dir()).resolve()
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}")
    fixed = next(iter_variants(spec, where=where)).compile_options()  # export options: the same for every variant
    key = export_key(spec.model, export_batch=fixed.export_batch, export_seq=fixed.export_seq)
    variants = expand(spec, source_key=key, where=where)
    inputs = [Path(i) for i in (spec.model, where, spec.prune.get("calibration")) if i and Path(i).exists()]
    check_not_input(out_dir, inputs)  # the guard of every command that writes
    check_not_input(cache / "exports", inputs, flag="the export cache")  # where dense_export writes
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = previous_entries(out_dir)
    started_ray = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs["resources"] = {PROFILER_RESOURCE: 1}
        say(f"starting Ray ({'joining ' + address if address else 'local cluster'})")
        ray.init(address=address, **kwargs)
        started_ray = True
    try:
        run = _SweepRun(ray, spec, variants, out_dir, key=key, address=address, say=say)
        return run.run(previous, cache=cache, fixed=fixed, max_parallel=max_parallel)
    finally:
        if started_ray:
            ray.shutdown()


class _SweepRun:
    """One sweep's driver loop: resume what finished, export once, score and submit, collect as tasks end.

    ``sweep.json`` is rewritten after every finished variant (:meth:`finish`), so that an interrupted sweep
    loses at most the variants in flight.
    """

    def __init__(self, ray, spec: SweepSpec, variants: list[Variant], out_dir: Path, *, key, address, say) -> None:
        from prune2deploy.sweep.tracking import MLflowHook

        self.start = time.perf_counter()
        self.ray = ray
        self.spec = spec
        self.variants = variants
        self.out_dir = out_dir
        self.key = key
        self.say = say
        self.executor = _executor(ray, address)
        self.cluster = ray.cluster_resources()
        self.node_cpus = [w["cpus"] for w in self.executor["workers"] if w["cpus"]]
        self.result = SweepResult(out_dir, {})
        self.entries: dict[str, dict[str, Any]] = {}
        self.model = _Model(spec.model, say)
        self.export: dict[str, Any] = {"key": key, "onnx": None, "exported": False, "seconds": 0.0}
        self.exports = 0
        self.hook = MLflowHook.from_env(spec.name or "prune2deploy-sweep")
        self.quality = None  # the quality inputs, put into Ray's object store once for every task
        self.in_flight: dict[Any, tuple[Variant, float]] = {}

    def run(self, previous: dict[str, dict[str, Any]], *, cache: Path, fixed, max_parallel: int | None) -> SweepResult:
        todo = self.resume(previous)
        if todo:
            dense = self.export_dense(cache, fixed)
            remote = self.ray.remote(run_variant)
            limit = submit_window(max_parallel, self.cluster)
            for variant in todo:
                while len(self.in_flight) >= limit:
                    self.collect(block=True)
                self.collect(block=False)
                self.submit(variant, remote, dense)
            while self.in_flight:
                self.collect(block=True)
        self.save()
        return self.result

    def resume(self, previous: dict[str, dict[str, Any]]) -> list[Variant]:
        """Rebuilds the entries of variants that already finished from their own files; returns the rest."""
        todo: list[Variant] = []
        for variant in self.variants:
            entry = resumed_entry(variant, previous.get(variant.id), self.out_dir)
            if entry is not None:
                self.entries[variant.id] = entry
                self.result.skipped.append(variant.id)
            else:
                todo.append(variant)
        if self.result.skipped:
            self.say(f"resuming: {len(self.result.skipped)} of {len(self.variants)} variants already finished")
        return todo

    def export_dense(self, cache: Path, fixed) -> Path:
        """The dense ONNX every variant compiles from: exported once, or found in the export cache."""
        cached = dense_export(
            self.spec.model,
            self.model,
            key=self.key,
            cache_dir=cache,
            export_batch=fixed.export_batch,
            export_seq=fixed.export_seq,
        )
        self.export.update(onnx=str(cached.onnx), exported=cached.exported, seconds=round(cached.seconds, 3))
        self.exports = int(cached.exported)
        self.say(f"dense export {'done' if cached.exported else 'from the cache'}: {cached.onnx}")
        return cached.onnx

    def submit(self, variant: Variant, remote, dense: Path) -> None:
        """Scores the variant's masks here and submits its compile as a Ray task with its resources.

        A failure to score or place the variant is that variant's error; the sweep goes on.
        """
        t0 = time.perf_counter()
        try:
            compile_data = {"keep_reference": False, **variant.compile}
            resources = task_resources(variant.compile_options().to_dict(), self.cluster, self.node_cpus)
            plan = _score(variant, self.model, mask_folder(variant, self.out_dir / PRUNE_DIR, self.key))
            if self.quality is None:
                loaded = self.model()
                vocab = getattr(getattr(loaded.module, "config", None), "vocab_size", None)
                inputs = quality_input(loaded.task, loaded.tokenizer, vocab, self.spec.quality.model_dump())
                self.quality = self.ray.put(inputs)
        except Exception as exc:  # scoring or placement failed for this variant only
            log.info("variant %s not submitted", variant.id, exc_info=True)
            self.finish(variant, {"error": f"{type(exc).__name__}: {exc}", "timings": {}})
            return
        prune_s = time.perf_counter() - t0
        job = {
            "id": variant.id,
            "dense": str(dense),
            "out": str(self.out_dir / variant.id),
            "plan": str(plan) if plan else None,
            "compile": compile_data,
        }
        self.say(f"submitting {variant.id} ({', '.join(f'{k}={v}' for k, v in resources.items())})")
        ref = remote.options(max_retries=0, **resources).remote(job, self.quality)
        self.in_flight[ref] = (variant, prune_s)

    def collect(self, block: bool) -> None:
        """Records one finished task (waiting for one when ``block``); a lost worker is its variant's error."""
        if not self.in_flight:
            return
        done, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=None if block else 0)
        for ref in done:
            variant, prune_s = self.in_flight.pop(ref)
            try:
                entry = self.ray.get(ref)
            except Exception as exc:  # the worker died (OOM, node lost): record, go on
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            entry.setdefault("timings", {})["prune_s"] = prune_s
            self.finish(variant, entry)

    def finish(self, variant: Variant, entry: dict[str, Any]) -> None:
        """Records a variant's entry (and its MLflow run) and rewrites ``sweep.json``."""
        entry = _entry(variant, **{k: v for k, v in entry.items() if k != "id"})
        entry["resumed"] = False
        if entry["error"] is None:  # what a resume reads back, with the variant's report.json
            write_quality(self.out_dir, variant, entry.get("quality"))
        if self.hook is not None:
            entry["mlflow_run_id"] = self.hook.log_variant(entry, self.out_dir)
        self.entries[variant.id] = entry
        (self.result.failed if entry["error"] else self.result.ran).append(variant.id)
        status = f"failed: {entry['error'][:200]}" if entry["error"] else "done"
        self.say(f"variant {variant.id}: {status}")
        self.save()

    def save(self) -> None:
        """Writes ``sweep.json`` and ``sweep.html`` with every entry so far, in the sweep file's order."""
        ordered = [self.entries[v.id] for v in self.variants if v.id in self.entries]
        self.result.record = write_sweep(
            self.out_dir,
            spec=self.spec,
            executor=self.executor,
            exports=self.exports,
            export=self.export,
            variants=ordered,
            timings={"total_s": time.perf_counter() - self.start, "model_load_s": self.model.load_s},
        )
