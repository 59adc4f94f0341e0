"""Torch engine: the fx replay of the compiled ONNX matches ONNX Runtime, and 2:4 layers are accounted for."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from prune2deploy.engines.base import BuildOptions
from prune2deploy.engines.onnx_to_torch import is_24_sparse, onnx_to_torch
from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.engines.torch import TorchEngine
from prune2deploy.errors import ConfigError, UnsupportedModelError
from prune2deploy.feeds import random_feeds
from prune2deploy.pipeline import convert_precision


def _compare(path, feeds, options=None):
    engine = TorchEngine()
    built = engine.build(path, options or BuildOptions(extra={"device": "cpu"}))
    with engine.runner(built) as runner:
        got = runner.run(feeds)
    ref = make_session(path).run(None, feeds)
    names = [o.name for o in make_session(path).get_outputs()]
    diffs = {name: float(np.abs(got[name] - r).max()) for name, r in zip(names, ref, strict=True)}
    return diffs, built


@pytest.mark.parametrize(("batch", "seq"), [(2, 7), (3, 16), (1, 3)])
def test_tiny_llama_matches_onnxruntime(tiny_llama_onnx, batch, seq):
    feeds = random_feeds(ir.load(tiny_llama_onnx), batch=batch, seq=seq, seed=batch)
    diffs, built = _compare(tiny_llama_onnx, feeds)
    assert max(diffs.values()) <= 1e-4
    assert built.info["ops"]["MatMul"] == 19 and built.info["device"] == "cpu"


def test_cnn_matches_onnxruntime(cnn_path):
    feeds = random_feeds(ir.load(cnn_path), batch=3)
    diffs, built = _compare(cnn_path, feeds)
    assert max(diffs.values()) <= 1e-4
    assert built.info["ops"]["Conv"] == 3


def _op_zoo(path):
    """One graph with the ops the exported models above do not use (BN, LayerNorm, Split, Pad …)."""
    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 1, 1, 2], strides=[2, 1], name="conv_asym"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("AveragePool", ["bn"], ["ap"], kernel_shape=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("Erf", ["ap"], ["e"]),
        helper.make_node("Tanh", ["e"], ["t"]),
        helper.make_node("Flatten", ["t"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("LayerNormalization", ["g", "ls", "lb"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Split", ["ln", "split"], ["s0", "s1"], axis=1),
        helper.make_node("Slice", ["s0", "st", "en", "ax", "sp"], ["sl"]),  # negative step
        helper.make_node("Gather", ["s1", "gi"], ["ga"], axis=1),  # negative indices
        helper.make_node("Concat", ["sl", "ga"], ["cat"], axis=1),
        helper.make_node("Pad", ["cat", "pads", "pv"], ["pd"], mode="constant"),
        helper.make_node("ReduceSum", ["pd", "rax"], ["rs"], keepdims=0),
        helper.make_node("Shape", ["pd"], ["shp"]),
        helper.make_node(
            "ConstantOfShape", ["shp"], ["ones"], value=numpy_helper.from_array(np.array([1.5], np.float32))
        ),
        helper.make_node("Mul", ["pd", "ones"], ["scaled"]),
        helper.make_node("Less", ["scaled", "zero"], ["neg"]),
        helper.make_node("Where", ["neg", "zero", "scaled"], ["relu"]),
        helper.make_node("CumSum", ["relu", "one_axis"], ["cs"], reverse=1),
        helper.make_node("Div", ["cs", "two"], ["y"]),
    ]
    inits = [
        init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("s", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        init("b", rng.standard_normal(4).astype(np.float32)),
        init("m", rng.standard_normal(4).astype(np.float32)),
        init("v", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        init("gw", rng.standard_normal((8, 4 * 5 * 12)).astype(np.float32) * 0.1),
        init("gb", rng.standard_normal(8).astype(np.float32)),
        init("ls", rng.standard_normal(8).astype(np.float32)),
        init("lb", rng.standard_normal(8).astype(np.float32)),
        init("split", np.array([5, 3], np.int64)),
        init("st", np.array([-1], np.int64)),
        init("en", np.array([-100], np.int64)),
        init("ax", np.array([1], np.int64)),
        init("sp", np.array([-2], np.int64)),
        init("gi", np.array([-1, 0, 2], np.int64)),
        init("pads", np.array([0, 1, 0, 2], np.int64)),
        init("pv", np.array(0.25, np.float32)),
        init("rax", np.array([0], np.int64)),
        init("zero", np.array(0.0, np.float32)),
        init("one_axis", np.array(1, np.int64)),
        init("two", np.array(2.0, np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "zoo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 10])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "k"]),
            helper.make_tensor_value_info("rs", TensorProto.FLOAT, ["k"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_op_zoo_matches_onnxruntime(tmp_path):
    path = _op_zoo(tmp_path / "zoo.onnx")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 10)).astype(np.float32)}
    diffs, _ = _compare(path, feeds)
    assert set(diffs) == {"y", "rs"}
    assert max(diffs.values()) <= 1e-4


def test_unsupported_op_names_the_node(tmp_path):
    node = helper.make_node("Det", ["x"], ["y"], name="determinant_7")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    with pytest.raises(UnsupportedModelError, match=r"'determinant_7' \(Det\)"):
        TorchEngine().build(path, BuildOptions(extra={"device": "cpu"}))


def test_24_layers_run_dense_on_cpu_and_say_so(mlp24_path):
    feeds = random_feeds(ir.load(mlp24_path), batch=5)
    diffs, built = _compare(mlp24_path, feeds, BuildOptions(sparse_weights=True, extra={"device": "cpu"}))
    assert max(diffs.values()) <= 1e-4
    sparsity = built.info["sparsity"]
    assert sparsity["semi_structured"] == []
    assert len(sparsity["dense_24"]) == 2 and all("cpu" in r for r in sparsity["dense_24"].values())
    assert "dense" in built.info["notes"][0]


def test_24_detection():
    weight = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
    assert not is_24_sparse(weight)
    weight.reshape(4, 2, 4)[:, :, 1:3] = 0
    assert is_24_sparse(weight)
    assert not is_24_sparse(weight[:, :6])  # K not a multiple of 4


def test_fp16_on_cpu_close_to_fp32(tiny_llama_onnx):
    feeds = random_feeds(ir.load(tiny_llama_onnx), batch=2, seq=6)
    diffs, built = _compare(
        tiny_llama_onnx,
        feeds,
        BuildOptions(precision="fp16", extra={"device": "cpu"}, convert_precision=convert_precision),
    )
    assert built.info["precision"]["source"] == "converted by convert-precision"
    assert 0 < max(diffs.values()) < 5e-3


def test_runner_times(cnn_path):
    engine = TorchEngine()
    built = engine.build(cnn_path, BuildOptions(extra={"device": "cpu"}))
    with engine.runner(built) as runner:
        times = runner.time(random_feeds(ir.load(cnn_path), batch=2), warmup=1, iters=3)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_unknown_option_is_a_config_error(cnn_path):
    with pytest.raises(ConfigError, match="devise"):
        TorchEngine().build(cnn_path, BuildOptions(extra={"devise": "cpu"}))


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not _sm80(), reason="2:4 semi-structured kernels need an sm80+ NVIDIA GPU")
def test_semi_structured_on_gpu(tmp_path):
    """A 2:4 fp16 linear big enough for the CUTLASS/cuSPARSELt kernels runs sparse and matches dense."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 512)).astype(np.float16)  # (K, N) MatMul weight
    weight.T.reshape(512, -1, 4)[:, :, :2] = 0  # 2:4 along K
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 512])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = ir.from_proto(proto)
    converted = onnx_to_torch(model, device="cuda", semi_structured=True)
    assert converted.semi_structured == ["mm"], converted.dense_24
    x = torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float16)).cuda()
    got = converted.module(x)[0].float()
    ref = x.float() @ torch.from_numpy(weight).cuda().float()
    assert torch.allclose(got, ref, atol=5e-2, rtol=1e-2)
