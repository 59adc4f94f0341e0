"""The public Python API: compile, prune, inspect, verify, profile, predict, demo, sweep. The CLI only calls these.

A façade: each function validates what it is given and hands the work to the package that does it
(the compile driver in :mod:`prune2deploy.driver`, analysis, verification, profiling). Options are
:class:`CompileOptions` (the same keys as config files and CLI flags).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.driver.compile import CompileResult, compile_model
from prune2deploy.driver.source import Progress, Source, load_source
from prune2deploy.errors import BadInputError, OutputExistsError
from prune2deploy.profiling.summary import pruning_notes, quality_line, quality_warning
from prune2deploy.spec import CORE_OPTIONS, CompileOptions, load_config, with_passes
from prune2deploy.verify import verdict_line, verification_notes

__all__ = [
    "CORE_OPTIONS",
    "CompileOptions",
    "CompileResult",
    "Source",
    "compile",
    "demo",
    "engine_names",
    "generate",
    "gpu_names",
    "inspect",
    "load_config",
    "load_source",
    "pass_specs",
    "plan_options",
    "plan_passes",
    "predict",
    "predict_config",
    "profile",
    "prune",
    "pruning_notes",
    "quality_line",
    "quality_warning",
    "quiet_libraries",
    "sweep",
    "verdict_line",
    "verification_notes",
    "verify",
    "with_passes",
]

log = logging.getLogger(__name__)


def compile(
    source: Any,
    out_dir: Path | str,
    options: CompileOptions | None = None,
    *,
    progress: Progress | None = None,
    inputs: Sequence[Path | str] = (),
) -> CompileResult:
    """Compiles a pruned model into a physically smaller, verified ONNX model (and engine).

    ``source`` is an HF folder, a .gguf file, a bundled model name, an .onnx file or an nn.Module;
    ``inputs`` are further files (a config) that ``out_dir`` must not be, contain or lie inside.

    Raises:
        P2DError subclasses for bad input, existing outputs, missing engines; VerificationError (after the
        folder is written, so the user can inspect it) when an exact pipeline exceeds its tolerance.
    """
    return compile_model(source, out_dir, options, progress=progress, inputs=inputs)


#: The demo's pruning: 30% of every MLP's neurons by Minitron activation importance (see :func:`demo`).
DEMO_RATIO = 0.3
DEMO_CRITERION = "minitron"


def demo(
    model: str = "smollm2-135m",
    out_dir: Path | str = "build/demo",
    *,
    ratio: float = DEMO_RATIO,
    criterion: str = DEMO_CRITERION,
    overwrite: bool = False,
    budget_s: float = 20.0,
    progress: Progress | None = None,
) -> CompileResult:
    """Prunes ``ratio`` of every MLP's neurons of a bundled real model and compiles it: the whole tool at once.

    The neurons are chosen as the field does it, by activation importance (Minitron) on the bundled
    calibration text, not by weight magnitude: on SmolLM2-135M magnitude masks of even 10% of the MLP
    neurons raise perplexity from 54 to ~11,700, while Minitron's 30% keep 62% top-1 agreement with the dense
    model (perplexity 91; BENCHMARKS.md). The plan and masks are kept in ``OUT/inputs/`` so the folder
    reproduces itself. The output folder is checked first, so a re-run without ``overwrite`` fails at once;
    ``budget_s`` bounds the timing of reference vs compiled at batch 1, seq 128.
    """
    from prune2deploy.pruning.prune import prune_model

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} exists and is not empty; choose another --out or pass --overwrite"
        )
    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="p2d-demo-") as scratch:
        say(f"choosing {ratio:.0%} of every MLP's neurons of {model} to mask ({criterion}, bundled calibration text)")
        pruned = prune_model(model, criterion=criterion, structures={"mlp": ratio}, out_dir=Path(scratch) / "pruned")
        options = CompileOptions(
            plan=pruned.plan_path, keep_inputs=True, overwrite=overwrite, profile_batches=[1], profile_seqs=[128],
            profile_budget_s=budget_s,
        )  # fmt: skip
        return compile_model(model, out, options, progress=progress)


def quiet_libraries() -> None:
    """Silences what the libraries underneath print on their own: transformers' and huggingface_hub's
    progress bars and warnings (the tokenizer notes), the GGUF loader's tqdm bar, torch.onnx's export chatter.

    For ``--quiet``: only errors remain. Process-wide, so the CLI calls it; library users keep their settings.
    """
    import os
    import sys

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when it is imported
    if "tqdm" in sys.modules:  # already imported: its defaults were read, so switch bars off at construction
        import functools

        import tqdm

        for cls in {tqdm.tqdm, getattr(sys.modules.get("tqdm.auto"), "tqdm", tqdm.tqdm)}:
            if not getattr(cls, "_p2d_quiet", False):
                cls.__init__ = functools.partialmethod(cls.__init__, disable=True)
                cls._p2d_quiet = True
    for name in ("transformers", "huggingface_hub", "torch.onnx", "onnxscript", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" not in sys.modules:  # it reads the variables above when imported
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def generate(
    out_dir: Path | str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    engine: str = "auto",
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    chat: bool = False,
    threads: int | None = None,
):
    """Text from a compiled causal LM's ``genai/`` folder: onnxruntime-genai when installed, else the ONNX
    Runtime greedy loop on its decoder. Returns a :class:`~prune2deploy.generate.TextGeneration` (text, new
    tokens, tokens/s, engine). Sampling options (temperature 1, top-k 50, top-p 1 when not given) need
    ``do_sample``; values out of range, an empty prompt or one longer than the model's context are a
    BadInputError."""
    from prune2deploy.generate import generate_text

    return generate_text(
        out_dir, prompt, max_new_tokens=max_new_tokens, engine=engine, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, chat=chat, threads=threads,
    )  # fmt: skip


def sweep(
    spec: Any,
    out_dir: Path | str,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    cache_dir: Path | str | None = None,
    progress: Progress | None = None,
):
    """Runs a grid of prune + compile variants of one model on Ray, exporting the dense model once.

    ``spec`` is a sweep file (YAML/TOML/JSON), a mapping with the same keys, or a
    :class:`~prune2deploy.sweep.spec.SweepSpec`. Writes ``out_dir/<variant>/`` (each a compile output),
    ``out_dir/sweep.json`` and ``out_dir/sweep.html``; re-running resumes (finished variants are skipped).
    ``address`` joins a Ray cluster (None: a local one, or the cluster this process already initialised).

    Raises:
        ConfigError for an invalid sweep file or variant (before anything is loaded); P2DError when Ray is
        not installed. A failing variant does not raise: it is recorded with its error.
    """
    from prune2deploy.sweep.run import run_sweep
    from prune2deploy.sweep.spec import load_sweep, parse_sweep

    where = str(spec) if isinstance(spec, (str, Path)) else "sweep"
    if isinstance(spec, (str, Path)):
        spec = load_sweep(spec)
    elif isinstance(spec, dict):
        spec = parse_sweep(spec)
    return run_sweep(
        spec, out_dir, address=address, max_parallel=max_parallel, cache_dir=cache_dir, progress=progress, where=where
    )


def pass_specs() -> dict[str, Any]:
    """Every registered pass (name → spec: options, flags, exactness), in pipeline order."""
    from prune2deploy.passes.registry import load_passes

    return load_passes()


def engine_names() -> tuple[str, ...]:
    """Every registered engine."""
    from prune2deploy.engines.registry import engine_names as names

    return names()


def gpu_names() -> list[str]:
    """The target GPUs of the catalog, ``key (aliases)`` each."""
    from prune2deploy.profiling.roofline import gpu_names as names
    from prune2deploy.profiling.roofline import load_catalog

    return names(load_catalog())


def verify(
    model: Path | str,
    reference: Path | str,
    *,
    feeds: list[Path] | None = None,
    tolerance: float = 1e-4,
):
    """Compares a compiled ONNX with its reference on ONNX Runtime CPU (random feeds + the user's).

    The user's feeds are checked against the reference as compile checks them (names, dtypes, token ids within
    their table, lengths within the reference's sequence bound) before either model runs.
    """
    from prune2deploy.analysis.shapes import sequence_limit
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.verify import load_user_feeds, verify_models

    reference_model = load_onnx(Path(reference))
    compiled = load_onnx(Path(model))
    user_feeds = load_user_feeds(reference_model, feeds or [], sequence_limit(reference_model)) if feeds else []
    return verify_models(
        reference_model, compiled, exact=True, tolerance=tolerance, user_feeds=user_feeds, compiled_is_input=True
    )


def prune(source: Any, out_dir: Path | str, **kwargs: Any):
    """Scores a dense model and writes ``masks.safetensors`` + ``plan.yaml`` (see pruning.prune_model).

    The result's ``summary["structures"]`` says, per pruned structure, the fraction asked to remove and what
    was removed in whole units (25% of 9 heads removes 2, not 2.25), with the kept widths per layer.
    """
    import dataclasses

    from prune2deploy.pruning.prune import prune_model

    result = prune_model(source, out_dir=out_dir, **kwargs)
    return dataclasses.replace(result, summary={**result.summary, "structures": _removed(result.plan)})


def _removed(plan: Any) -> dict[str, dict[str, Any]]:
    """Structure → ``asked`` (fraction to remove), ``removed`` (fraction removed), and for widths ``kept`` /
    ``width`` per layer (one entry for the hidden width and the layer count)."""
    rows: dict[str, dict[str, Any]] = {}
    for key in ("mlp", "heads", "kv_heads"):
        chosen = [getattr(layer, key) for layer in plan.layers if getattr(layer, key) is not None]
        kept, width = [len(s.kept) for s in chosen], [s.width for s in chosen]
        if chosen and (key in plan.ratios or kept != width):
            rows[key] = {
                "asked": plan.ratios.get(key),
                "removed": 1 - sum(kept) / sum(width),
                "kept": kept,
                "width": width,
            }
    if plan.hidden is not None:
        kept, width = len(plan.hidden.kept), plan.hidden.width
        rows["hidden"] = {
            "asked": plan.ratios.get("hidden"),
            "removed": 1 - kept / width,
            "kept": [kept],
            "width": [width],
        }
    layers = plan.model.get("num_layers")
    if "layers" in plan.ratios and layers:
        kept = layers - len(plan.dropped_layers)
        rows["layers"] = {
            "asked": plan.ratios["layers"],
            "removed": 1 - kept / layers,
            "kept": [kept],
            "width": [layers],
        }
    if plan.sparsity:
        rows[plan.sparsity["kind"]] = {"asked": plan.sparsity["ratio"], "removed": plan.sparsity["achieved"]}
    return rows


#: N:M patterns whose masks sparse tensor cores run (at most 2 of every 4 weights kept).
def _sparse_core_pattern(nm: tuple[int, int] | None) -> bool:
    return nm is not None and nm[1] == 4 and nm[0] <= 2


def plan_passes(plan: Any) -> list[str]:
    """The passes a compile of ``plan`` (a :class:`~prune2deploy.pruning.plan.Plan`) asks for besides the
    default pipeline: for masks in a sparse-tensor-core pattern (2:4, 1:4), the pass that lays weights out
    for sparse tensor cores (the registry's ``sparse_weights`` kind)."""
    if not _sparse_core_pattern(tuple(plan.nm) if plan.nm else None):
        return []
    return [name for name, spec in pass_specs().items() if spec.sparse_weights]


def plan_options(result: Any, **changes: Any) -> CompileOptions:
    """The compile options for a prune result (``plan`` and the passes it needs, :func:`plan_passes`), with
    ``changes`` (``overwrite``, ``profile`` …) applied."""
    data = with_passes({"plan": result.plan_path, **changes}, plan_passes(result.plan))
    return CompileOptions.from_dict(data, source="prune plan")


def inspect(model: Path | str | ir.Model) -> dict[str, Any]:
    """Coupled channel groups of an ONNX model: tensors, width, zero channels, prunable or why not; layers and
    attention heads in numeric layer order; for a graph fused for ONNX Runtime, ``fused`` names the fused ops
    and the counts they hide are marked (see :mod:`prune2deploy.analysis.inspect`)."""
    from prune2deploy.analysis.inspect import inspect_model
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.passes.sparsify_nm import SparsifyNMPass

    ir_model = model if isinstance(model, ir.Model) else load_onnx(Path(model))
    record = SparsifyNMPass(mode="check", compute_cost=True)(ir_model).record  # check mode reads, never writes
    sparsity = {k: v for k, v in record.items() if k != "weights"}
    keys = ("node", "initializer", "op", "shape", "eligible", "reason", "already_nm")
    sparsity["weights"] = [{k: w[k] for k in keys} for w in record["weights"]]
    name = str(model) if not isinstance(model, ir.Model) else "<in-memory>"
    return inspect_model(ir_model, name=name, sparsity_2_4=sparsity)


def profile(
    model: Path | str,
    *,
    against: Path | str | None = None,
    batches: list[int] = (1,),
    seqs: list[int] | None = None,
    threads: int | None = None,
    budget_s: float = 10.0,
    ops: bool = False,
    memory_limit_gib: float | None = None,
) -> list[dict]:
    """Measures latency on ONNX Runtime CPU, side by side with ``against`` in the same run.

    With ``ops``, also ONNX Runtime's per-op-type and slowest-node breakdown at the first grid point.
    ``seqs`` default to 128, lowered to the model's sequence bound (position table); given lengths beyond
    it are an error.
    """
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.limits import THREADS_PER_CORE, max_threads
    from prune2deploy.profiling.measure import compare_models
    from prune2deploy.profiling.memory_estimate import check_profile_memory

    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= max_threads()
    ):
        raise BadInputError(
            f"threads must be a whole number from 1 to {max_threads()} ({THREADS_PER_CORE} per core here), "
            f"not {threads!r}"
        )
    models = {"compiled": Path(model)}
    if against is not None:
        models = {"reference": Path(against), **models}
    loaded = {name: load_onnx(path) for name, path in models.items()}  # each checked and read once
    seqs = _fit_seqs(Path(model), seqs, 128, model=loaded["compiled"])  # the default lengths when none given
    for ir_model in loaded.values():
        check_profile_memory(ir_model, list(batches), list(seqs), memory_limit_gib)
    grid = [(b, s) for b in batches for s in seqs]
    rows = compare_models(
        models, grid, threads=threads, reference="reference" if against else None, budget_s=budget_s, min_runs=5
    )
    if ops:
        from prune2deploy.feeds import random_feeds
        from prune2deploy.profiling.ort_ops import ort_op_breakdown

        for name, path in models.items():
            feeds = random_feeds(loaded[name], batch=grid[0][0], seq=grid[0][1])
            rows.append({"kind": "ops", "model": name, **ort_op_breakdown(path, feeds, threads=threads)})
    return rows


def _fit_seqs(path: Path, seqs: list[int] | None, default: int, *, model=None) -> list[int]:
    """Sequence lengths to probe: the default lowered to the model's bound, given ones checked against it."""
    from prune2deploy.analysis.shapes import fit_seqs, sequence_limit
    from prune2deploy.frontends.onnx import load_onnx

    limit = sequence_limit(model if model is not None else load_onnx(path))
    return fit_seqs(limit, list(seqs) if seqs else [default], explicit=bool(seqs))


def _is_config(path: Path) -> bool:
    return path.suffix == ".json" or (path.is_dir() and (path / "config.json").is_file())


def predict(
    model: Path | str,
    *,
    against: Path | str | None = None,
    gpus: list[str] | None = None,
    precision: str = "fp16",
    batch: int = 1,
    seq: int | None = None,
    engine: str = "tensorrt",
    decode: bool = False,
    past: int = 0,
    plan: Path | str | None = None,
) -> list[dict]:
    """Latency per target GPU from the engine-aware cost model, one row per GPU in the schema of
    :mod:`prune2deploy.profiling.prediction` (the compile report's rows for the same models, engine and shape).

    ``model`` is an ONNX file (priced from its graph; with ``against``, side by side with the reference, both at
    the same fusion level), or an HF ``config.json`` / a folder holding one (shape-only: :func:`predict_config`).
    """
    from prune2deploy.profiling.roofline import load_catalog, resolve_gpus

    resolve_gpus(gpus, load_catalog())  # a wrong name fails before anything is loaded
    path = Path(model)
    if not path.exists():
        raise BadInputError(f"{path}: no such ONNX file, config.json or model folder")
    if _is_config(path):
        return predict_config(
            path, gpus=gpus, precision=precision, batch=batch, seq=seq, engine=engine, decode=decode, past=past,
            plan=plan,
        )  # fmt: skip
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.profiling.prediction import compare_models

    compiled = load_onnx(path)
    reference = load_onnx(Path(against)) if against is not None else None
    seq = _fit_seqs(path, None if seq is None else [seq], 128, model=compiled)[0]
    return compare_models(reference, compiled, batch=batch, seq=seq, gpus=gpus, precision=precision, engine=engine)


def predict_config(
    config: Path | str | dict,
    *,
    gpus: list[str] | None = None,
    precision: str = "fp16",
    batch: int = 1,
    seq: int | None = None,
    engine: str = "tensorrt",
    decode: bool = False,
    past: int = 0,
    plan: Path | str | Any | None = None,
) -> list[dict]:
    """Shape-only prediction from an HF config (no weights, no export): a prefill of ``seq`` tokens (default 128, or
    the model's positions when fewer), or one
    decode step after ``past`` tokens, per catalog GPU; for decoders also tokens/s and the batch at which the
    decode step turns compute-bound. ``plan`` (a plan YAML or :class:`~prune2deploy.pruning.plan.Plan`)
    narrows the widths per layer. Rows: :mod:`prune2deploy.profiling.prediction`'s schema, ``source=config``."""
    from prune2deploy.profiling.shape_only import config_rows

    if isinstance(plan, (str, Path)):
        from prune2deploy.pruning.plan import load_plan

        plan = load_plan(plan)
    return config_rows(
        config, plan=plan, gpus=gpus, precision=precision, batch=batch, seq=seq, engine=engine, decode=decode,
        past=past,
    )  # fmt: skip
