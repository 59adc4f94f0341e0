"""Tiny hand-built graphs with known shapes, shared by the cost, N:M and roofline tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def to_ir(nodes, inputs, outputs, initializers, *, opset: int = 18) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def matmul_model(weight: np.ndarray, *, batch_dims=("batch", "seq"), scope: str | None = None) -> ir.Model:
    """``Y = X @ W`` with X [batch, seq, K] (dynamic dims) and W [K, N] an initializer."""
    k, n = weight.shape
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")
    if scope:
        entry = node.metadata_props.add()
        entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr(["", scope, scope + ".proj"])
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [*batch_dims, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*batch_dims, n])
    return to_ir([node], [x], [y], {"W": weight.astype(np.float32)})


def conv_model(weight: np.ndarray, *, hw: int = 8, pads: int = 1, strides: int = 1, group: int = 1) -> ir.Model:
    """``Y = Conv(X, W, B)`` with X [N, Cin, hw, hw] (N dynamic) and a bias."""
    cout, cin_g = weight.shape[:2]
    node = helper.make_node(
        "Conv", ["X", "W", "B"], ["Y"], name="conv", pads=[pads] * 4, strides=[strides] * 2, group=group
    )
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", cin_g * group, hw, hw])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", cout, None, None])
    bias = np.zeros(cout, np.float32)
    return to_ir([node], [x], [y], {"W": weight.astype(np.float32), "B": bias})


def mlp_model(rng: np.random.Generator, *, k: int = 8, hidden: int = 16, out: int = 4) -> ir.Model:
    """MatMul -> Relu -> Gemm(transB=1) -> Add, with a weight shared by a second, non-sparsified reader."""
    w1 = rng.standard_normal((k, hidden)).astype(np.float32)
    w2 = rng.standard_normal((out, hidden)).astype(np.float32)  # transB=1: [N, K]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("Gemm", ["R", "W2"], ["Z"], name="fc2", transB=1),
        helper.make_node("Add", ["Z", "Z"], ["Y"], name="add"),
        helper.make_node("MatMul", ["X", "W1"], ["H2"], name="shared_reader"),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", out])
    h2 = helper.make_tensor_value_info("H2", TensorProto.FLOAT, ["batch", hidden])
    return to_ir(nodes, [x], [y, h2], {"W1": w1, "W2": w2})
