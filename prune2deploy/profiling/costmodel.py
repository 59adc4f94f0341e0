"""A fusion-aware latency model per target engine, next to the ideal roofline it never beats.

The ideal roofline (:mod:`prune2deploy.profiling.roofline`) prices every ONNX node as its own kernel at peak
rates. Real engines fuse: pointwise ops ride in GEMM epilogues, attention is one kernel whose traffic is Q,
K, V, O and the KV cache (never the score matrix), and small-M GEMMs cannot fill the GPU. This module turns
a workload into *kernels* as an engine would launch them and prices each one:

``time = max(flops / (peak · gemm_efficiency · wave_utilisation), DRAM bytes / (bandwidth · bw_efficiency))
+ launch``

``launch`` is a host cost in microseconds for engines that launch each kernel from the CPU plus, for TensorRT,
a GPU-side cost in SM cycles at the GPU's boost clock (more cycles on GPUs older than Ampere, whose kernels
cannot copy global memory to shared memory asynchronously), of which a share (``launch_overlap``) is a floor
that the kernel's own work hides: a kernel costs ``max(work, overlap · launch) + (1 - overlap) · launch``.
DRAM bytes leave out what the GPU's L2 keeps on chip.
A GEMM split along K (split-K) is two kernels, the split GEMM and the reduction of its fp32 partial sums: it
pays a second ``launch`` and the partials' DRAM traffic, and is split only where that still finishes sooner.

Every factor has a source in :data:`FACTORS` (and docs/cost-model.md). Two sources of kernels:

- :func:`kernels_from_cost`: an exported graph's per-node costs (:class:`~prune2deploy.analysis.cost.ModelCost`),
  grouped by the engine's fusion rules.
- :mod:`prune2deploy.profiling.shape_only`: a config's shapes (no weights, no export).

The binding resource of each kernel is whichever of compute, memory or launch takes longest; the report
shows it per layer type.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prune2deploy.errors import ConfigError
from prune2deploy.graph.op_categories import FUSED_ATTENTION
from prune2deploy.profiling.roofline import PRECISIONS, GPUSpec

__all__ = [
    "ENGINES",
    "FACTORS",
    "FITTED",
    "CostPrediction",
    "EngineProfile",
    "Kernel",
    "compute_bound_batch",
    "explain_gain",
    "factor",
    "factors_set",
    "gemm_utilisation",
    "kernels_from_cost",
    "price",
    "sparse_eligibility",
    "sparse_gain",
    "sparse_tactic_reason",
    "split_counts",
]

# Each factor of the model, its value and where it comes from. docs/cost-model.md explains each one.
FACTORS: dict[str, dict[str, Any]] = {
    "gemm_efficiency": {
        "value": {"fp32": 0.7, "tf32": 0.7, "fp16": 0.75, "bf16": 0.75, "fp8": 0.45, "int8": 0.65},
        "source": "cuBLAS 4096^3 on H100 SXM: 760 TFLOP/s fp16, 797 bf16 of 989 (0.77-0.81), "
        "https://github.com/zzc0721/torch-performance-test-data/issues/79. fp8 and int8 are fit on "
        "published.json (validation.fit_factors, from validation.PRIORS): fp8 0.45 (its prior 0.55 is FBGEMM's "
        "row-scaled fp8 GEMM at 8192^3 on H100: 1125.51 TFLOP/s = 0.57, https://github.com/pytorch/FBGEMM/pull/2546; "
        "only TensorRT-LLM's four fp8 prefill figures use it), int8 0.65 (demoBERT int8 on A100/A30)",
    },
    "conv_efficiency": {
        "value": 0.55,
        "source": "fit on published.json (validation.fit_factors): MLPerf Inference ResNet-50 (int8, TensorRT) "
        "Offline on H100, A100 PCIe, A30, L4 and T4 reaches 37-45% of the int8 tensor peak (8.2 GFLOP a sample), "
        "i.e. 0.5-0.6 of it once tile and wave quantisation are priced; batch-1 ResNet-50 shares it (on the "
        "10-SM A2 and Xavier its convolutions outlast the per-kernel floor)",
    },
    "attention_efficiency": {
        "value": 0.5,
        "source": "FlashAttention-2 reaches 50-73% of the A100 fp16 peak forward (Dao 2023, "
        "https://arxiv.org/abs/2307.08691); the lower end is used for short sequences",
    },
    "bandwidth_efficiency": {
        "value": 0.85,
        "source": "streaming kernels reach ~85-92% of datasheet DRAM bandwidth on A100/H100 (NVIDIA nvbandwidth "
        "and STREAM-like measurements); 0.85 also matches llama.cpp F16 decode on RTX 4090 (published.json)",
    },
    "tile": {
        "value": 128,
        "source": "CUTLASS/cuBLAS tensor-core GEMMs use 128x128 (or 128x256) CTA tiles; wave quantisation "
        "follows NVIDIA's 'Matrix Multiplication Background User's Guide', "
        "https://docs.nvidia.com/deeplearning/performance/dl-performance-matrix-multiplication/",
    },
    "split_k": {
        "value": 256,
        "source": "cuBLAS splits K (split-K / stream-K) when M x N tiles cannot fill the SMs; one split per "
        "256 of K at most (CUTLASS split-K examples); the split that finishes soonest, its reduction kernel "
        "included (split_k_reduction), is taken (TensorRT times its tactics; cuBLAS's heuristic aims at the "
        "same), at most 16",
    },
    "split_k_reduction": {
        "value": {"partial_bytes": 4},
        "source": "a split-K GEMM is two kernels: the split GEMM writes fp32 partial sums to a workspace and a "
        "reduction kernel sums them (cuBLAS's own split-K runs 'nvjet_..._splitK_TNT + "
        "cublasLt::splitKreduce_kernel', https://github.com/Dao-AILab/quack/pull/157; CUTLASS "
        "GemmSplitKParallel + reduction::kernel::ReduceSplitK, 'a reduction over densely packed tensors in "
        "global memory', https://nvidia.github.io/cutlass/reduce__split__k_8h.html; 'the reduce kernel was the "
        "dominant cost for small split-K shapes', https://github.com/facebookexperimental/triton/pull/1118). "
        "Priced on GEMMs as one more per-kernel cost plus the partials written and read (4 bytes each, fp32 "
        "accumulators) where they do not fit in L2's activation share. Implicit-GEMM convs keep the free split: "
        "no source says how TensorRT's conv tactics split at batch 1, and charging them too was tried on "
        "published.json and cross-validated worse (leave-one-source-out 17.2% / -8.8% against 14.7% / -5.4%): "
        "a choice made on the validation figures, docs/cost-model.md",
    },
    "sparse_gain": {
        "value": {"small_m": 64, "large_m": 16384, "max_gain": 1.3},
        "source": "TensorRT demoBERT on A100, Megatron-Large 2:4 INT8 vs BERT-Large INT8: 1.25 -> 1.14 ms at "
        "batch 1 seq 128 (1.10x), 89.04 -> 68.61 ms at batch 128 seq 384 (1.30x), "
        "https://github.com/NVIDIA/TensorRT/tree/release/8.6/demo/BERT; NVIDIA's 2:4 blog quotes 1.3-1.5x on "
        "large GEMMs. At M <= 64 the engines pick the dense tactic (no gain, no loss)",
    },
    "launch_us": {
        "value": {"tensorrt": 0.0, "onnxruntime": 5.0, "torch": 8.0, "llama.cpp": 5.0},
        "source": "host-side cost per kernel launched from the CPU: CUDA kernel launch ~2-5 us (NVIDIA 'Getting "
        "Started with CUDA Graphs', https://developer.nvidia.com/blog/cuda-graphs/); eager PyTorch dispatch "
        "costs ~5-10 us of CPU per op, which bounds small-batch latency. TensorRT enqueues a whole engine (the "
        "MLPerf and TensorRT-LLM harnesses replay it as a CUDA graph), so its per-kernel cost is on the GPU: "
        "launch_cycles",
    },
    "launch_cycles": {
        "value": {"tensorrt": 13000.0},
        "source": "GPU-side cost per kernel of an engine enqueued as a whole (grid launch, CTA prologue filling "
        "the pipeline, epilogue, the dependent kernel's wait), in SM clock cycles so that it scales with each "
        "GPU's boost clock (gpus.toml boost_clock_mhz): MLPerf ResNet-50 SingleStream runs 1.4x faster on L4 "
        "(2040 MHz) than on A100 (1410 MHz) although A100 has 2.6x L4's int8 peak, i.e. the same ~13,000 "
        "cycles per kernel on both. 13000 cycles (9.2 us at 1410 MHz) is fit on published.json from a 4 us "
        "prior (validation.PRIORS) and cross-validated; what the harness adds per query is not separated. "
        "launch_overlap says how much of it a kernel's work hides; launch_cycles_pre_ampere scales it before "
        "Ampere",
    },
    "launch_overlap": {
        "value": {"tensorrt": 0.4},
        "source": "share of the GPU-side per-kernel cost that is a floor under the kernel's own work (CTA "
        "launch, pipeline fill and drain at a few tiles per SM), hidden when the work takes longer; the rest "
        "is the gap between dependent kernels, paid by every kernel. Batch-1 ResNet-50 on A100, A30 and L4 "
        "runs at the same cycles per kernel whatever the GPU's FLOPs (the floor), while on the 10-SM A2 its "
        "convolutions take longer than the floor and the published latency is their work plus a small gap. "
        "Fit on published.json from a prior of 0.5 (no measurement separates the two parts) and "
        "cross-validated, docs/cost-model.md round 5. Other engines launch from the host: 0 (not fitted)",
    },
    "launch_cycles_pre_ampere": {
        "value": 1.8,
        "source": "multiplier of launch_cycles on GPUs of compute capability below 8.0 (Volta, Turing). Ampere "
        "added an asynchronous copy from global to shared memory ('asynchronous copy can be done in the "
        "background while the SM is performing other computations', NVIDIA A100 Tensor Core GPU Architecture "
        "whitepaper, 3.3.8); CUTLASS's GEMM mainloops are 2-stage on sm70/sm75 and 3-stage (cp.async "
        "multistage) on sm80 (include/cutlass/gemm/device/default_gemm_configuration.h, kStages), so a "
        "kernel's fill and drain take more cycles before Ampere. Fit on T4's batch-1 ResNet-50 figures (24,000 "
        "cycles per kernel published against 13,000-15,000 on Ampere and Ada); Jetson AGX Xavier (Volta) "
        "checked out of sample, docs/cost-model.md round 5",
    },
    "l2_resident": {
        "value": {"activations": 0.5, "weights": 0.75},
        "source": "NVIDIA L2 caches are write-back and shared by all SMs (A100 whitepaper: 40 MB L2; Ada "
        "whitepaper: 48 MB on L4's AD104), so a tensor one kernel writes and the next reads stays on chip "
        "when it fits in a share of L2 (activations: half of it), and weights that fit in a share of L2 "
        "(weights: three quarters, the rest holds activations) stay resident across back-to-back runs "
        "(MLPerf SingleStream). TensorRT's docs note that on Ada and later smaller batches may improve L2 "
        "cache throughput (https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/performance/optimization.html). "
        "Bytes served by L2 are not priced as DRAM traffic. The shares are the model's choice, not measured",
    },
}


#: The factors fitted on published.json rather than taken from a measurement: validation.py cross-validates
#: them (leave one source out) and refits them on the training figures of each fold.
FITTED = (
    "gemm_efficiency.int8",
    "gemm_efficiency.fp8",
    "conv_efficiency",
    "launch_cycles.tensorrt",
    "launch_overlap.tensorrt",
    "launch_cycles_pre_ampere",
)


def factor(name: str) -> float:
    """A factor's value by dotted name (``conv_efficiency``, ``gemm_efficiency.int8``, ``launch_cycles.tensorrt``)."""
    head, _, key = name.partition(".")
    value = FACTORS[head]["value"]
    return float(value[key] if key else value)


