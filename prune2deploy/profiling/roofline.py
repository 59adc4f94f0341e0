"""Roofline latency prediction per target GPU, from the spec catalog ``gpus.toml``.

Each node costs ``max(flops / peak, bytes / bandwidth)``: the time of whichever of arithmetic or memory
traffic it cannot hide behind the other. MatMul/Gemm/Conv run at the tensor-core peak of the chosen
precision, and at the 2:4-sparse peak when their weight is 2:4 along K and the GPU has sparse tensor
cores (2:4 weights are then also read compressed: half the values plus a 2-bit index per kept value).
Every other op runs on CUDA cores at the fp32 peak, which in practice makes it memory-bound. Views
(Reshape, Squeeze …) cost nothing.

Precision sets the bytes per float element (fp32/tf32: 4, fp16/bf16: 2, fp8/int8: 1) for activations and
weights alike; ``fp32`` means CUDA-core fp32 GEMMs, ``tf32`` the TF32 tensor cores.

The result is a lower bound on latency: an ideal roofline assumes perfect overlap, peak clocks and no
fusion across nodes. Two knobs move it towards measurements:

- ``efficiency`` (default 1.0, the ideal roofline) scales both peaks: 0.7 is a common achievable
  fraction for large GEMMs and streaming kernels on data-centre GPUs.
- ``launch_overhead_us`` (default 0.0) adds a fixed cost per kernel (every node that is not a view).
  A CUDA launch costs roughly 2-5 µs; CUDA graphs and TensorRT fusion remove most of it, so it is off by
  default and worth setting only for small batches in eager runtimes.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.analysis.cost import ModelCost, NodeCost, model_cost
from prune2deploy.errors import ConfigError
from prune2deploy.graph.op_categories import FUSED_ATTENTION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "PRECISIONS",
    "ComparisonRow",
    "GPUSpec",
    "Prediction",
    "gpu_names",
    "load_catalog",
    "predict",
    "predict_cost",
    "predict_table",
    "resolve_gpus",
]

log = logging.getLogger(__name__)

# Bytes per float element at each precision.
PRECISIONS: dict[str, float] = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
_TENSOR_PRECISIONS = ("tf32", "fp16", "bf16", "fp8", "int8")
_NUMBER_FIELDS = ("memory_gb", "memory_bandwidth_gbs", "cuda_fp32_tflops")
_STRING_FIELDS = ("name", "architecture", "compute_capability")
_SOURCED = ("tensor_tflops", "sparse_tensor_tflops", "cuda_fp32_tflops", "memory_gb",
            "memory_bandwidth_gbs", "compute_capability")  # fmt: skip


@dataclass(frozen=True)
class GPUSpec:
    """One catalog entry. Peaks are in TFLOP/s (TOP/s for int8), bandwidth in GB/s (10^9 B/s)."""

    key: str
    name: str
    architecture: str
    compute_capability: str
    memory_gb: float
    memory_bandwidth_gbs: float
    cuda_fp32_tflops: float
    sparse_tensor_cores: bool
    tensor_tflops: dict[str, float]
    sparse_tensor_tflops: dict[str, float]
    sources: dict[str, str]
    aliases: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    sm_count: int = 0  # streaming multiprocessors (0: unknown); the cost model's wave quantization needs it
    boost_clock_mhz: float = 0.0  # SM boost clock (0: unknown); the cost model's per-kernel cost is in cycles
    l2_mb: float = 0.0  # L2 cache in MB (0: unknown); what stays on chip between kernels and between runs

    def supports(self, precision: str) -> bool:
        """Whether a prediction at ``precision`` is possible (fp32 always runs on CUDA cores)."""
        return precision == "fp32" or precision in self.tensor_tflops

    def gemm_peak(self, precision: str, *, sparse: bool = False) -> float:
        """FLOP/s of MatMul/Gemm/Conv at ``precision``; the sparse peak when ``sparse`` and available."""
        if precision == "fp32":
            return self.cuda_fp32_tflops * 1e12
        if precision not in self.tensor_tflops:
            raise ConfigError(
                f"GPU '{self.key}' ({self.name}) has no {precision} tensor-core peak in the catalog; "
                f"it supports {', '.join(['fp32', *self.tensor_tflops])}"
            )
        if sparse and self.sparse_tensor_cores and precision in self.sparse_tensor_tflops:
            return self.sparse_tensor_tflops[precision] * 1e12
        return self.tensor_tflops[precision] * 1e12

    def has_sparse(self, precision: str) -> bool:
        return self.sparse_tensor_cores and precision in self.sparse_tensor_tflops


@dataclass(frozen=True)
class Prediction:
    """Predicted latency of one model on one GPU at one precision and input shape.

    ``compute_ms`` and ``memory_ms`` are the sums of every node's arithmetic and memory time (each at
    ``efficiency``); ``latency_ms`` sums each node's larger one, plus launch overheads. ``bound`` says
    which kind of node takes most of the latency. ``bytes`` is at the precision's element size.
    """

    gpu: str
    precision: str
    batch: int | None
    seq: int | None
    latency_ms: float
    compute_ms: float
    memory_ms: float
    flops: int
    bytes: float
    sparse_flops_fraction: float
    bound: str
    kernels: int = 0
    launch_ms: float = 0.0
    sparse_used: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ComparisonRow:
    """Reference and compiled predictions side by side; ``speedup`` = reference / compiled latency."""

    gpu: str
    precision: str
    batch: int | None
    seq: int | None
    reference_ms: float
    compiled_ms: float
    speedup: float
    reference_bound: str
    compiled_bound: str
    reference_gflops: float
    compiled_gflops: float
    compiled_sparse_flops_fraction: float
    sparse_used: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fail(where: str, key: str, field_name: str, problem: str) -> ConfigError:
    return ConfigError(f"GPU catalog {where}: GPU '{key}', field '{field_name}': {problem}")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _parse_gpu(key: str, entry: Any, where: str) -> GPUSpec:
    """Validates one catalog entry; every problem names the GPU and the field."""
    if not isinstance(entry, dict):
        raise _fail(where, key, "(entry)", "must be a table")
    for name in _STRING_FIELDS:
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise _fail(where, key, name, "missing or not a non-empty string")
    if not re.fullmatch(r"\d+\.\d+", entry["compute_capability"]):
        # the cost model reads the generation from it (costmodel: fewer cycles per kernel from 8.0 on)
        raise _fail(
            where, key, "compute_capability", f"must be MAJOR.MINOR like '8.9', got {entry['compute_capability']!r}"
        )
    for name in _NUMBER_FIELDS:
        if name not in entry:
            raise _fail(where, key, name, "missing")
        if not _positive(entry[name]):
            raise _fail(where, key, name, f"must be a positive number, got {entry[name]!r}")
    if not isinstance(entry.get("sparse_tensor_cores"), bool):
        raise _fail(where, key, "sparse_tensor_cores", "missing or not true/false")
    tables: dict[str, dict[str, float]] = {}
    for name in ("tensor_tflops", "sparse_tensor_tflops"):
        table = entry.get(name)
        if not isinstance(table, dict):
            raise _fail(where, key, name, "missing or not a table of precision = TFLOP/s")
        for precision, value in table.items():
            if precision not in _TENSOR_PRECISIONS:
                raise _fail(where, key, f"{name}.{precision}", f"unknown precision; use {_TENSOR_PRECISIONS}")
            if not _positive(value):
                raise _fail(where, key, f"{name}.{precision}", f"must be a positive number, got {value!r}")
        tables[name] = {p: float(v) for p, v in table.items()}
    dense, sparse = tables["tensor_tflops"], tables["sparse_tensor_tflops"]
    if entry["sparse_tensor_cores"] and not sparse:
        raise _fail(where, key, "sparse_tensor_tflops", "empty although sparse_tensor_cores = true")
    if not entry["sparse_tensor_cores"] and sparse:
        raise _fail(where, key, "sparse_tensor_tflops", "given although sparse_tensor_cores = false")
    for precision, value in sparse.items():
        if precision not in dense:
            raise _fail(where, key, f"sparse_tensor_tflops.{precision}", "has no dense counterpart")
        if value < dense[precision]:
            raise _fail(where, key, f"sparse_tensor_tflops.{precision}", "is below the dense peak")
    sources = entry.get("sources")
    if not isinstance(sources, dict):
        raise _fail(where, key, "sources", "missing: every figure needs its source (document name and URL)")
    for name in _SOURCED:
        if not isinstance(sources.get(name), str) or not sources[name].strip():
            raise _fail(where, key, f"sources.{name}", "missing: say which NVIDIA document the figure is from")
    aliases = entry.get("aliases", [])
    checked = entry.get("checked", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise _fail(where, key, "aliases", "must be a list of strings")
    if not isinstance(checked, list) or not all(c in _SOURCED for c in checked):
        raise _fail(where, key, "checked", f"must list fields among {_SOURCED}")
    sm_count = entry.get("sm_count", 0)
    if not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 0:
        raise _fail(where, key, "sm_count", f"must be a non-negative integer, got {sm_count!r}")
    if sm_count and not (isinstance(sources.get("sm_count"), str) and sources["sm_count"].strip()):
        raise _fail(where, key, "sources.sm_count", "missing: say which NVIDIA document the SM count is from")
    optional = {name: _optional_figure(entry, sources, where, key, name) for name in ("boost_clock_mhz", "l2_mb")}
    return GPUSpec(
        key=key,
        name=entry["name"],
        architecture=entry["architecture"],
        compute_capability=entry["compute_capability"],
        memory_gb=float(entry["memory_gb"]),
        memory_bandwidth_gbs=float(entry["memory_bandwidth_gbs"]),
        cuda_fp32_tflops=float(entry["cuda_fp32_tflops"]),
        sparse_tensor_cores=entry["sparse_tensor_cores"],
        tensor_tflops=dense,
        sparse_tensor_tflops=sparse,
        sources=dict(sources),
        aliases=tuple(aliases),
        checked=tuple(checked),
        sm_count=sm_count,
        **optional,
    )


def _optional_figure(entry: dict, sources: dict, where: str, key: str, name: str) -> float:
    """An optional positive figure (0.0 when absent); when given, it needs its source like every other."""
    if name not in entry:
        return 0.0
    if not _positive(entry[name]):
        raise _fail(where, key, name, f"must be a positive number, got {entry[name]!r}")
    if not (isinstance(sources.get(name), str) and sources[name].strip()):
        raise _fail(where, key, f"sources.{name}", "missing: say which NVIDIA document the figure is from")
    return float(entry[name])


def load_catalog(path: Path | str | None = None) -> dict[str, GPUSpec]:
    """Loads and validates a GPU catalog (the packaged ``gpus.toml`` by default).

    Raises:
        ConfigError: The file is missing or not TOML, or an entry is incomplete (names GPU and field).
    """
    if path is None:
        where = "prune2deploy/profiling/gpus.toml"
        text = importlib.resources.files("prune2deploy.profiling").joinpath("gpus.toml").read_text("utf-8")
    else:
        where = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"GPU catalog {where} cannot be read: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"GPU catalog {where} is not valid TOML: {exc}") from exc
    gpus = data.get("gpus")
    if not isinstance(gpus, dict) or not gpus:
        raise ConfigError(f"GPU catalog {where} has no [gpus.<name>] tables")
    catalog = {key: _parse_gpu(key, entry, where) for key, entry in gpus.items()}
    seen: dict[str, str] = {}
    for spec in catalog.values():
        for name in (spec.key, *spec.aliases):
            normal = _normal(name)
            if normal in seen and seen[normal] != spec.key:
                raise _fail(where, spec.key, "aliases", f"'{name}' is also a name of GPU '{seen[normal]}'")
            seen[normal] = spec.key
    return catalog


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def resolve_gpus(names: Sequence[str] | None, catalog: Mapping[str, GPUSpec]) -> list[GPUSpec]:
    """Catalog entries for ``names``: keys or aliases (case-insensitive), or a prefix of exactly one of them
    (``jetson-orin-nano`` → ``jetson-orin-nano-8gb``); all of them for ``None``.

    Raises:
        ConfigError: for a name that matches nothing or more than one GPU, listing the catalog's names.
    """
    if names is None:
        return list(catalog.values())
    lookup = {}
    for spec in catalog.values():
        for name in (spec.key, *spec.aliases):
            lookup[_normal(name)] = spec
    resolved = []
    for name in names:
        spec = lookup.get(_normal(name))
        if spec is None:
            matches = {s.key: s for key, s in lookup.items() if key.startswith(_normal(name))}
            if len(matches) == 1:
                spec = next(iter(matches.values()))
            elif matches:
                raise ConfigError(f"GPU '{name}' is ambiguous: it could be {', '.join(sorted(matches))}")
            else:
                raise ConfigError(f"unknown GPU '{name}'; the catalog has: {', '.join(gpu_names(catalog))}")
        resolved.append(spec)
    return resolved


def gpu_names(catalog: Mapping[str, GPUSpec]) -> list[str]:
    """``key (alias, alias)`` per catalog GPU, for messages and ``--help``."""
    return [f"{s.key} ({', '.join(s.aliases)})" if s.aliases else s.key for s in catalog.values()]


def _implies_2of4(tag: str | None) -> bool:
    """Whether an N:M tag guarantees at most 2 non-zeros in every aligned group of 4 (what hardware uses)."""
    if not tag:
        return False
    try:
        n, m = (int(part) for part in tag.split(":"))
    except ValueError:
        return False
    if m % 4 == 0:
        return n <= 2
    return 4 % m == 0 and n * (4 // m) <= 2


def _sparse_weight_factor(itemsize: float) -> float:
    """Stored size of a 2:4 weight relative to dense: half the values plus a 2-bit index per kept value."""
    return 0.5 + 0.5 * 2 / (8 * itemsize)


def predict_cost(
    cost: ModelCost,
    gpu: GPUSpec,
    *,
    precision: str = "fp16",
    launch_overhead_us: float = 0.0,
    efficiency: float = 1.0,
) -> Prediction:
    """Roofline latency of already-costed nodes on one GPU (see the module docstring for the model)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"efficiency must be in (0, 1], got {efficiency}")
    if launch_overhead_us < 0:
        raise ConfigError(f"launch_overhead_us must be >= 0, got {launch_overhead_us}")
    itemsize = PRECISIONS[precision]
    dense_peak = gpu.gemm_peak(precision) * efficiency
    sparse_peak = gpu.gemm_peak(precision, sparse=True) * efficiency
    vector_peak = gpu.cuda_fp32_tflops * 1e12 * efficiency
    bandwidth = gpu.memory_bandwidth_gbs * 1e9 * efficiency
    use_sparse = gpu.has_sparse(precision)
    compute_s = memory_s = latency_s = 0.0
    compute_bound_s = memory_bound_s = 0.0
    total_bytes = 0.0
    kernels = 0
    sparse_used = False

    def node_time(node: NodeCost) -> tuple[float, float]:
        nonlocal sparse_used, total_bytes
        # fused attention (com.microsoft) runs its QKᵀ and weighted sum on tensor cores, as the MatMuls it replaces
        gemm = node.kind in ("matmul", "conv") or node.op_type in FUSED_ATTENTION
        sparse = gemm and use_sparse and _implies_2of4(node.sparsity)
        sparse_used |= sparse
        factor = _sparse_weight_factor(itemsize) if sparse else 1.0
        moved = node.bytes_at(itemsize, weight_factor=factor)
        total_bytes += moved
        peak = (sparse_peak if sparse else dense_peak) if gemm else vector_peak
        return node.flops / peak, moved / bandwidth

    for node in cost.nodes:
        if not node.is_kernel:
            continue
        kernels += 1
        flop_s, byte_s = node_time(node)
        compute_s += flop_s
        memory_s += byte_s
        latency_s += max(flop_s, byte_s)
        if flop_s > byte_s:
            compute_bound_s += flop_s
        else:
            memory_bound_s += byte_s
    launch_s = kernels * launch_overhead_us * 1e-6
    return Prediction(
        gpu=gpu.key,
        precision=precision,
        batch=cost.batch,
        seq=cost.seq,
        latency_ms=(latency_s + launch_s) * 1e3,
        compute_ms=compute_s * 1e3,
        memory_ms=memory_s * 1e3,
        flops=cost.flops,
        bytes=total_bytes,
        sparse_flops_fraction=cost.sparse_flops_fraction,
        bound="compute" if compute_bound_s > memory_bound_s else "memory",
        kernels=kernels,
        launch_ms=launch_s * 1e3,
        sparse_used=sparse_used,
        shapes=dict(cost.input_shapes),
    )


