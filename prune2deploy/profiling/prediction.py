"""Predicted latency per target GPU: one row schema for the compile report and ``prune2deploy predict``.

Both the report's ``predictions`` section (:func:`prune2deploy.driver.report.predictions`) and
:func:`prune2deploy.api.predict` build their rows here, so the same models, engine and shape give the same
numbers in both. A row prices a model's kernels with the engine-aware cost model
(:mod:`prune2deploy.profiling.costmodel`) on one catalog GPU.

Row schema (every key is always present unless marked; times in ms at the row's precision):

=========================  ==============================================================================
``gpu``                    catalog key
``engine``                 the cost model's engine profile (``tensorrt``, ``onnxruntime``, ``torch``, ``llama.cpp``)
``precision``              the precision priced
``batch``, ``seq``         the shape priced (``seq`` is None for a decode step)
``source``                 ``graph`` (an ONNX graph's per-node costs) or ``config`` (shape-only)
``compiled_ms``            predicted latency of the (compiled) model: the engine-aware cost model
``lower_bound_ms``         the ideal roofline of the same kernels (peak rates, perfect overlap, no launch)
``compute_ms``, ``memory_ms``, ``launch_ms``, ``kernels``
                           the prediction's parts: sums over kernels, and the kernel count
``binding``                the resource that binds most of the time: compute, memory or launch
``binding_by_group``,      per layer type (attention, mlp, norm …): the binding resource and the ms
``ms_by_group``
``sparse_used``            whether 2:4 sparse tensor cores speed up any kernel
``gflops``                 the model's FLOPs at this shape, in GFLOP
``fused_ops``              fused (com.microsoft) op type → count in the graph; ``{}`` when unfused
                           (``source=graph`` only)
=========================  ==============================================================================

With a reference (the compile report always; ``predict --against``), also:

=============================  ==========================================================================
``reference_ms``               the reference's predicted latency (same engine, GPU, shape)
``reference_lower_bound_ms``   the reference's ideal roofline
``reference_gflops``           the reference's FLOPs, in GFLOP
``speedup``                    ``reference_ms / compiled_ms``: the predicted speedup from pruning
``lower_bound_speedup``        ``reference_lower_bound_ms / lower_bound_ms``
``ideal_speedup``              ``reference FLOPs / compiled FLOPs`` — the one meaning of "ideal"
``fusion_level``               ``as given`` (both graphs at the same fusion) or ``reference fused here``
                               (the compiled graph carries fuse-ort's kernels, so a copy of the reference
                               was fused the same way before pricing: ``speedup`` is pruning alone)
``fusion_speedup`` (optional)  only with ``reference fused here``: unfused / fused reference latency on this
                               engine — what fusion alone adds, never counted in ``speedup``
``cause``                      ``None``, or why ``speedup`` realises less than half of ``ideal_speedup``
                               (:func:`~prune2deploy.profiling.costmodel.explain_gain`): launch-bound, tile
                               quantisation (with the ``prune --round-to`` that recovers it), too few tiles
                               to fill the SMs, unpruned parts. A smaller model is never predicted slower.
=============================  ==========================================================================

Shape-only rows (``source=config``) add ``mode`` (prefill/decode), ``past``, ``params``, ``tokens_per_s`` and,
for a decode step, ``compute_bound_batch``.

"Ideal" means one thing: ``ideal_speedup`` is the FLOP ratio, the speedup if time followed arithmetic
alone. It is engine- and GPU-independent and, since fused ops are costed as the subgraph they replace
(:mod:`prune2deploy.analysis.contrib_cost`), the same for a fused and an unfused graph. The report's measured
``speedup`` rows carry the same FLOP ratio, under the same name. The roofline is called ``lower_bound_ms``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from prune2deploy.analysis.contrib_cost import fused_op_counts
from prune2deploy.analysis.cost import ModelCost, model_cost
from prune2deploy.profiling.costmodel import CostPrediction, Kernel, explain_gain, kernels_from_cost, price
from prune2deploy.profiling.roofline import GPUSpec, load_catalog, resolve_gpus

__all__ = [
    "Priced",
    "compare_costs",
    "compare_models",
    "costmodel_engine",
    "price_cost",
    "row_from_prediction",
    "target_gpus",
]

log = logging.getLogger(__name__)

#: What ``fusion_level`` says.
AS_GIVEN = "as given"
FUSED_HERE = "reference fused here"


def costmodel_engine(engine: str | None) -> str:
    """The cost model's engine profile for a compile engine name (TensorRT-RTX prices as TensorRT)."""
    if engine in ("tensorrt", "tensorrt-rtx", None):
        return "tensorrt"
    return engine if engine in ("torch", "llama.cpp") else "onnxruntime"


def target_gpus(gpus: Sequence[str] | None, precision: str) -> list[GPUSpec]:
    """Catalog GPUs for ``gpus`` (names or aliases); all of them that support ``precision`` for ``None``."""
    specs = resolve_gpus(gpus, load_catalog())
    return specs if gpus else [s for s in specs if s.supports(precision)]


def row_from_prediction(pred: CostPrediction, **fields: Any) -> dict[str, Any]:
    """The schema's priced part of a row from one :class:`CostPrediction` (``fields`` first)."""
    return {
        **fields,
        "compiled_ms": pred.latency_ms,
        "lower_bound_ms": pred.lower_bound_ms,
        "compute_ms": pred.compute_ms,
        "memory_ms": pred.memory_ms,
        "launch_ms": pred.launch_ms,
        "kernels": pred.kernels,
        "binding": pred.binding,
        "binding_by_group": pred.binding_by_group,
        "ms_by_group": pred.ms_by_group,
        "sparse_used": pred.sparse_used,
    }


