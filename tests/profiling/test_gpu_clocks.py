"""Boost clocks and L2 sizes in the GPU catalog, and what the cost model does with them (per-kernel cycles,
on-chip reuse, 2:4 sparse-tactic eligibility)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prune2deploy.errors import ConfigError
from prune2deploy.profiling.costmodel import (
    ENGINES,
    FACTORS,
    Kernel,
    explain_gain,
    price,
    sparse_eligibility,
    sparse_tactic_reason,
)
from prune2deploy.profiling.roofline import load_catalog
from prune2deploy.profiling.shape_only import model_kernels, shape_from_config

#: FP32 lanes per SM: Volta (7.2), GA100 (8.0) and Turing (7.5) have 64, Hopper, Ada and GA10x 128 (the architecture
#: whitepapers cited in gpus.toml).
LANES = {"7.2": 64, "7.5": 64, "8.0": 64, "8.6": 128, "8.7": 128, "8.9": 128, "9.0": 128}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_every_clock_agrees_with_the_datasheet_fp32_figure(catalog):
    """FP32 TFLOPS = SMs x lanes x 2 x boost clock: the clock and the already sourced figures agree (1.5%)."""
    for spec in catalog.values():
        assert spec.boost_clock_mhz > 0 and spec.sources["boost_clock_mhz"], spec.key
        fp32 = spec.sm_count * LANES[spec.compute_capability] * 2 * spec.boost_clock_mhz * 1e6 / 1e12
        assert fp32 == pytest.approx(spec.cuda_fp32_tflops, rel=0.015), spec.key


def test_l2_sizes_of_the_validated_gpus(catalog):
    expected = {"a100-40gb": 40, "a30": 24, "l4": 48, "t4": 4, "h100-sxm": 50, "jetson-agx-orin-64gb": 4, "a2": 2}
    assert {key: catalog[key].l2_mb for key in expected} == expected
    assert all(catalog[key].sources["l2_mb"] for key in expected)


def test_a_clock_without_a_source_is_refused(tmp_path):
    path = tmp_path / "gpus.toml"
    path.write_text(_toy("boost_clock_mhz = 1500\n", ""))
    with pytest.raises(ConfigError, match=r"GPU 'toy', field 'sources.boost_clock_mhz': missing"):
        load_catalog(path)
    path.write_text(_toy("l2_mb = -1\n", 'l2_mb = "x"\n'))
    with pytest.raises(ConfigError, match=r"field 'l2_mb': must be a positive number"):
        load_catalog(path)
    # the cost model reads the GPU generation from the compute capability: a form it cannot read is refused
    path.write_text(_toy("", "").replace('compute_capability = "8.0"', 'compute_capability = "sm_75"'))
    with pytest.raises(ConfigError, match=r"field 'compute_capability': must be MAJOR.MINOR like '8.9', got 'sm_75'"):
        load_catalog(path)


def _toy(extra: str, extra_source: str) -> str:
    names = ("tensor_tflops", "sparse_tensor_tflops", "cuda_fp32_tflops", "memory_gb", "memory_bandwidth_gbs")
    sources = "".join(f'{name} = "test"\n' for name in (*names, "compute_capability"))
    return (
        '[gpus.toy]\nname = "Toy"\narchitecture = "Test"\ncompute_capability = "8.0"\nmemory_gb = 16\n'
        "memory_bandwidth_gbs = 1000\ncuda_fp32_tflops = 10\nsparse_tensor_cores = false\n"
        "tensor_tflops = { fp16 = 100 }\nsparse_tensor_tflops = {}\n"
        + extra
        + "[gpus.toy.sources]\n"
        + sources
        + extra_source
    )


def test_per_kernel_cost_is_cycles_at_the_boost_clock(catalog):
    """TensorRT's per-kernel cost is FACTORS['launch_cycles'] at each GPU's clock: a GPU at twice the clock
    pays half of it per kernel; an entry without a clock is read at A100's 1410 MHz."""
    cycles = FACTORS["launch_cycles"]["value"]["tensorrt"]
    empty = [Kernel(f"k{i}", "pointwise", "norm", 0.0, 0.0) for i in range(10)]
    a100 = catalog["a100-sxm-80gb"]
    fast = replace(a100, boost_clock_mhz=2 * a100.boost_clock_mhz)
    assert price(empty, a100).launch_ms == pytest.approx(10 * cycles / 1410e6 * 1e3)
    assert price(empty, fast).launch_ms == pytest.approx(price(empty, a100).launch_ms / 2)
    assert price(empty, replace(a100, boost_clock_mhz=0.0)).launch_ms == price(empty, a100).launch_ms
    # engines launched from the CPU keep a cost in microseconds, whatever the clock
    assert price(empty, fast, engine="torch").launch_ms == pytest.approx(10 * 8e-3)


def test_gpus_before_ampere_pay_more_cycles_per_kernel(catalog):
    """No asynchronous copy before Ampere (compute capability < 8.0): T4 (7.5) and Jetson AGX Xavier (7.2) pay
    FACTORS['launch_cycles_pre_ampere'] times the cycles per kernel; Ampere and later do not."""
    trt, cycles = ENGINES["tensorrt"], FACTORS["launch_cycles"]["value"]["tensorrt"]
    scale = FACTORS["launch_cycles_pre_ampere"]["value"]
    assert scale > 1.0
    for key in ("t4", "jetson-agx-xavier"):
        gpu = catalog[key]
        assert trt.launch_s(gpu) == pytest.approx(scale * cycles / (gpu.boost_clock_mhz * 1e6))
    for key in ("a100-40gb", "a2", "jetson-agx-orin-64gb", "l4", "h100-sxm"):
        gpu = catalog[key]
        assert trt.launch_s(gpu) == pytest.approx(cycles / (gpu.boost_clock_mhz * 1e6))
    assert trt.launch_s(replace(catalog["t4"], compute_capability="8.0")) * scale == trt.launch_s(catalog["t4"])