def predict(
    model: ir.Model | ModelCost,
    *,
    gpus: Sequence[str] | None = None,
    precision: str = "fp16",
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    seq: int = 128,
    launch_overhead_us: float = 0.0,
    efficiency: float = 1.0,
    catalog: Mapping[str, GPUSpec] | None = None,
) -> list[Prediction]:
    """Predicted latency of ``model`` on each GPU.

    Args:
        model: The model (costed here at ``shapes`` or ``batch``/``seq``) or a :class:`ModelCost`.
        gpus: Catalog keys or aliases; ``None`` predicts for every GPU that supports ``precision``
            (the others are skipped with a log line). A named GPU without ``precision`` is an error.
        precision: One of :data:`PRECISIONS`.
        shapes: Explicit input shapes (see :func:`prune2deploy.analysis.cost.model_cost`).
        batch: Batch for dynamic dims. seq: Sequence length for dynamic dims.
        launch_overhead_us: Fixed cost per kernel, in microseconds (default 0).
        efficiency: Achievable fraction of the peaks (default 1.0, the ideal roofline).
        catalog: GPU specs (the packaged catalog by default).
    """
    catalog = catalog if catalog is not None else load_catalog()
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    specs = resolve_gpus(gpus, catalog)
    if gpus is None:
        skipped = [s.key for s in specs if not s.supports(precision)]
        if skipped:
            log.info("skipping GPUs without a %s peak: %s", precision, ", ".join(skipped))
        specs = [s for s in specs if s.supports(precision)]
    cost = model if isinstance(model, ModelCost) else model_cost(model, shapes=shapes, batch=batch, seq=seq)
    return [
        predict_cost(
            cost,
            spec,
            precision=precision,
            launch_overhead_us=launch_overhead_us,
            efficiency=efficiency,
        )
        for spec in specs
    ]


