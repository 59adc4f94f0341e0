from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from prune2deploy.analysis.cost import model_cost
from prune2deploy.analysis.nm import nm_mask
from prune2deploy.errors import ConfigError
from prune2deploy.profiling.roofline import load_catalog, predict, predict_table, resolve_gpus
from tests.fixtures.graphs import helper_model, matmul_model

SOURCES = """
[gpus.{key}.sources]
tensor_tflops = "test"
sparse_tensor_tflops = "test"
cuda_fp32_tflops = "test"
memory_gb = "test"
memory_bandwidth_gbs = "test"
compute_capability = "test"
"""


def _entry(key: str, *, sparse: bool = True, drop: str | None = None) -> str:
    lines = [
        f"[gpus.{key}]",
        'name = "Test GPU"',
        'architecture = "Test"',
        'compute_capability = "8.0"',
        "memory_gb = 16",
        "memory_bandwidth_gbs = 1000",  # 1e12 B/s
        "cuda_fp32_tflops = 10",
        f"sparse_tensor_cores = {'true' if sparse else 'false'}",
        "tensor_tflops = { fp16 = 100, int8 = 200 }",
        "sparse_tensor_tflops = " + ("{ fp16 = 200, int8 = 400 }" if sparse else "{}"),
    ]
    text = "\n".join(line for line in lines if not (drop and line.startswith(drop))) + "\n"
    return text + SOURCES.format(key=key)


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "gpus.toml"
    path.write_text(_entry("toy") + _entry("toy-dense", sparse=False))
    return load_catalog(path)


def _weight(rng, sparse: bool) -> np.ndarray:
    weight = rng.standard_normal((1024, 1024)).astype(np.float32)
    return weight * nm_mask(np.abs(weight), axis=0) if sparse else weight


def test_compute_bound_matmul_exact(rng, catalog):
    model = matmul_model(_weight(rng, sparse=False))
    (pred,) = predict(model, gpus=["toy"], precision="fp16", batch=1, seq=1024, catalog=catalog)
    assert pred.flops == 2 * 1024**3
    assert pred.bytes == 3 * 1024 * 1024 * 2  # X, W, Y at 2 bytes
    assert pred.compute_ms == pytest.approx(2 * 1024**3 / 100e12 * 1e3, rel=1e-12)
    assert pred.memory_ms == pytest.approx(3 * 2**21 / 1e12 * 1e3, rel=1e-12)
    assert pred.latency_ms == pytest.approx(pred.compute_ms, rel=1e-12)
    assert (pred.bound, pred.kernels, pred.batch, pred.seq) == ("compute", 1, 1, 1024)
    assert not pred.sparse_used


def test_sparse_weights_use_sparse_peak_and_compressed_bytes(rng, catalog):
    model = matmul_model(_weight(rng, sparse=True))
    sparse, dense_gpu = predict(model, gpus=["toy", "toy-dense"], precision="fp16", batch=1, seq=1024,
                                catalog=catalog)  # fmt: skip
    assert sparse.sparse_flops_fraction == 1.0 and sparse.sparse_used
    assert sparse.compute_ms == pytest.approx(2 * 1024**3 / 200e12 * 1e3, rel=1e-12)
    weight_bytes = 2**21 * (0.5 + 0.5 * 2 / 16)  # half the fp16 values + 2-bit indices
    assert sparse.bytes == pytest.approx(2 * 2**21 + weight_bytes)
    assert sparse.latency_ms == pytest.approx(sparse.compute_ms)
    # A GPU without sparse tensor cores runs the same weights at the dense peak.
    assert not dense_gpu.sparse_used
    assert dense_gpu.latency_ms == pytest.approx(2 * 1024**3 / 100e12 * 1e3, rel=1e-12)


def test_memory_bound_decode_step(rng, catalog):
    model = matmul_model(_weight(rng, sparse=False))
    (pred,) = predict(model, gpus=["toy"], precision="fp16", batch=1, seq=1, catalog=catalog)
    assert pred.bound == "memory"
    assert pred.latency_ms == pytest.approx((2048 + 2048 + 2**21) / 1e12 * 1e3, rel=1e-12)
    (int8,) = predict(model, gpus=["toy"], precision="int8", batch=1, seq=1, catalog=catalog)
    assert int8.latency_ms == pytest.approx((1024 + 1024 + 2**20) / 1e12 * 1e3, rel=1e-12)