def test_a_kernels_work_hides_the_floor_not_the_gap(catalog):
    """Of the per-kernel cost, ``launch_overlap`` is a floor under the kernel's work and the rest a gap: a
    kernel with little work costs the whole per-kernel cost, one with more work costs its work plus the gap."""
    a100 = catalog["a100-sxm-80gb"]
    launch = ENGINES["tensorrt"].launch_s(a100)
    overlap = FACTORS["launch_overlap"]["value"]["tensorrt"]
    assert 0.0 < overlap < 1.0
    bandwidth = a100.memory_bandwidth_gbs * 1e9 * FACTORS["bandwidth_efficiency"]["value"]
    no_l2 = replace(a100, l2_mb=0.0)

    def copy_s(seconds):  # a pointwise kernel streaming ``seconds`` of DRAM traffic
        return price([Kernel("copy", "pointwise", "norm", 0.0, seconds * bandwidth)], no_l2).latency_ms * 1e-3

    short, long = 0.2 * overlap * launch, 3 * launch
    assert copy_s(short) == pytest.approx(launch)
    assert copy_s(long) == pytest.approx(long + (1 - overlap) * launch)
    assert copy_s(0.0) <= copy_s(short) <= copy_s(overlap * launch) <= copy_s(long)  # never falls with work
    # engines launched from the host keep their whole cost: nothing fitted says how much of it a kernel hides
    assert ENGINES["torch"].launch_overlap == 0.0


def test_weights_stay_in_l2_only_when_they_fit(catalog):
    """ResNet-50 int8 at batch 1: 25 MB of weights fit in 3/4 of A100's 40 MB L2 (no DRAM term) but not in
    A30's 24 MB; without an L2 size every byte is DRAM traffic."""
    kernels = model_kernels(shape_from_config({"model_type": "resnet"}), batch=1, precision="int8")
    weights = sum(k.weight_bytes for k in kernels)
    assert 24e6 * 0.75 < weights < 40e6 * 0.75
    a100, a30 = catalog["a100-40gb"], catalog["a30"]
    assert price(kernels, a100, precision="int8").memory_ms == 0.0
    a30_memory = price(kernels, a30, precision="int8").memory_ms
    assert a30_memory == pytest.approx(weights / (933e9 * 0.85) * 1e3)  # activations stay on chip
    no_l2 = replace(a100, l2_mb=0.0)
    everything = sum(k.bytes for k in kernels)
    # ... and nothing more: the classifier GEMM (M = 1, N = 1000) runs whole, as its work is shorter than the
    # per-kernel floor it hides under (a split with its reduction kernel and fp32 partials would buy nothing)
    extra = price(kernels, no_l2, precision="int8").memory_ms * 1e-3 * 1555e9 * 0.85 - everything
    assert extra == pytest.approx(0.0, abs=1.0)


def test_two_four_eligibility_per_layer(catalog):
    """Which 2:4 GEMMs get TensorRT's sparse tactics and why the others run dense: no sparse cores at the
    precision, K not a multiple of 4, or M <= 64 rows; the prediction's cause lists them per layer type."""
    a100, t4 = catalog["a100-sxm-80gb"], catalog["t4"]
    big = Kernel("mlp.up", "gemm", "mlp", 2.0 * 4096 * 1024 * 1024, 0.0, 4096, 1024, 1024, sparse=True)
    assert sparse_tactic_reason(big, a100, "fp16") is None
    assert sparse_tactic_reason(big, t4, "fp16") == "t4 has no 2:4 sparse tensor cores at fp16"
    assert sparse_tactic_reason(replace(big, k=1022), a100, "fp16") == "K = 1022 is not a multiple of 4"
    assert sparse_tactic_reason(replace(big, m=64), a100, "fp16").startswith("M = 64 rows <= 64")
    split = sparse_eligibility([big, replace(big, name="o", k=1022), replace(big, name="head", sparse=False)], a100,
                               "fp16")  # fmt: skip
    assert split == {
        "sparse_tactics": ["mlp.up"],
        "dense_tactics": {"K = 1022 is not a multiple of 4": ["o"]},
        "not_2of4": ["head"],
    }
    # K not a multiple of 4 gets no gain even where the GPU has sparse tensor cores
    dense_k = replace(big, k=1022, flops=2.0 * 4096 * 1024 * 1022)
    assert price([dense_k], a100).latency_ms == price([replace(dense_k, sparse=False)], a100).latency_ms
    shape = shape_from_config({"model_type": "bert", "hidden_size": 1024, "intermediate_size": 4096,
                               "num_attention_heads": 16, "num_hidden_layers": 2})  # fmt: skip
    dense = model_kernels(shape, batch=8, seq=384, precision="int8")
    sparse = model_kernels(shape, batch=8, seq=384, precision="int8", sparse=True)
    note = explain_gain(dense, sparse, a100, precision="int8")
    assert note.startswith("2:4 on 8 of 8 GEMMs")
    assert "sparse tactics at M = 3072 on 8 (attention 4, mlp 4)" in note
    assert price(sparse, a100, precision="int8").sparse_used