def predict_table(
    reference: ir.Model | ModelCost,
    compiled: ir.Model | ModelCost,
    *,
    gpus: Sequence[str] | None = None,
    precision: str | Sequence[str] = "fp16",
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    seq: int = 128,
    launch_overhead_us: float = 0.0,
    efficiency: float = 1.0,
    catalog: Mapping[str, GPUSpec] | None = None,
) -> list[ComparisonRow]:
    """Reference vs compiled predictions per GPU and precision, with the predicted speedup.

    Both models are costed once at the same input shape and then priced per GPU and precision.
    """
    catalog = catalog if catalog is not None else load_catalog()
    precisions = [precision] if isinstance(precision, str) else list(precision)
    ref_cost = (
        reference if isinstance(reference, ModelCost) else model_cost(reference, shapes=shapes, batch=batch, seq=seq)
    )
    new_cost = (
        compiled if isinstance(compiled, ModelCost) else model_cost(compiled, shapes=shapes, batch=batch, seq=seq)
    )
    rows = []
    options = {"launch_overhead_us": launch_overhead_us, "efficiency": efficiency, "catalog": catalog}
    for prec in precisions:
        before = predict(ref_cost, gpus=gpus, precision=prec, **options)
        after = predict(new_cost, gpus=gpus, precision=prec, **options)
        for ref, new in zip(before, after, strict=True):
            rows.append(
                ComparisonRow(
                    gpu=ref.gpu,
                    precision=prec,
                    batch=ref.batch,
                    seq=ref.seq,
                    reference_ms=ref.latency_ms,
                    compiled_ms=new.latency_ms,
                    speedup=ref.latency_ms / new.latency_ms if new.latency_ms else math.inf,
                    reference_bound=ref.bound,
                    compiled_bound=new.bound,
                    reference_gflops=ref.flops / 1e9,
                    compiled_gflops=new.flops / 1e9,
                    compiled_sparse_flops_fraction=new.sparse_flops_fraction,
                    sparse_used=new.sparse_used,
                )
            )
    return rows
