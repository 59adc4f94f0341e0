from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from prune2deploy.analysis.nm import is_nm, nm_eligibility, nm_mask, nm_violations
from tests.fixtures.graphs import conv_model, helper_model, matmul_model, mlp_model


def test_nm_mask_keeps_two_largest_of_four_along_k():
    scores = np.array([[1.0, 5.0], [4.0, 0.0], [3.0, 7.0], [2.0, 6.0], [9.0, 1.0], [0.0, 2.0], [8.0, 3.0], [7.0, 4.0]])
    mask = nm_mask(scores, n=2, m=4, axis=0)  # K = axis 0, two groups of four per column
    expected = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 1]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 8  # exactly half kept


def test_nm_mask_ties_keep_earlier_elements():
    mask = nm_mask(np.ones((1, 8)), n=2, m=4, axis=-1)
    np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 1, 1, 0, 0])


def test_is_nm_depends_on_axis(rng):
    weight = rng.standard_normal((8, 6))
    masked = weight * nm_mask(np.abs(weight), axis=0)
    assert is_nm(masked, axis=0)
    assert nm_violations(masked, axis=0) == 0
    assert not is_nm(masked.T.copy(), axis=0)  # sizes differ: 6 % 4 != 0
    assert not is_nm(weight, axis=0)
    assert nm_violations(weight, axis=0) == 12  # dense: every one of 2 * 6 groups breaks 2:4


def test_conv_mask_groups_run_over_input_channels(rng):
    weight = rng.standard_normal((3, 8, 2, 2))
    mask = nm_mask(np.abs(weight), axis=1)
    counts = mask.reshape(3, 2, 4, 2, 2).sum(axis=2)  # groups of 4 consecutive input channels
    assert (counts == 2).all()
    assert is_nm(weight * mask, axis=1)


def test_bad_n_m_raise():
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(np.ones((4, 4)), n=4, m=4)


def test_eligibility_of_matmul_gemm_conv(rng):
    mm = matmul_model(rng.standard_normal((8, 6)))
    result = nm_eligibility(next(iter(mm.graph)))
    assert (result.eligible, result.axis, result.k, result.weight.name) == (True, 0, 8, "W")

    mlp = mlp_model(rng, k=8, hidden=16, out=4)
    gemm = next(n for n in mlp.graph if n.op_type == "Gemm")
    result = nm_eligibility(gemm)
    assert (result.eligible, result.axis, result.k) == (True, 1, 16)  # transB=1: K is axis 1

    conv = conv_model(rng.standard_normal((4, 6, 3, 3)))
    result = nm_eligibility(next(iter(conv.graph)))
    assert not result.eligible
    assert result.reason == "K=6 (axis 1) is not a multiple of 4"


def test_ineligible_reasons(rng):
    nodes = [
        helper.make_node("MatMul", ["X", "Xt"], ["Y"], name="act_act"),
        helper.make_node("MatMul", ["X", "Wi"], ["Z"], name="int_weight"),
        helper.make_node("Relu", ["X"], ["R"], name="relu"),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 4])
    xt = helper.make_tensor_value_info("Xt", TensorProto.FLOAT, [4, 4])
    outs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [4, 4]) for v in "YR"]
    outs.append(helper.make_tensor_value_info("Z", TensorProto.INT32, [4, 4]))
    nodes[1] = helper.make_node("MatMul", ["Xi", "Wi"], ["Z"], name="int_weight")
    xi = helper.make_tensor_value_info("Xi", TensorProto.INT32, [4, 4])
    model = helper_model(nodes, [x, xt, xi], outs, {"Wi": np.ones((4, 4), np.int32)})
    reasons = {n.name: nm_eligibility(n).reason for n in model.graph}
    assert reasons == {
        "act_act": "weight is not a constant initializer",
        "int_weight": "weight dtype INT32 is not a float type",
        "relu": "op Relu has no sparse tensor-core kernel",
    }


def test_tiny_llama_linear_weights_are_eligible(tiny_llama_onnx):
    model = ir.load(str(tiny_llama_onnx))
    results = {n.name: nm_eligibility(n) for n in model.graph if n.op_type == "MatMul"}
    eligible = sorted(name for name, r in results.items() if r.eligible)
    assert len(eligible) == 15  # 7 linears x 2 layers + lm_head; the 4 attention MatMuls are not
    assert all(results[name].axis == 0 for name in eligible)
