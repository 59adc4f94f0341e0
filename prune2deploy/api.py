"""The public Python API: compile, inspect, profile, predict. The CLI only calls these.

``compile`` is the main job: source (HF folder, GGUF, bundled model name, nn.Module or .onnx) + masks →
masked reference → passes → verification → engine → profile → report. The output folder is built in a
temp folder beside the target and renamed into place at the end, so it is complete or absent.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from prune2deploy import __version__
from prune2deploy.errors import BadInputError, OutputExistsError, P2DError, VerificationError
from prune2deploy.io import atomic_write_json, sha256_file
from prune2deploy.spec import CompileOptions

__all__ = ["CompileResult", "compile", "inspect", "load_source", "predict", "profile", "prune"]

log = logging.getLogger(__name__)

_LIBRARIES = ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch", "transformers", "safetensors", "numpy")

Progress = Callable[[str], None]


@dataclass
class Source:
    """A loaded input: the masked reference graph plus where it came from."""

    model: ir.Model
    kind: str  # "hf" | "onnx" | "torch"
    path: Path | None
    task: str | None = None
    masks_applied: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report.get("verification", {}).get("passed", True))


def _versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def load_source(source: Any, options: CompileOptions, *, progress: Progress | None = None) -> Source:
    """Turns any supported input into a masked reference ONNX model (in memory)."""
    from prune2deploy.frontends import hf, masks
    from prune2deploy.frontends import torch as torch_frontend
    from prune2deploy.frontends.onnx import load_onnx

    say = progress or (lambda _msg: None)
    mask_tensors = masks.load_masks(options.masks) if options.masks else None
    mask_source = str(options.masks) if options.masks else ""
    if not isinstance(source, (str, Path)):  # an nn.Module (Python API)
        module = source
        if mask_tensors:
            module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
        spec = options_export_spec(module, options)
        say("exporting module to ONNX")
        model = torch_frontend.export_module(module, spec)
        return Source(
            model, "torch", None, masks_applied=len(mask_tensors or {}), extra={"module": type(module).__name__}
        )
    text = str(source)
    path = Path(text)
    if path.suffix == ".onnx" or (path.is_file() and path.suffix != ".gguf"):
        say(f"loading {path}")
        model = load_onnx(path)
        applied = masks.apply_masks_onnx(model, mask_tensors, source=mask_source) if mask_tensors else 0
        return Source(model, "onnx", path, masks_applied=applied)
    if text in hf.BUNDLED_MODELS or hf.is_hf_folder(path) or path.suffix == ".gguf":
        say(f"loading {text}")
        loaded = hf.load_hf_model(text if text in hf.BUNDLED_MODELS else path)
        module = loaded.module
        if mask_tensors:
            module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
        module.config.use_cache = False
        vocab = getattr(module.config, "vocab_size", 100)
        spec = torch_frontend.hf_export_spec(
            loaded.task, batch=options.export_batch, seq=options.export_seq, vocab_size=vocab
        )
        say("exporting to ONNX (dynamo, opset 18)")
        model = torch_frontend.export_module(module, spec)
        where = text if text in hf.BUNDLED_MODELS else None
        return Source(
            model,
            "hf",
            hf.bundled_model_path(text) if where else path,
            task=loaded.task,
            masks_applied=len(mask_tensors or {}),
            extra={"bundled": where},
        )
    if not path.exists():
        raise BadInputError(f"{source}: no such file or folder (and not a bundled model name: smollm2-135m, minilm-l6)")
    raise BadInputError(f"{source}: not an .onnx file, a .gguf file or a Hugging Face model folder")


def options_export_spec(module, options: CompileOptions):
    """Export spec for a bare module: transformers models get ids + mask; others must bring their own."""
    from prune2deploy.frontends.torch import ExportSpec, hf_export_spec

    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        task = "causal-lm" if type(module).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"
        config.use_cache = False
        return hf_export_spec(task, batch=options.export_batch, seq=options.export_seq, vocab_size=config.vocab_size)
    example = getattr(module, "example_inputs", None)
    if isinstance(example, ExportSpec):
        return example
    raise BadInputError(
        f"{type(module).__name__}: not a transformers model; use compile_module(module, spec=ExportSpec(...)) "
        "or set module.example_inputs = ExportSpec(...) to say what its inputs look like"
    )


def _build_pipeline(options: CompileOptions) -> list:
    from prune2deploy.passes.remove_channels import RemoveChannelsPass

    pipeline = []
    for name in options.passes:
        if name == "remove-layers":
            from prune2deploy.passes.remove_layers import RemoveLayersPass

            pipeline.append(RemoveLayersPass(layers=options.drop_layers))
        elif name == "prune-hidden":
            from prune2deploy.passes.prune_hidden import PruneHiddenPass

            pipeline.append(PruneHiddenPass(channels=options.drop_hidden))
        elif name == "remove-heads":
            from prune2deploy.passes.remove_heads import RemoveHeadsPass

            pipeline.append(RemoveHeadsPass(min_heads=options.min_heads))
        elif name == "regroup-gqa":
            from prune2deploy.passes.regroup_gqa import RegroupGQAPass

            pipeline.append(RegroupGQAPass(options.kv_heads, grouping=options.gqa_grouping, method=options.gqa_method))
        elif name == "remove-channels":
            pipeline.append(RemoveChannelsPass(multiple_of=options.multiple_of))
        elif name == "sparsify-2:4":
            from prune2deploy.passes.sparsify_nm import SparsifyNMPass

            pipeline.append(SparsifyNMPass(n=2, m=4, mode=options.sparsity, skip=("*lm_head*",)))
        elif name == "convert-precision":
            from prune2deploy.passes.precision import ConvertPrecisionPass

            if options.precision == "fp32":
                raise P2DError("the convert-precision pass needs --precision fp16 or bf16")
            pipeline.append(ConvertPrecisionPass(options.precision))
    return pipeline


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output folder {out_dir} exists and is not empty; choose another --out or pass --overwrite"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _finish_out_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        backup.rmdir()
        out_dir.rename(backup)
        staging.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(out_dir)


def _model_summary(cost) -> dict[str, int]:
    return {"params": int(cost.params), "flops": int(cost.flops), "nodes": len(cost.nodes)}


def compile(
    source: Any,
    out_dir: Path | str,
    options: CompileOptions | None = None,
    *,
    progress: Progress | None = None,
) -> CompileResult:
    """Compiles a pruned model into a physically smaller, verified ONNX model (and engine).

    Raises:
        P2DError subclasses for bad input, existing outputs, missing engines; VerificationError (after the
        folder is written, so the user can inspect it) when an exact pipeline exceeds its tolerance.
    """
    from prune2deploy.analysis.cost import compare_layers, model_cost
    from prune2deploy.frontends.onnx import save_onnx
    from prune2deploy.verify import load_feeds, verify_models

    options = _resolve_plan((options or CompileOptions()).validate())
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    staging = _prepare_out_dir(out_dir, options.overwrite)
    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        loaded = load_source(source, options, progress=say)
        timings["load_and_export_s"] = time.perf_counter() - start
        reference_bytes = ir.to_proto(loaded.model).SerializeToString()
        reference = loaded.model
        compiled = ir.from_proto(onnx.ModelProto.FromString(reference_bytes))  # an independent copy

        t0 = time.perf_counter()
        records = []
        from prune2deploy.passes.sharing import reshare_initializers, unshare_initializers

        unshare_initializers(compiled)
        for pass_ in _build_pipeline(options):
            say(f"pass {pass_.name}")
            pass_(compiled)
            records.append(pass_.record)
        from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

        reshare_initializers(compiled)
        RemoveUnusedNodesPass()(compiled)
        RemoveUnusedOpsetsPass()(compiled)
        timings["passes_s"] = time.perf_counter() - t0
        exact = all(record.get("exact", True) for record in records)

        say("verifying against the masked reference")
        t0 = time.perf_counter()
        user_feeds = [load_feeds(path) for path in options.feeds]
        verification = verify_models(
            reference, compiled, exact=exact, tolerance=options.tolerance, user_feeds=user_feeds
        )
        timings["verify_s"] = time.perf_counter() - t0

        model_path = staging / "model.onnx"
        save_onnx(compiled, model_path)
        if options.keep_reference:
            (staging / "reference.onnx").write_bytes(reference_bytes)

        say("counting parameters and FLOPs")
        batch0, seq0 = options.profile_batches[0], options.profile_seqs[0]
        ref_cost = model_cost(reference, batch=batch0, seq=seq0)
        new_cost = model_cost(compiled, batch=batch0, seq=seq0)
        report: dict[str, Any] = {
            "schema_version": 1,
            "tool": {"name": "prune2deploy", "version": __version__, "libraries": _versions()},
            "input": _input_record(loaded),
            "options": options.to_dict(),
            "passes": records,
            "model": {
                "reference": _model_summary(ref_cost),
                "compiled": _model_summary(new_cost),
                "cost_shape": {"batch": batch0, "seq": seq0},
            },
            "per_layer": compare_layers(ref_cost, new_cost),
            "groups": _groups_summary(records),
            "verification": verification.as_dict(),
            "timings": timings,
        }
        if options.engine != "onnxruntime":
            say(f"building {options.engine} engine")
            report["engine"] = _build_engine(options, model_path, staging)
        if options.profile:
            say("profiling reference vs compiled on ONNX Runtime CPU")
            report.update(
                _profile_section(reference_bytes, model_path, options, ref_cost.flops / max(new_cost.flops, 1))
            )
        report["predictions"] = _predictions(ref_cost, new_cost, options)
        timings["total_s"] = time.perf_counter() - start

        from prune2deploy.profiling.report import write_report

        write_report(staging, report)
        _write_manifest(staging, loaded, options)
        _finish_out_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = CompileResult(out_dir, report)
    if not verification.passed:
        raise VerificationError(
            f"compiled model differs from the masked reference by {verification.worst:.3g} (relative), more than "
            f"the exact tolerance {options.tolerance:g}; see {out_dir / 'report.json'}. "
            " This is a bug: please report it."
        )
    return result


def _resolve_plan(options: CompileOptions) -> CompileOptions:
    """A plan brings its mask file (next to it), its depth plan and its hidden-channel plan."""
    if options.plan is None:
        return options
    from prune2deploy.pruning.plan import load_plan

    plan = load_plan(options.plan)
    if options.masks is None and plan.masks and plan.masks.get("file"):
        options.masks = options.plan.parent / plan.masks["file"]
    if plan.dropped_layers:
        options.drop_layers = list(plan.dropped_layers)
        options.passes = [*options.passes, "remove-layers"]
    if plan.hidden is not None and list(plan.hidden.removed):
        options.drop_hidden = [int(c) for c in plan.hidden.removed]
        options.passes = [*options.passes, "prune-hidden"]
    return options.validate()


def prune(source: Any, out_dir: Path | str, **kwargs: Any):
    """Scores a dense model and writes ``masks.safetensors`` + ``plan.yaml`` (see pruning.prune_model)."""
    from prune2deploy.pruning.prune import prune_model

    return prune_model(source, out_dir=out_dir, **kwargs)


def _input_record(loaded: Source) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": loaded.kind,
        "path": str(loaded.path) if loaded.path else f"<nn.Module {loaded.extra.get('module')}>",
        "masks_applied": loaded.masks_applied,
    }
    if loaded.path is not None and loaded.path.exists():
        record["sha256"] = sha256_file(loaded.path)
    if loaded.extra.get("bundled"):
        record["bundled"] = loaded.extra["bundled"]
    return record


def _groups_summary(records: list[dict]) -> dict[str, Any]:
    for record in records:
        if record.get("pass") == "remove-channels":
            return {
                "total": record["groups_total"],
                "prunable": record["groups_prunable"],
                "changed": record["groups_changed"],
                "blocked": [],
            }
    return {}


def _write_manifest(staging: Path, loaded: Source, options: CompileOptions) -> None:
    outputs = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    manifest = {
        "tool": {"name": "prune2deploy", "version": __version__},
        "libraries": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": _input_record(loaded),
        "masks": {"path": str(options.masks), "sha256": sha256_file(options.masks)} if options.masks else None,
        "options": options.to_dict(),
        "outputs": outputs,
    }
    atomic_write_json(staging / "manifest.json", manifest)


def _engine(name: str):
    from prune2deploy.engines.onnxruntime import OnnxRuntimeEngine

    if name == "onnxruntime":
        return OnnxRuntimeEngine()
    if name in ("tensorrt", "tensorrt-rtx"):
        from prune2deploy.engines.tensorrt import TensorRTEngine, TensorRTRTXEngine

        return TensorRTEngine() if name == "tensorrt" else TensorRTRTXEngine()
    from prune2deploy.engines.torch import TorchEngine

    return TorchEngine()


def _build_engine(options: CompileOptions, model_path: Path, staging: Path) -> dict[str, Any]:
    from prune2deploy.engines.base import BuildOptions
    from prune2deploy.errors import EngineUnavailable

    engine = _engine(options.engine)
    availability = engine.available()
    if not availability.can_build:
        raise EngineUnavailable(
            f"engine {options.engine} cannot build here: {availability.reason}. {availability.install_hint}"
        )
    seqs, batches = options.profile_seqs, options.profile_batches
    ranges = {}
    model = ir.load(str(model_path))
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        dims = [d if isinstance(d, int) else None for d in value.shape]
        lo, opt, hi = [], [], []
        for index, d in enumerate(dims):
            if d is not None:
                lo.append(d), opt.append(d), hi.append(d)
            elif index == 0:
                lo.append(1), opt.append(batches[0]), hi.append(max(batches))
            else:
                lo.append(1), opt.append(seqs[0]), hi.append(max(seqs))
        ranges[value.name] = (tuple(lo), tuple(opt), tuple(hi))
    built = engine.build(
        model_path,
        BuildOptions(
            precision=options.precision,
            sparse_weights="sparsify-2:4" in options.passes,
            shape_ranges=ranges,
            work_dir=staging / "engine",
        ),
    )
    return {
        "engine": built.engine,
        "artifact": str(built.artifact.relative_to(staging)) if built.artifact else None,
        "info": built.info,
    }


def _profile_section(reference_bytes: bytes, model_path: Path, options: CompileOptions, ideal: float) -> dict:
    from prune2deploy.profiling.measure import compare_models
    from prune2deploy.profiling.report import latency_sections

    grid = [(b, s) for b in options.profile_batches for s in options.profile_seqs]
    rows = compare_models(
        {"reference": reference_bytes, "compiled": model_path},
        grid,
        threads=options.threads,
        reference="reference",
        budget_s=options.profile_budget_s,
        min_runs=5,  # the median of at least five runs, whatever the budget
    )
    return latency_sections(rows, ideal=ideal)


def _predictions(ref_cost, new_cost, options: CompileOptions) -> list[dict]:
    from prune2deploy.profiling.roofline import predict_table

    precision = options.precision if options.precision != "fp32" else "fp16"
    rows = predict_table(
        ref_cost,
        new_cost,
        gpus=options.gpus or None,
        precision=precision,
        batch=new_cost.batch or 1,
        seq=new_cost.seq or 128,
    )
    return [
        {
            "gpu": r.gpu,
            "precision": r.precision,
            "batch": r.batch,
            "seq": r.seq,
            "reference_ms": r.reference_ms,
            "compiled_ms": r.compiled_ms,
            "speedup": r.speedup,
            "measured_ms": None,
        }
        for r in rows
    ]


def inspect(model: Path | str | ir.Model) -> dict[str, Any]:
    """Coupled channel groups of an ONNX model: tensors, width, zero channels, prunable or why not."""
    from prune2deploy.analysis.channels import analyze_channels
    from prune2deploy.analysis.cost import param_count
    from prune2deploy.frontends.onnx import load_onnx

    ir_model = model if isinstance(model, ir.Model) else load_onnx(Path(model))
    analysis = analyze_channels(ir_model)
    total, _ = param_count(ir_model)
    # Batch and sequence axes also meet contractions (attention's QKᵀ); they have no static width and are
    # not channels, so they are left out of what a person reads.
    groups = [g.summary() for g in analysis.groups if g.width > 0]
    from prune2deploy.passes.sparsify_nm import SparsifyNMPass

    check = SparsifyNMPass(mode="check", compute_cost=True)  # check mode reads, never writes
    check(ir_model)
    sparsity = {k: v for k, v in check.record.items() if k not in ("pass", "exact", "weights")}
    sparsity["weights"] = [
        {k: w[k] for k in ("node", "initializer", "op", "shape", "eligible", "reason", "already_nm")}
        for w in check.record["weights"]
    ]
    from prune2deploy.analysis.attention import analyze_attention
    from prune2deploy.analysis.summary import layer_summary

    return {
        "model": str(model) if not isinstance(model, ir.Model) else "<in-memory>",
        "layers": layer_summary(ir_model),
        "attention": analyze_attention(ir_model).summary(),
        "sparsity_2_4": sparsity,
        "params": total,
        "nodes": len(ir_model.graph),
        "groups": groups,
        "prunable": sum(g["prunable"] for g in groups),
        "zero_channels": sum(g["zero_channels"] for g in groups if g["prunable"]),
    }


def profile(
    model: Path | str,
    *,
    against: Path | str | None = None,
    batches: list[int] = (1,),
    seqs: list[int] = (128,),
    threads: int | None = None,
    budget_s: float = 10.0,
    ops: bool = False,
) -> list[dict]:
    """Measures latency on ONNX Runtime CPU, side by side with ``against`` in the same run.

    With ``ops``, also ONNX Runtime's per-op-type and slowest-node breakdown at the first grid point.
    """
    from prune2deploy.profiling.measure import compare_models

    for path in (model, against):
        if path is not None and not Path(path).is_file():
            raise BadInputError(f"{path}: no such ONNX file")
    models = {"compiled": Path(model)}
    if against is not None:
        models = {"reference": Path(against), **models}
    grid = [(b, s) for b in batches for s in seqs]
    rows = compare_models(
        models, grid, threads=threads, reference="reference" if against else None, budget_s=budget_s, min_runs=5
    )
    if ops:
        from prune2deploy.feeds import random_feeds
        from prune2deploy.frontends.onnx import load_onnx
        from prune2deploy.profiling.ort_ops import ort_op_breakdown

        for name, path in models.items():
            feeds = random_feeds(load_onnx(path), batch=grid[0][0], seq=grid[0][1])
            rows.append({"kind": "ops", "model": name, **ort_op_breakdown(path, feeds, threads=threads)})
    return rows


def predict(
    model: Path | str,
    *,
    against: Path | str | None = None,
    gpus: list[str] | None = None,
    precision: str = "fp16",
    batch: int = 1,
    seq: int = 128,
) -> list[dict]:
    """Roofline latency per target GPU (with the reference side by side when ``against`` is given)."""
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.profiling.roofline import predict as roofline_predict
    from prune2deploy.profiling.roofline import predict_table

    compiled = load_onnx(Path(model))
    if against is None:
        return [p.as_dict() for p in roofline_predict(compiled, gpus=gpus, precision=precision, batch=batch, seq=seq)]
    reference = load_onnx(Path(against))
    return [
        r.as_dict() for r in predict_table(reference, compiled, gpus=gpus, precision=precision, batch=batch, seq=seq)
    ]