@dataclass
class Priced:
    """One costed graph, ready to price: its per-node costs and the fused ops it holds."""

    cost: ModelCost
    fused_ops: dict[str, int]

    def kernels(self, precision: str, engine: str) -> list[Kernel]:
        return kernels_from_cost(self.cost, precision=precision, engine=engine)

    def predictions(self, specs: Sequence[GPUSpec], precision: str, engine: str) -> list[CostPrediction]:
        kernels = self.kernels(precision, engine)
        return [price(kernels, spec, precision=precision, engine=engine) for spec in specs]


def price_cost(cost: ModelCost, *, fused_ops: dict[str, int] | None = None) -> Priced:
    return Priced(cost, dict(fused_ops or {}))


def compare_costs(
    reference: Priced | None,
    compiled: Priced,
    *,
    gpus: Sequence[str] | None = None,
    precision: str = "fp16",
    engine: str = "tensorrt",
    unfused_reference: Priced | None = None,
) -> list[dict[str, Any]]:
    """Rows (module docstring) for ``compiled`` on each GPU, side by side with ``reference`` when given.

    ``unfused_reference``: the reference before it was fused here to match ``compiled`` (gives
    ``fusion_speedup``); pass it only when ``reference`` is that fused copy.
    """
    specs = target_gpus(gpus, precision)
    cost = compiled.cost
    base = {"engine": engine, "precision": precision, "batch": cost.batch, "seq": cost.seq, "source": "graph"}
    after = compiled.predictions(specs, precision, engine)
    if reference is None:
        return [
            row_from_prediction(p, gpu=s.key, **base, gflops=cost.flops / 1e9, fused_ops=compiled.fused_ops)
            for s, p in zip(specs, after, strict=True)
        ]
    before = reference.predictions(specs, precision, engine)
    ref_kernels, new_kernels = reference.kernels(precision, engine), compiled.kernels(precision, engine)
    unfused = unfused_reference.predictions(specs, precision, engine) if unfused_reference is not None else None
    rows = []
    for i, (spec, new, old) in enumerate(zip(specs, after, before, strict=True)):
        row = row_from_prediction(new, gpu=spec.key, **base, gflops=cost.flops / 1e9, fused_ops=compiled.fused_ops)
        row.update(
            reference_ms=old.latency_ms,
            reference_lower_bound_ms=old.lower_bound_ms,
            reference_gflops=reference.cost.flops / 1e9,
            reference_fused_ops=reference.fused_ops,
            speedup=old.latency_ms / new.latency_ms,
            lower_bound_speedup=old.lower_bound_ms / new.lower_bound_ms if new.lower_bound_ms else None,
            ideal_speedup=reference.cost.flops / cost.flops if cost.flops else None,
            fusion_level=AS_GIVEN if unfused is None else FUSED_HERE,
            cause=explain_gain(ref_kernels, new_kernels, spec, precision=precision, engine=engine),
        )
        if unfused is not None:
            row["fusion_speedup"] = unfused[i].latency_ms / old.latency_ms
        rows.append(row)
    return rows


def _fuse_like(reference: ir.Model, compiled_ops: dict[str, int]) -> bool:
    """Fuses ``reference`` in place with fuse-ort when the compiled graph carries its kernels and the
    reference does not; whether it did. A fusion that fails or is refused leaves the reference as it was."""
    if not compiled_ops or fused_op_counts(reference):
        return False
    from prune2deploy.passes.fuse_ort import FuseOrtPass

    result = FuseOrtPass()(reference)
    if not result.modified:
        log.info("reference not fused for the comparison: %s", result.refused)
    return bool(result.modified)


def compare_models(
    reference: ir.Model | None,
    compiled: ir.Model,
    *,
    batch: int = 1,
    seq: int = 128,
    gpus: Sequence[str] | None = None,
    precision: str = "fp16",
    engine: str = "tensorrt",
    compiled_cost: ModelCost | None = None,
    reference_cost: ModelCost | None = None,
) -> list[dict[str, Any]]:
    """Rows for two graphs at one shape, at the same fusion level: when ``compiled`` carries fuse-ort's
    kernels and ``reference`` does not, ``reference`` is fused the same way **in place** first (pass a copy
    you can spare) and the row's ``fusion_speedup`` says what fusion alone adds.

    ``compiled_cost`` / ``reference_cost``: costs already taken of these graphs at this shape (unfused
    reference) — saves costing them again.
    """
    new_ops = fused_op_counts(compiled)
    new = Priced(compiled_cost or model_cost(compiled, batch=batch, seq=seq), new_ops)
    if reference is None:
        return compare_costs(None, new, gpus=gpus, precision=precision, engine=engine)
    ref = Priced(reference_cost or model_cost(reference, batch=batch, seq=seq), fused_op_counts(reference))
    unfused = None
    if _fuse_like(reference, new_ops):
        unfused = ref
        ref = Priced(model_cost(reference, batch=batch, seq=seq), fused_op_counts(reference))
    return compare_costs(ref, new, gpus=gpus, precision=precision, engine=engine, unfused_reference=unfused)
