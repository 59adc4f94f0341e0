"""convert-precision: types, inserted casts, kept fp32 chains, and the error against fp32 on ORT CPU."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.errors import ConfigError, UnsupportedModelError
from prune2deploy.feeds import random_feeds
from prune2deploy.passes.precision import ConvertPrecisionPass
from tests.fixtures.results import outcome


def _convert(path, tmp_path, precision, **kwargs):
    model = ir.load(path)
    result = ConvertPrecisionPass(precision, **kwargs)(model)
    out = tmp_path / f"{precision}.onnx"
    ir.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)  # types consistent with every op schema
    return model, out, outcome(result)


def _max_diff(reference, converted, feeds):
    ref = make_session(reference).run(None, feeds)[0]
    got = make_session(converted).run(None, feeds)[0]
    assert got.dtype == np.float32
    return float(np.abs(ref - got).max()), float(np.abs(ref).max())


def test_fp16_llama_types_and_error(tiny_llama_onnx, tmp_path):
    model, out, record = _convert(tiny_llama_onnx, tmp_path, "fp16")
    matmul_weights = [n.inputs[1] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value]
    assert matmul_weights and all(w.dtype == ir.DataType.FLOAT16 for w in matmul_weights)
    assert [v.dtype for v in model.graph.outputs] == [ir.DataType.FLOAT]  # keep_io_types
    # The norm statistics and softmax stay fp32, with their Add(eps)/Sqrt/Reciprocal followers.
    kept = record["kept_fp32_ops"]
    assert kept["Pow"] == kept["ReduceMean"] == kept["Sqrt"] == kept["Reciprocal"] == 5
    assert kept["Softmax"] == 2
    for node in model.graph:
        if node.op_type in ("ReduceMean", "Softmax"):
            assert node.outputs[0].dtype == ir.DataType.FLOAT
    feeds = random_feeds(ir.load(tiny_llama_onnx), batch=2, seq=7)
    diff, scale = _max_diff(tiny_llama_onnx, out, feeds)
    # Recorded error of fp16 vs fp32 on ORT CPU for the tiny Llama: ~3e-4 on logits of scale ~0.6.
    assert diff < 2e-3 * max(scale, 1.0)
    assert diff > 0  # it really is fp16


def test_fp16_matches_onnxruntime_converter(tiny_llama_onnx, tmp_path):
    """Without kept ops this pass and ORT's convert_float_to_float16 make the same fp16 graph numerically."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _, out, record = _convert(tiny_llama_onnx, tmp_path, "fp16", keep_fp32_ops=())
    assert record["nodes_kept_fp32"] == Counter(n.op_type for n in ir.load(tiny_llama_onnx).graph)["Range"]
    theirs = tmp_path / "ort_fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(tiny_llama_onnx)), keep_io_types=True), str(theirs))
    feeds = random_feeds(ir.load(tiny_llama_onnx), batch=3, seq=5)
    ours = make_session(out).run(None, feeds)[0]
    ref = make_session(theirs).run(None, feeds)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_fp16_cnn_error(cnn_path, tmp_path):
    _, out, record = _convert(cnn_path, tmp_path, "fp16")
    assert record["initializers_converted"] >= 7  # 3 conv weights + biases + classifier
    feeds = random_feeds(ir.load(cnn_path), batch=2)
    diff, scale = _max_diff(cnn_path, out, feeds)
    assert 0 < diff < 5e-3 * max(scale, 1.0)


def test_bf16_keeps_ops_without_bf16_schema(tiny_llama_onnx, tmp_path):
    model, _, record = _convert(tiny_llama_onnx, tmp_path, "bf16")
    # Opset 18 has no bf16 Cos/Sin: they stay fp32 behind casts instead of producing an invalid graph.
    assert record["kept_fp32_ops"]["Cos"] == record["kept_fp32_ops"]["Sin"] == 1
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert all(n.outputs[0].dtype == ir.DataType.BFLOAT16 for n in matmuls)


def test_keep_io_types_false_changes_graph_outputs(cnn_path, tmp_path):
    model, _, _ = _convert(cnn_path, tmp_path, "fp16", keep_io_types=False)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16


def test_node_metadata_survives(mlp24_path):
    model = ir.load(mlp24_path)
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    gemm.metadata_props["p2d.sparsity"] = "2:4"
    ConvertPrecisionPass("fp16")(model)
    assert gemm.metadata_props["p2d.sparsity"] == "2:4"
    assert gemm.inputs[1].dtype == ir.DataType.FLOAT16


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="int4"):
        ConvertPrecisionPass("int4")


def test_untyped_value_is_refused_with_its_name(cnn_path):
    model = ir.load(cnn_path)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].dtype = None
    with pytest.raises(UnsupportedModelError, match=relu.outputs[0].name):
        ConvertPrecisionPass("fp16")(model)