def test_elementwise_launch_overhead_and_efficiency(catalog):
    nodes = [
        helper.make_node("Relu", ["X"], ["R"], name="relu"),
        helper.make_node("Reshape", ["R", "s"], ["Y"]),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1024, 1024])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2**20])
    model = helper_model(nodes, [x], [y], {"s": np.array([2**20], np.int64)})
    (pred,) = predict(model, gpus=["toy"], precision="fp16", catalog=catalog)
    assert pred.kernels == 1  # the Reshape is a view
    assert pred.compute_ms == pytest.approx(2**20 / 10e12 * 1e3)  # CUDA-core peak
    assert pred.latency_ms == pytest.approx(2 * 2**21 / 1e12 * 1e3)
    (slow,) = predict(model, gpus=["toy"], precision="fp16", catalog=catalog, efficiency=0.5,
                      launch_overhead_us=5.0)  # fmt: skip
    assert slow.launch_ms == pytest.approx(0.005)
    assert slow.latency_ms == pytest.approx(2 * pred.latency_ms + 0.005)


def test_predict_table_speedup(rng, catalog):
    weight = _weight(rng, sparse=False)
    reference = matmul_model(weight)
    compiled = matmul_model(weight * nm_mask(np.abs(weight), axis=0))
    (row,) = predict_table(reference, compiled, gpus=["toy"], precision="fp16", batch=1, seq=1024,
                           catalog=catalog)  # fmt: skip
    assert row.speedup == pytest.approx(2.0, rel=1e-12)
    assert (row.reference_bound, row.compiled_bound, row.sparse_used) == ("compute", "compute", True)
    assert row.compiled_sparse_flops_fraction == 1.0
    rows = predict_table(model_cost(reference, batch=1, seq=1), model_cost(compiled, batch=1, seq=1),
                         gpus=["toy", "toy-dense"], precision=["fp16", "int8"], catalog=catalog)  # fmt: skip
    assert [(r.gpu, r.precision) for r in rows] == [
        ("toy", "fp16"), ("toy-dense", "fp16"), ("toy", "int8"), ("toy-dense", "int8"),
    ]  # fmt: skip
    assert rows[0].speedup == pytest.approx((4096 + 2**21) / (4096 + 2**21 * 0.5625))
    assert rows[1].speedup == pytest.approx(1.0)


def test_unsupported_precision_and_unknown_gpu(rng, catalog):
    model = matmul_model(_weight(rng, sparse=False)[:8, :8])
    with pytest.raises(ConfigError, match=r"GPU 'toy' .* no bf16"):
        predict(model, gpus=["toy"], precision="bf16", catalog=catalog)
    with pytest.raises(ConfigError, match="unknown GPU 'h900'"):
        predict(model, gpus=["h900"], catalog=catalog)
    assert predict(model, precision="bf16", catalog=load_catalog()) != []  # unsupported ones are skipped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_entry("bad", drop="memory_bandwidth_gbs"), "GPU 'bad', field 'memory_bandwidth_gbs': missing"),
        (_entry("bad").replace("fp16 = 200", "fp16 = 50"), "'sparse_tensor_tflops.fp16': is below"),
        (_entry("bad").replace('tensor_tflops = "test"\n', "", 1), "'sources.tensor_tflops': missing"),
        (_entry("bad").replace("int8 = 200", "int4 = 200"), "'tensor_tflops.int4': unknown precision"),
        ("[gpus.bad\n", "not valid TOML"),
    ],
)
def test_broken_catalog_names_gpu_and_field(tmp_path, text, message):
    path = tmp_path / "gpus.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_catalog(path)


def test_packaged_catalog():
    catalog = load_catalog()
    assert len(catalog) >= 11
    for key in ("h100-sxm", "h100-pcie", "h200", "a100-sxm-80gb", "l40s", "l4", "a10", "t4", "rtx-4090",
                "jetson-agx-orin-64gb", "jetson-orin-nano-8gb"):  # fmt: skip
        assert key in catalog
    t4 = catalog["t4"]
    assert not t4.sparse_tensor_cores and t4.sparse_tensor_tflops == {}
    for spec in catalog.values():
        for precision, sparse in spec.sparse_tensor_tflops.items():
            # datasheets round independently (L40S fp16: 362.05 dense, 733 sparse)
            assert sparse == pytest.approx(2 * spec.tensor_tflops[precision], rel=0.02)
        assert all(spec.sources[f] for f in ("tensor_tflops", "memory_bandwidth_gbs"))
    assert catalog["h100-sxm"].tensor_tflops["fp16"] == 989.4
    assert [s.key for s in resolve_gpus(["A100", "H100"], catalog)] == ["a100-sxm-80gb", "h100-sxm"]
