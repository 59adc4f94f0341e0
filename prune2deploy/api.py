"""The public Python API: compile, prune, inspect, verify, profile, predict, demo, sweep. The CLI only calls these.

A façade: each function validates what it is given and hands the work to the package that does it
(the compile driver in :mod:`prune2deploy.driver`, analysis, verification, profiling). Options are
:class:`CompileOptions` (the same keys as config files and CLI flags).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.driver.compile import CompileResult, compile_model
from prune2deploy.driver.source import Progress, Source, load_source
from prune2deploy.errors import BadInputError, OutputExistsError
from prune2deploy.spec import CompileOptions, load_config

__all__ = [
    "CompileOptions",
    "CompileResult",
    "Source",
    "compile",
    "demo",
    "engine_names",
    "inspect",
    "load_config",
    "load_source",
    "pass_specs",
    "predict",
    "predict_config",
    "profile",
    "prune",
    "sweep",
    "verify",
]

log = logging.getLogger(__name__)


def compile(
    source: Any,
    out_dir: Path | str,
    options: CompileOptions | None = None,
    *,
    progress: Progress | None = None,
) -> CompileResult:
    """Compiles a pruned model into a physically smaller, verified ONNX model (and engine).

    ``source`` is an HF folder, a .gguf file, a bundled model name, an .onnx file or an nn.Module.

    Raises:
        P2DError subclasses for bad input, existing outputs, missing engines; VerificationError (after the
        folder is written, so the user can inspect it) when an exact pipeline exceeds its tolerance.
    """
    return compile_model(source, out_dir, options, progress=progress)


def demo(
    model: str = "smollm2-135m",
    out_dir: Path | str = "build/demo",
    *,
    ratio: float = 0.5,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """Compiles a bundled real model with ``ratio`` of every MLP's neurons masked by weight magnitude."""
    from prune2deploy.demo import demo_masks

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} exists and is not empty; choose another --out or pass --overwrite"
        )
    with tempfile.TemporaryDirectory(prefix="p2d-demo-") as scratch:
        say = progress or (lambda _msg: None)
        say(f"masking {ratio:.0%} of every MLP's neurons of {model} by magnitude")
        masks = demo_masks(model, ratio, Path(scratch) / "masks.safetensors")
        options = CompileOptions(
            masks=masks, overwrite=overwrite, profile_batches=[1], profile_seqs=[128], profile_budget_s=5.0
        )
        return compile_model(model, out, options, progress=progress)


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


def verify(
    model: Path | str,
    reference: Path | str,
    *,
    feeds: list[Path] | None = None,
    tolerance: float = 1e-4,
):
    """Compares a compiled ONNX with its reference on ONNX Runtime CPU (random feeds + the user's)."""
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.verify import load_feeds, verify_models

    reference_model = load_onnx(Path(reference))
    compiled = load_onnx(Path(model))
    user_feeds = [load_feeds(p) for p in feeds or []]
    return verify_models(reference_model, compiled, exact=True, tolerance=tolerance, user_feeds=user_feeds)


def prune(source: Any, out_dir: Path | str, **kwargs: Any):
    """Scores a dense model and writes ``masks.safetensors`` + ``plan.yaml`` (see pruning.prune_model)."""
    from prune2deploy.pruning.prune import prune_model

    return prune_model(source, out_dir=out_dir, **kwargs)


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
    record = check(ir_model).record
    sparsity = {k: v for k, v in record.items() if k != "weights"}
    sparsity["weights"] = [
        {k: w[k] for k in ("node", "initializer", "op", "shape", "eligible", "reason", "already_nm")}
        for w in record["weights"]
    ]
    from prune2deploy.analysis.attention import analyze_attention
    from prune2deploy.analysis.blocks import layer_summary

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


def _is_config(path: Path) -> bool:
    return path.suffix == ".json" or (path.is_dir() and (path / "config.json").is_file())