@contextlib.contextmanager
def factors_set(values: Mapping[str, float]) -> Iterator[None]:
    """Prices with ``values`` (dotted names, as :func:`factor`) in place of the factors, restored on exit."""
    saved = {name: factor(name) for name in values}
    engines = dict(ENGINES)

    def put(name: str, value: float) -> None:
        head, _, key = name.partition(".")
        if key:
            FACTORS[head]["value"][key] = value
        else:
            FACTORS[head]["value"] = value
        if head in ("launch_us", "launch_cycles", "launch_overlap") and key in ENGINES:
            ENGINES[key] = replace(ENGINES[key], **{head: value})

    try:
        for name, value in values.items():
            put(name, value)
        yield
    finally:
        for name, value in saved.items():
            put(name, value)
        ENGINES.update(engines)


@dataclass(frozen=True)
class EngineProfile:
    """What one engine fuses and how much a kernel launch costs there.

    Attributes:
        fuse_pointwise: Elementwise ops, casts, transposes ride in a neighbouring kernel (GEMM epilogue,
            norm prologue) and cost nothing of their own.
        fuse_norms: A decomposed norm (ReduceMean, Pow, Sqrt, Div, Mul …) is one kernel (one read, one write).
        fused_attention: QKᵀ, softmax and PV are one kernel (FlashAttention / FMHA / SDPA).
        launch_us: Per-kernel host cost not hidden behind the previous kernel (CPU-launched kernels).
        launch_cycles: Per-kernel GPU-side cost in SM cycles (an engine enqueued as a whole): scales with the
            GPU's boost clock.
        launch_overlap: Share of the GPU-side cost that is a floor the kernel's own work hides (the rest is
            the gap between dependent kernels).
    """

    name: str
    fuse_pointwise: bool
    fuse_norms: bool
    fused_attention: bool
    launch_us: float
    launch_cycles: float = 0.0
    launch_overlap: float = 0.0

    def launch_s(self, gpu: GPUSpec) -> float:
        """Seconds each kernel costs on ``gpu`` with no work: host launch plus GPU-side cycles at the boost
        clock (at :data:`REFERENCE_CLOCK_MHZ` for a catalog entry without one)."""
        return self.launch_us * 1e-6 + self.gpu_launch_s(gpu)

    def gpu_launch_s(self, gpu: GPUSpec) -> float:
        """The GPU-side part of :meth:`launch_s`: ``launch_cycles`` at the boost clock, times
        ``launch_cycles_pre_ampere`` on GPUs without Ampere's asynchronous copy (compute capability < 8.0)."""
        clock = gpu.boost_clock_mhz or REFERENCE_CLOCK_MHZ
        scale = FACTORS["launch_cycles_pre_ampere"]["value"] if _before_ampere(gpu) else 1.0
        return self.launch_cycles * scale / (clock * 1e6)

    def floor_s(self, gpu: GPUSpec) -> float:
        """The share of the per-kernel cost that a kernel's own work hides (``launch_overlap``)."""
        return self.launch_overlap * self.gpu_launch_s(gpu)


def _before_ampere(gpu: GPUSpec) -> bool:
    """Compute capability below 8.0: no ``cp.async`` (the catalog holds it as MAJOR.MINOR, checked on load)."""
    return float(gpu.compute_capability) < 8.0


def _with_launch(work_s: float, launch_s: float, floor_s: float) -> float:
    """A kernel's seconds: its work, or the floor of the per-kernel cost where the work is shorter, plus the
    rest of that cost (the gap every kernel pays)."""
    return max(work_s, floor_s) + launch_s - floor_s


#: The clock at which a per-kernel cost in cycles is read when a catalog entry gives no boost clock: A100's
#: 1410 MHz (NVIDIA A100 Tensor Core GPU Architecture whitepaper), where launch_cycles was set.
REFERENCE_CLOCK_MHZ = 1410.0

ENGINES: dict[str, EngineProfile] = {
    # TensorRT / TensorRT-LLM: pointwise fusion into GEMM epilogues, norm plugins, FMHA / XQA attention.
    "tensorrt": EngineProfile(
        "tensorrt",
        fuse_pointwise=True,
        fuse_norms=True,
        fused_attention=True,
        launch_us=FACTORS["launch_us"]["value"]["tensorrt"],
        launch_cycles=FACTORS["launch_cycles"]["value"]["tensorrt"],
        launch_overlap=FACTORS["launch_overlap"]["value"]["tensorrt"],
    ),
    # ONNX Runtime CUDA after its transformer fusions (SkipLayerNorm, BiasGelu, MHA/GQA with rotary);
    # the remaining pointwise ops (SwiGLU's SiLU and Mul, casts) are kernels of their own.
    "onnxruntime": EngineProfile("onnxruntime", False, True, True, FACTORS["launch_us"]["value"]["onnxruntime"]),
    # Eager PyTorch: SDPA is fused, nothing else is.
    "torch": EngineProfile("torch", False, False, True, FACTORS["launch_us"]["value"]["torch"]),
    # llama.cpp's CUDA backend (2024): one kernel per ggml op, C++ launches, no CUDA graphs yet.
    "llama.cpp": EngineProfile("llama.cpp", False, False, True, FACTORS["launch_us"]["value"]["llama.cpp"]),
}


@dataclass(frozen=True)
class Kernel:
    """One launched kernel, after fusion.

    ``kind`` is ``gemm``, ``conv``, ``attention``, ``norm``, ``pointwise``, ``data`` or ``other``;
    ``m``, ``n``, ``k`` are the GEMM's (M = tokens or output pixels); ``bytes`` are at the precision priced.
    ``group`` is the layer type the report sums under (``attention``, ``mlp``, ``norm``, ``embedding``,
    ``lm_head``, ``conv`` …).
    """

    name: str
    kind: str
    group: str
    flops: float
    bytes: float
    m: int = 0
    n: int = 0
    k: int = 0
    sparse: bool = False
    weight_bytes: float = 0.0