def predict(
    model: Path | str,
    *,
    against: Path | str | None = None,
    gpus: list[str] | None = None,
    precision: str = "fp16",
    batch: int = 1,
    seq: int = 128,
    engine: str = "tensorrt",
    decode: bool = False,
    past: int = 0,
    plan: Path | str | None = None,
) -> list[dict]:
    """Latency per target GPU: the engine-aware cost model, with the ideal roofline as its lower bound.

    ``model`` is an ONNX file (priced from its graph; with ``against``, side by side with the reference), or
    an HF ``config.json`` / a folder holding one (priced from shapes alone: see :func:`predict_config`).
    """
    path = Path(model)
    if _is_config(path):
        return predict_config(
            path, gpus=gpus, precision=precision, batch=batch, seq=seq, engine=engine, decode=decode, past=past,
            plan=plan,
        )  # fmt: skip
    from prune2deploy.analysis.cost import model_cost
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.profiling.costmodel import kernels_from_cost, price
    from prune2deploy.profiling.roofline import load_catalog, predict_table, resolve_gpus
    from prune2deploy.profiling.roofline import predict as roofline_predict

    catalog = load_catalog()
    compiled = load_onnx(path)
    new_cost = model_cost(compiled, batch=batch, seq=seq)
    new_kernels = kernels_from_cost(new_cost, precision=precision, engine=engine)
    if against is None:
        rows = []
        for p in roofline_predict(new_cost, gpus=gpus, precision=precision, catalog=catalog):
            pred = price(new_kernels, catalog[p.gpu], precision=precision, engine=engine)
            rows.append(
                {
                    **p.as_dict(),
                    "engine": engine,
                    "predicted_ms": pred.latency_ms,
                    "lower_bound_ms": pred.lower_bound_ms,
                    "binding": pred.binding,
                    "binding_by_group": pred.binding_by_group,
                }
            )
        return rows
    ref_cost = model_cost(load_onnx(Path(against)), batch=batch, seq=seq)
    ref_kernels = kernels_from_cost(ref_cost, precision=precision, engine=engine)
    rows = []
    for r in predict_table(ref_cost, new_cost, gpus=gpus, precision=precision, catalog=catalog):
        spec = resolve_gpus([r.gpu], catalog)[0]
        before = price(ref_kernels, spec, precision=precision, engine=engine)
        after = price(new_kernels, spec, precision=precision, engine=engine)
        rows.append(
            {
                **r.as_dict(),
                "engine": engine,
                "reference_predicted_ms": before.latency_ms,
                "predicted_ms": after.latency_ms,
                "predicted_speedup": before.latency_ms / after.latency_ms,
                "binding": after.binding,
            }
        )
    return rows


def predict_config(
    config: Path | str | dict,
    *,
    gpus: list[str] | None = None,
    precision: str = "fp16",
    batch: int = 1,
    seq: int = 128,
    engine: str = "tensorrt",
    decode: bool = False,
    past: int = 0,
    plan: Path | str | Any | None = None,
) -> list[dict]:
    """Shape-only prediction from an HF config (no weights, no export): a prefill of ``seq`` tokens, or one
    decode step after ``past`` tokens, per catalog GPU; for decoders also tokens/s and the batch at which the
    decode step turns compute-bound. ``plan`` (a plan YAML or :class:`~prune2deploy.pruning.plan.Plan`)
    narrows the widths per layer."""
    from prune2deploy.profiling.costmodel import compute_bound_batch, price
    from prune2deploy.profiling.roofline import load_catalog, resolve_gpus
    from prune2deploy.profiling.shape_only import load_config, model_kernels, shape_from_config

    if isinstance(plan, (str, Path)):
        from prune2deploy.pruning.plan import load_plan

        plan = load_plan(plan)
    shape = shape_from_config(load_config(config), plan)
    catalog = load_catalog()
    specs = resolve_gpus(gpus, catalog)
    if gpus is None:
        specs = [s for s in specs if s.supports(precision)]

    def build(b: int):
        return model_kernels(shape, batch=b, seq=seq, past=past, decode=decode, precision=precision, engine=engine)

    kernels = build(batch)
    rows = []
    for spec in specs:
        pred = price(kernels, spec, precision=precision, engine=engine)
        tokens = batch * (1 if decode else seq)
        row = {
            "gpu": spec.key,
            "engine": engine,
            "precision": precision,
            "batch": batch,
            "seq": None if decode else seq,
            "past": past if decode else None,
            "mode": "decode" if decode else "prefill",
            "params": shape.params,
            **pred.as_dict(),
            "tokens_per_s": tokens * 1000 / pred.latency_ms if shape.family != "resnet" else None,
        }
        if decode and shape.family == "decoder":
            row["compute_bound_batch"] = compute_bound_batch(build, spec, precision=precision, engine=engine)
        rows.append(row)
    return rows