@dataclass(frozen=True)
class KernelTime:
    """One kernel's price: ``ms`` in all; ``launch_ms`` is the per-kernel cost its work did not hide."""

    name: str
    kind: str
    group: str
    ms: float
    compute_ms: float
    memory_ms: float
    launch_ms: float
    binding: str


@dataclass
class CostPrediction:
    """Latency of one workload on one GPU with one engine, with the ideal roofline as a lower bound."""

    gpu: str
    engine: str
    precision: str
    latency_ms: float
    lower_bound_ms: float
    compute_ms: float
    memory_ms: float
    launch_ms: float
    kernels: int
    binding: str
    binding_by_group: dict[str, str]
    ms_by_group: dict[str, float]
    sparse_used: bool = False
    detail: list[KernelTime] = field(default_factory=list)

    def as_dict(self, *, detail: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not detail:
            out.pop("detail")
        return out


def _engine(name: str) -> EngineProfile:
    try:
        return ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine '{name}'; the cost model knows {', '.join(ENGINES)}") from None


def gemm_utilisation(
    m: int, n: int, k: int, sm_count: int, *, tile: int | None = None, splits: int | None = None
) -> float:
    """Share of the GPU's tensor-core time a GEMM uses: its MACs over the MACs of the tiles it occupies.

    The output is cut into ``tile``² CTA tiles (a dimension of at most half a tile gets a half-wide tile, as
    CUTLASS/cuBLAS pick 64-wide tiles there); a partial tile costs a whole one (tile quantisation); tiles run
    in waves of ``sm_count`` (wave quantisation, the last wave partly idle). ``splits`` cuts K into that many
    slices (split-K, at least ``FACTORS["split_k"]`` of K each); ``None`` takes the best of
    :func:`split_counts`, as if the split were free — :func:`price` charges each split its reduction kernel
    and picks the split that finishes soonest *with* it. Returns 1.0 without an SM count.

    Time is ``MACs / (peak · efficiency · utilisation)``, i.e. waves × the time of one tile's K on one SM, so
    it never falls when M, N or K grows: a narrower layer is never priced slower (tile quantisation can make it
    cost the same).
    """
    if sm_count <= 0 or m <= 0 or n <= 0 or k <= 0:
        return 1.0
    tile = tile or FACTORS["tile"]["value"]
    if splits is None:
        return max(_tile_use(m, n, k, sm_count, tile, s) for s in split_counts(m, n, sm_count, tile=tile))
    return _tile_use(m, n, k, sm_count, tile, splits)


def split_counts(m: int, n: int, sm_count: int, *, tile: int | None = None) -> range:
    """The K splits a GEMM may run with: 1 to 16 when its output tiles cannot fill the SMs, else 1.

    More tiles never allow more splits, so the fastest choice never falls when M or N grows.
    """
    if sm_count <= 0 or m <= 0 or n <= 0:
        return range(1, 2)
    tile = tile or FACTORS["tile"]["value"]
    half = tile // 2
    tiles = math.ceil(m / (half if m <= half else tile)) * math.ceil(n / (half if n <= half else tile))
    return range(1, (_MAX_SPLIT if tiles < sm_count else 1) + 1)


@functools.lru_cache(maxsize=65536)
def _tile_use(m: int, n: int, k: int, sm_count: int, tile: int, splits: int) -> float:
    half = tile // 2
    tm = half if m <= half else tile
    tn = half if n <= half else tile
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    k_floor = min(k, FACTORS["split_k"]["value"])
    # Each split's cost grows with M, N and K, so a narrower GEMM is never slower at any split count.
    slots = math.ceil(tiles * splits / sm_count) * max(k / splits, k_floor)
    return (m * n * k) / (slots * tm * tn * sm_count)


_MAX_SPLIT = 16


def sparse_gain(m: int) -> float:
    """Measured 2:4 speedup of a GEMM's math at M rows: 1.0 up to M = 64, log-linear to 1.3 at M = 16384."""
    spec = FACTORS["sparse_gain"]["value"]
    if m <= spec["small_m"]:
        return 1.0
    t = min(1.0, math.log2(m / spec["small_m"]) / math.log2(spec["large_m"] / spec["small_m"]))
    return 1.0 + (spec["max_gain"] - 1.0) * t


def _peaks(gpu: GPUSpec, precision: str) -> tuple[float, float]:
    """(GEMM peak, attention peak) in FLOP/s. Attention runs at fp16 when GEMMs are fp8/int8 (FMHA inputs)."""
    gemm = gpu.gemm_peak(precision)
    attn_prec = precision if precision in ("fp32", "tf32", "fp16", "bf16") else "fp16"
    attn = gpu.gemm_peak(attn_prec) if gpu.supports(attn_prec) else gemm
    return gemm, attn


@dataclass(frozen=True)
class _Rates:
    """What :func:`price` reads for every kernel of one call: peaks, efficiencies, per-kernel costs."""

    gpu: GPUSpec
    precision: str
    gemm_peak: float
    attn_peak: float
    vector_peak: float
    bandwidth: float
    bw_eff: float
    gemm_eff: float
    conv_eff: float
    attn_eff: float
    launch_s: float
    floor_s: float

    @classmethod
    def of(cls, gpu: GPUSpec, precision: str, profile: EngineProfile) -> _Rates:
        gemm_peak, attn_peak = _peaks(gpu, precision)
        return cls(
            gpu, precision, gemm_peak, attn_peak, gpu.cuda_fp32_tflops * 1e12, gpu.memory_bandwidth_gbs * 1e9,
            FACTORS["bandwidth_efficiency"]["value"], FACTORS["gemm_efficiency"]["value"][precision],
            FACTORS["conv_efficiency"]["value"], FACTORS["attention_efficiency"]["value"], profile.launch_s(gpu),
            profile.floor_s(gpu),
        )  # fmt: skip


@dataclass(frozen=True)
class _KernelPrice:
    ms: float
    compute_ms: float
    memory_ms: float
    launch_ms: float
    binding: str
    ideal_s: float  # the kernel's ideal roofline time (the lower bound's share)
    reductions: int  # split-K reduction kernels it adds
    sparse_used: bool


def _price_kernel(kern: Kernel, dram_bytes: float, rates: _Rates) -> _KernelPrice:
    """One kernel's time: its work (compute or DRAM, and a split GEMM's reduction), the per-kernel cost, the
    floor of it that the work hides (FACTORS["launch_overlap"]) and the binding resource."""
    gpu, precision = rates.gpu, rates.precision
    memory = dram_bytes / (rates.bandwidth * rates.bw_eff)
    reduce_memory, reduce_kernels, sparse_used = 0.0, 0, False
    if kern.kind in ("gemm", "conv"):
        rate = rates.gemm_peak * (rates.conv_eff if kern.kind == "conv" else rates.gemm_eff)
        ideal_rate = rates.gemm_peak
        if kern.sparse and gpu.has_sparse(precision) and kern.k % 4 == 0:
            ideal_rate = gpu.gemm_peak(precision, sparse=True)  # the ideal never waits for a tactic
        if kern.sparse and sparse_tactic_reason(kern, gpu, precision) is None:
            gain = sparse_gain(kern.m)
            sparse_used = gain > 1.0
            rate *= gain
        if kern.kind == "gemm":
            compute, reduce_memory, splits = _fastest_split(kern, gpu, rate, memory, rates.launch_s, rates.floor_s)
            reduce_kernels = int(splits > 1)
        else:  # implicit-GEMM convs keep the free split (FACTORS["split_k_reduction"])
            compute = kern.flops / (rate * gemm_utilisation(kern.m, kern.n, kern.k, gpu.sm_count))
    elif kern.kind == "attention":
        rate, ideal_rate = rates.attn_peak * rates.attn_eff, rates.attn_peak
        compute = kern.flops / rate if kern.flops else 0.0
    else:
        rate, ideal_rate = rates.vector_peak * 0.5, rates.vector_peak
        compute = kern.flops / rate if kern.flops else 0.0
    ideal_s = max(kern.flops / ideal_rate if kern.flops else 0.0, dram_bytes / rates.bandwidth)
    body = max(compute, memory) + reduce_memory
    launch = rates.launch_s * (1 + reduce_kernels)
    binding = "launch" if launch > body else ("compute" if compute > memory else "memory")
    total = _with_launch(body, launch, rates.floor_s)
    return _KernelPrice(
        total * 1e3, compute * 1e3, (memory + reduce_memory) * 1e3, (total - body) * 1e3, binding, ideal_s,
        reduce_kernels, sparse_used,
    )  # fmt: skip


def price(
    kernels: Iterable[Kernel],
    gpu: GPUSpec,
    *,
    precision: str = "fp16",
    engine: str = "tensorrt",
    detail: bool = False,
) -> CostPrediction:
    """Latency of ``kernels`` on ``gpu`` with ``engine``'s launch cost; see the module docstring.

    ``lower_bound_ms`` is the ideal roofline of the same kernels (peak rates, perfect overlap, no launch):
    the prediction never goes below it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    profile = _engine(engine)
    rates = _Rates.of(gpu, precision, profile)
    kernels = list(kernels)
    times: list[KernelTime] = []
    lower = 0.0
    sparse_used = False
    reductions = 0
    seen: dict[tuple, _KernelPrice] = {}  # a decoder's layers repeat: price each distinct kernel once
    for kern, dram_bytes in zip(kernels, _dram_bytes(kernels, gpu), strict=True):
        key = (kern.kind, kern.flops, kern.m, kern.n, kern.k, kern.sparse, dram_bytes)
        priced = seen.get(key)
        if priced is None:
            priced = seen[key] = _price_kernel(kern, dram_bytes, rates)
        sparse_used |= priced.sparse_used
        reductions += priced.reductions
        lower += priced.ideal_s
        times.append(
            KernelTime(
                kern.name, kern.kind, kern.group, priced.ms, priced.compute_ms, priced.memory_ms, priced.launch_ms,
                priced.binding,
            )
        )  # fmt: skip
    by_group: dict[str, dict[str, float]] = {}
    for t in times:
        acc = by_group.setdefault(t.group, {"ms": 0.0, "compute": 0.0, "memory": 0.0, "launch": 0.0})
        acc["ms"] += t.ms
        acc[t.binding] += t.ms
    binding_by_group = {g: max(("compute", "memory", "launch"), key=lambda b: v[b]) for g, v in by_group.items()}
    totals = {"compute": 0.0, "memory": 0.0, "launch": 0.0}
    for t in times:
        totals[t.binding] += t.ms
    latency = sum(t.ms for t in times)
    return CostPrediction(
        gpu=gpu.key,
        engine=profile.name,
        precision=precision,
        latency_ms=max(latency, lower * 1e3),
        lower_bound_ms=lower * 1e3,
        compute_ms=sum(t.compute_ms for t in times),
        memory_ms=sum(t.memory_ms for t in times),
        launch_ms=sum(t.launch_ms for t in times),
        kernels=len(times) + reductions,
        binding=max(totals, key=totals.get) if times else "memory",
        binding_by_group=binding_by_group,
        ms_by_group={g: v["ms"] for g, v in by_group.items()},
        sparse_used=sparse_used,
        detail=times if detail else [],
    )


def _fastest_split(
    kern: Kernel, gpu: GPUSpec, rate: float, memory: float, launch_s: float, floor_s: float = 0.0
) -> tuple[float, float, int]:
    """(compute seconds, reduction DRAM seconds, splits) of the K split that finishes soonest, its reduction
    included; ``floor_s`` is the per-kernel floor the work hides (a split that only shortens work under the
    floor buys nothing).

    A split-K GEMM writes each slice's fp32 partial sums to a workspace and a second kernel sums them
    (cuBLAS: the GEMM plus ``cublasLt::splitKreduce_kernel``; CUTLASS: ``GemmSplitKParallel`` plus
    ``ReduceSplitK``; FACTORS["split_k_reduction"]): one more per-kernel cost, and the partials' traffic
    (written, then read) where they do not fit in the L2 share that keeps activations on chip. Every choice's
    cost grows with M, N and K, so the soonest one does too (a narrower GEMM is never slower).
    """
    flops = kern.flops
    if not flops:
        return 0.0, 0.0, 1
    share = FACTORS["l2_resident"]["value"]["activations"] * (gpu.l2_mb or 0.0) * 1e6
    bandwidth = gpu.memory_bandwidth_gbs * 1e9 * FACTORS["bandwidth_efficiency"]["value"]
    partial = FACTORS["split_k_reduction"]["value"]["partial_bytes"] * kern.m * kern.n
    best: tuple[float, float, int] | None = None
    best_time = math.inf
    for splits in split_counts(kern.m, kern.n, gpu.sm_count):
        compute = flops / (rate * gemm_utilisation(kern.m, kern.n, kern.k, gpu.sm_count, splits=splits))
        reduce_memory = 0.0
        if splits > 1 and splits * partial > share:
            reduce_memory = 2 * splits * partial / bandwidth
        total = _with_launch(max(compute, memory) + reduce_memory, launch_s * (1 + (splits > 1)), floor_s)
        if total < best_time:
            best_time, best = total, (compute, reduce_memory, splits)
    assert best is not None
    return best


def _dram_bytes(kernels: list[Kernel], gpu: GPUSpec) -> list[float]:
    """Each kernel's bytes that reach DRAM: all of them, less what the GPU's L2 keeps on chip.

    Weights stay resident across back-to-back runs when all of them fit in ``l2_resident.weights`` of L2;
    a kernel's activations (its bytes less its weights) stay on chip when they fit in
    ``l2_resident.activations`` of L2 (the producer's write-back L2 still holds them). A GPU without an
    ``l2_mb`` in the catalog keeps nothing on chip.
    """
    if not gpu.l2_mb:
        return [k.bytes for k in kernels]
    share = FACTORS["l2_resident"]["value"]
    l2 = gpu.l2_mb * 1e6
    weights_resident = sum(k.weight_bytes for k in kernels) <= share["weights"] * l2
    out = []
    for k in kernels:
        activations = max(0.0, k.bytes - k.weight_bytes)
        out.append(
            (0.0 if weights_resident else k.weight_bytes)
            + (0.0 if activations <= share["activations"] * l2 else activations)
        )
    return out


def _rounded_down(kernel: Kernel, multiple: int) -> Kernel:
    """``kernel`` with N and K cut to a multiple of ``multiple`` (FLOPs and bytes scaled with them)."""
    n = max(multiple, kernel.n // multiple * multiple) if kernel.n > multiple else kernel.n
    k = max(multiple, kernel.k // multiple * multiple) if kernel.k > multiple else kernel.k
    if (n, k) == (kernel.n, kernel.k):
        return kernel
    scale = (n * k) / (kernel.n * kernel.k)
    moved = kernel.bytes * min(1.0, max(n / kernel.n, k / kernel.k))
    return replace(kernel, flops=kernel.flops * scale, bytes=moved, n=n, k=k, weight_bytes=kernel.weight_bytes * scale)


def sparse_tactic_reason(kernel: Kernel, gpu: GPUSpec, precision: str) -> str | None:
    """Why TensorRT runs a 2:4 GEMM with its dense tactic on ``gpu``, or ``None`` when a sparse tactic applies.

    The rules (docs/cost-model.md): sparse tensor cores at the precision (gpus.toml), K a multiple of 4 (2:4
    groups run along K), and more than ``sparse_gain.small_m`` rows, below which no 2:4 gain was measured and
    TensorRT's timing picks the dense tactic.
    """
    if not gpu.has_sparse(precision):
        return f"{gpu.key} has no 2:4 sparse tensor cores at {precision}"
    if kernel.k % 4:
        return f"K = {kernel.k} is not a multiple of 4"
    small = FACTORS["sparse_gain"]["value"]["small_m"]
    if kernel.m <= small:
        return f"M = {kernel.m} rows <= {small}, where TensorRT picks the dense tactic (no measured 2:4 gain)"
    return None


def sparse_eligibility(kernels: Iterable[Kernel], gpu: GPUSpec, precision: str) -> dict[str, Any]:
    """Which GEMMs are 2:4, which of them get sparse tactics on ``gpu``, and why the others run dense.

    Returns ``{"sparse_tactics": [names], "dense_tactics": {reason: [names]}, "not_2of4": [names]}``.
    """
    out: dict[str, Any] = {"sparse_tactics": [], "dense_tactics": {}, "not_2of4": []}
    for kernel in kernels:
        if kernel.kind not in ("gemm", "conv"):
            continue
        if not kernel.sparse:
            out["not_2of4"].append(kernel.name)
            continue
        reason = sparse_tactic_reason(kernel, gpu, precision)
        if reason is None:
            out["sparse_tactics"].append(kernel.name)
        else:
            out["dense_tactics"].setdefault(reason, []).append(kernel.name)
    return out


def _by_group(names: list[str], groups: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[groups[name]] = counts.get(groups[name], 0) + 1
    return ", ".join(f"{group} {n}" for group, n in sorted(counts.items()))


def _sparse_note(
    reference: list[Kernel], compiled: list[Kernel], gpu: GPUSpec, precision: str, ref: Any, new: Any
) -> str | None:
    """What 2:4 buys: how many GEMMs are 2:4, which of them get sparse tactics (per layer type) and why the
    others run dense (:func:`sparse_tactic_reason`), and which GEMMs are not 2:4."""
    sparse = [k for k in compiled if k.sparse and k.kind in ("gemm", "conv")]
    if not sparse or any(k.sparse for k in reference):
        return None
    gemms = sum(k.kind in ("gemm", "conv") for k in compiled)
    groups = {k.name: k.group for k in compiled}
    split = sparse_eligibility(compiled, gpu, precision)
    parts = []
    if split["sparse_tactics"]:
        fast = split["sparse_tactics"]
        fast_names = set(fast)
        m = max(k.m for k in sparse if k.name in fast_names)
        parts.append(
            f"sparse tactics at M = {m} on {len(fast)} ({_by_group(fast, groups)}), "
            f"{sparse_gain(m):.2f}x on the GEMMs' math only (weights read dense)"
        )
        hidden = [t.name for t in new.detail if t.name in fast_names and t.binding == "launch"]
        if hidden:
            parts.append(
                f"{len(hidden)} of those launch-bound: their work hides under the per-kernel cost, "
                "which 2:4 does not shorten"
            )
    for reason, names in split["dense_tactics"].items():
        parts.append(f"dense tactics on {len(names)} ({_by_group(names, groups)}): {reason}")
    if split["not_2of4"]:
        parts.append(f"not 2:4: {_by_group(split['not_2of4'], groups)}")
    head = f"2:4 on {len(sparse)} of {gemms} GEMMs ({ref.latency_ms / new.latency_ms:.2f}x, FLOPs unchanged)"
    return f"{head}: " + "; ".join(parts)


def explain_gain(
    reference: list[Kernel],
    compiled: list[Kernel],
    gpu: GPUSpec,
    *,
    precision: str = "fp16",
    engine: str = "tensorrt",
    realised_below: float = 0.5,
) -> str | None:
    """Why pruning buys less than its FLOP ratio on ``gpu``, or ``None`` when it buys at least
    ``realised_below`` of it (or nothing was removed).

    The prediction never rises when kernels shrink (:func:`gemm_utilisation`); it can stay flat. The causes
    named: launch-bound (a fixed cost per kernel that pruning does not remove), tile quantisation (widths that
    are not multiples of the 128/64 tile: the partial tile costs a whole one; the saving of rounding them down
    and the ``prune --round-to`` that gets it), too few tiles to fill the SMs (narrowing idles SMs rather than
    shortening the kernel), and the share of the time in parts pruning left alone.
    """
    ref = price(reference, gpu, precision=precision, engine=engine)
    new = price(compiled, gpu, precision=precision, engine=engine, detail=True)
    ref_flops, new_flops = sum(k.flops for k in reference), sum(k.flops for k in compiled)
    sparse = _sparse_note(reference, compiled, gpu, precision, ref, new)
    if not new_flops or ref_flops <= new_flops * 1.01:
        return sparse
    ideal, speedup = ref_flops / new_flops, ref.latency_ms / new.latency_ms
    realised = (speedup - 1.0) / (ideal - 1.0)
    if realised >= realised_below:
        return sparse
    causes = [sparse] if sparse else []
    bound = [t for t in new.detail if t.binding == "launch"]
    bound_ms = sum(t.ms for t in bound)
    if bound_ms >= 0.25 * new.latency_ms:
        causes.append(
            f"launch-bound: {len(bound)} of {len(new.detail)} kernels take the per-kernel cost "
            f"({_engine(engine).launch_s(gpu) * 1e6:.3g} us) rather than their work, {bound_ms:.3g} ms of "
            f"{new.latency_ms:.3g} ms: a cost that narrower kernels keep"
        )
    gemms = [k for k in compiled if k.kind in ("gemm", "conv")]
    gemm_ids = {id(k) for k in gemms}
    odd = sorted({w for k in gemms for w in (k.n, k.k) if w > 64 and w % 64})
    if odd:
        for multiple in (128, 64):
            cut = price([_rounded_down(k, multiple) if id(k) in gemm_ids else k for k in compiled], gpu,
                        precision=precision, engine=engine)  # fmt: skip
            saving = 1.0 - cut.latency_ms / new.latency_ms
            if saving >= 0.01:
                shown = ", ".join(str(w) for w in odd[:4]) + (" ..." if len(odd) > 4 else "")
                causes.append(
                    f"tile quantisation: widths {shown} are not multiples of {multiple}, and a partial tile costs "
                    f"a whole one; rounding them down saves {100 * saving:.0f}% (prune --round-to {multiple})"
                )
                break
    tile = FACTORS["tile"]["value"]
    by_name = {t.name: t for t in new.detail}
    gemm_ms = sum(by_name[k.name].ms for k in gemms if k.name in by_name)
    few = [k for k in gemms if math.ceil(k.m / tile) * math.ceil(k.n / tile) < gpu.sm_count]
    few_ms = sum(by_name[k.name].ms for k in few if k.name in by_name)
    if gemm_ms and few_ms >= 0.5 * gemm_ms:
        causes.append(
            f"too few tiles: {len(few)} of {len(gemms)} GEMMs have fewer {tile}x{tile} output tiles than the "
            f"{gpu.sm_count} SMs, so narrowing them idles SMs instead of shortening them"
        )
    ref_group: dict[str, float] = {}
    new_group: dict[str, float] = {}
    for kernel in reference:
        ref_group[kernel.group] = ref_group.get(kernel.group, 0.0) + kernel.flops + kernel.bytes
    for kernel in compiled:
        new_group[kernel.group] = new_group.get(kernel.group, 0.0) + kernel.flops + kernel.bytes
    same = [g for g in new.ms_by_group if abs(new_group.get(g, 0.0) - ref_group.get(g, 0.0)) <= 1e-6 * new_group[g]]
    same_ms = sum(new.ms_by_group[g] for g in same)
    if same and same_ms >= 0.4 * new.latency_ms:
        causes.append(f"unpruned parts ({', '.join(sorted(same))}) take {100 * same_ms / new.latency_ms:.0f}%")
    if not causes:
        causes.append(f"the removed work was {new.binding}-bound")
    head = f"{speedup:.2f}x of an ideal {ideal:.2f}x"
    return f"{head}: " + "; ".join(causes)


def compute_bound_batch(
    build: Any, gpu: GPUSpec, *, precision: str = "fp16", engine: str = "tensorrt", limit: int = 8192
) -> int | None:
    """Smallest batch at which the decode step's GEMMs turn compute-bound on ``gpu`` (``None``: not by ``limit``).

    ``build(batch)`` returns the step's kernels. Searched over powers of two, then bisected.
    """

    def compute_bound(batch: int) -> bool:
        pred = price([k for k in build(batch) if k.kind == "gemm"], gpu, precision=precision, engine=engine)
        return pred.compute_ms > pred.memory_ms

    batch = 1
    while not compute_bound(batch):
        batch *= 2
        if batch > limit:
            return None
    low, high = batch // 2, batch
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if compute_bound(mid) else (mid, high)
    return high if low < 1 or not compute_bound(low) else low


# -- from an exported graph's per-node costs ---------------------------------------------------------------


def _group_of(layer: str, op_kind: str) -> str:
    name = layer.lower()
    if op_kind == "attention" or "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "ffn" in name or "feed_forward" in name or "intermediate" in name:
        return "mlp"
    if "embed" in name:
        return "embedding"
    if "lm_head" in name or "classifier" in name:
        return "lm_head"
    return op_kind


def _float_scale(node: Any, itemsize: float) -> float:
    """Bytes at ``itemsize`` per byte at the model's float dtype (1 when the node moves no floats)."""
    if not node.float_elements or not node.float_bytes:
        return 1.0
    return itemsize / (node.float_bytes / node.float_elements)


def _gemm_shape(node: Any) -> tuple[int, int, int]:
    """M, N, K of a weight GEMM or conv from its per-node costs (which keep no axes).

    FLOPs = 2·M·N·K, output elements = M·N and weights = N·K (+ N for a bias) give K = FLOPs / 2·outputs,
    then N and M. When they do not agree (a quantised or unusual node) N ≈ K ≈ √weights is the fallback.
    """
    weights = node.weight_float_elements
    elem = node.float_bytes / node.float_elements if node.float_elements and node.float_bytes else 0
    out = node.bytes_written / elem if elem else 0
    if node.flops and out >= 1:
        k = max(1, round(node.flops / (2 * out)))
        n = round(weights / k)
        if n * k != weights and weights % (k + 1) == 0:
            n = weights // (k + 1)  # a bias of N values rides with the weight
        m = round(out / n) if n else 0
        if m >= 1 and n >= 1 and abs(2 * m * n * k - node.flops) <= 0.02 * node.flops:
            return m, n, k
    m = max(1, round(node.flops / (2 * weights))) if node.flops else 1
    side = max(1, round(math.sqrt(weights)))
    return m, side, side


def kernels_from_cost(cost: Any, *, precision: str = "fp16", engine: str = "tensorrt") -> list[Kernel]:
    """Kernels an engine launches for an exported graph, from its per-node costs.

    Fusion rules (see :class:`EngineProfile`): weight GEMMs and convs are kernels (M = FLOPs / 2·weights,
    N ≈ K ≈ √weights, since per-node costs keep no axes); pairs of activation×activation MatMuls in a layer
    are one attention kernel (traffic: Q, K, V, O; the score matrix and the softmax between them stay on
    chip); Gathers from an embedding read only the rows they gather; pointwise and data ops are free when the
    engine fuses them; a ReduceMean (decomposed norm) is one norm kernel when the engine fuses norms.
    """
    itemsize = PRECISIONS[precision]
    profile = _engine(engine)
    nodes = [n for n in cost.nodes if n.is_kernel]
    kernels: list[Kernel] = []
    open_attention: dict[str, Any] = {}
    for node in nodes:
        moved = node.bytes_at(itemsize)
        weights = node.weight_float_elements
        if node.kind in ("matmul", "conv") and weights:
            m, n, k = _gemm_shape(node)
            kind = "conv" if node.kind == "conv" else "gemm"
            kernels.append(
                Kernel(
                    node.name, kind, _group_of(node.layer, kind), node.flops, moved, m, n, k,
                    sparse=bool(node.sparsity), weight_bytes=weights * itemsize,
                )
            )  # fmt: skip
            continue
        if node.kind == "matmul" and profile.fused_attention:
            first = open_attention.pop(node.layer, None)
            if first is None:
                open_attention[node.layer] = node
                continue
            s1, s2 = _float_scale(first, itemsize), _float_scale(node, itemsize)
            scores = first.bytes_written * s1
            fused = first.bytes_read * s1 + max(0.0, node.bytes_read * s2 - scores) + node.bytes_written * s2
            kernels.append(
                Kernel(f"{first.name}+{node.name}", "attention", "attention", first.flops + node.flops, fused)
            )
            continue
        if node.op_type in FUSED_ATTENTION:
            kernels.append(Kernel(node.name, "attention", "attention", node.flops, moved))
            continue
        if node.op_type == "Softmax" and node.layer in open_attention:
            continue  # inside the fused attention kernel
        if node.op_type == "Gather" and node.weight_bytes:
            rows = node.bytes_written * _float_scale(node, itemsize)
            kernels.append(Kernel(node.name, "data", "embedding", 0, 2 * rows))
            continue
        if node.kind == "normalization" or (node.kind == "reduction" and profile.fuse_norms):
            kernels.append(Kernel(node.name, "norm", "norm", node.flops, moved if node.kind == "normalization"
                                  else 2 * (node.bytes_at(itemsize) - node.bytes_written)))  # fmt: skip
            continue
        if profile.fuse_pointwise and node.kind in ("elementwise", "data", "reduction"):
            continue
        if profile.fuse_norms and node.kind == "elementwise" and node.op_type in ("Pow", "Sqrt", "Reciprocal"):
            continue  # the rest of a decomposed norm, inside the norm kernel
        kind = "pointwise" if node.kind == "elementwise" else node.kind
        kernels.append(Kernel(node.name, kind, _group_of(node.layer, kind), node.flops, moved))
    for leftover in open_attention.values():  # an unpaired activation MatMul is a plain batched GEMM
        kernels.append(Kernel(leftover.name, "attention", "attention", leftover.flops, leftover.bytes_at(itemsize)))
    return kernels
