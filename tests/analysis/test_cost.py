from __future__ import annotations

import numpy as np
import pytest

from prune2deploy.analysis.cost import UNSCOPED, compare_layers, layer_of, model_cost, param_count
from prune2deploy.analysis.nm import nm_mask
from prune2deploy.errors import BadInputError
from tests.fixtures.graphs import conv_model, helper_model, matmul_model, mlp_model, tensor_info


def test_matmul_flops_and_bytes_by_hand(rng):
    model = matmul_model(rng.standard_normal((8, 4)))
    cost = model_cost(model, batch=2, seq=3)
    (node,) = cost.nodes
    assert node.flops == 2 * (2 * 3) * 4 * 8  # 2·M·N·K with M = batch·seq = 6
    assert node.bytes_read == 2 * 3 * 8 * 4  # X, fp32
    assert node.bytes_written == 2 * 3 * 4 * 4  # Y
    assert node.weight_bytes == 8 * 4 * 4  # W
    assert node.bytes == 416
    assert node.bytes_at(2) == 208  # the same tensors at fp16
    assert node.bytes_at(2, weight_factor=0.5) == 96 + 48 + 64 * 0.5
    assert cost.input_shapes == {"X": (2, 3, 8)}
    assert cost.shape_source == "inference"


def test_matmul_explicit_shapes_and_errors(rng):
    model = matmul_model(rng.standard_normal((8, 4)))
    assert model_cost(model, shapes={"X": (5, 7, 8)}).flops == 2 * 35 * 4 * 8
    with pytest.raises(BadInputError, match="static dims"):
        model_cost(model, shapes={"X": (5, 7, 9)})
    with pytest.raises(BadInputError, match="does not have"):
        model_cost(model, shapes={"Q": (1, 1, 8)})


def test_conv_flops_and_bytes_by_hand(rng):
    model = conv_model(rng.standard_normal((6, 4, 3, 3)), hw=8, pads=1)
    cost = model_cost(model, batch=2)
    (node,) = cost.nodes
    # Y is [2, 6, 8, 8]: 2·Cout·Cin·kh·kw·Hout·Wout·N
    assert node.flops == 2 * 6 * 4 * 3 * 3 * 8 * 8 * 2 == 55296
    assert node.bytes_read == 2 * 4 * 8 * 8 * 4  # X
    assert node.weight_bytes == 6 * 4 * 3 * 3 * 4 + 6 * 4  # W + bias
    assert node.bytes_written == 2 * 6 * 8 * 8 * 4
    assert cost.params == 6 * 4 * 9 + 6


def test_grouped_strided_conv_flops(rng):
    model = conv_model(rng.standard_normal((6, 2, 3, 3)), hw=8, pads=1, strides=2, group=2)
    (node,) = model_cost(model, batch=1).nodes
    assert node.flops == 2 * 6 * 2 * 3 * 3 * 4 * 4 * 1  # Hout = Wout = (8 + 2 - 3) // 2 + 1 = 4


def test_elementwise_gemm_and_shared_weight(rng):
    model = mlp_model(rng, k=8, hidden=16, out=4)
    cost = model_cost(model, batch=3)
    by_name = {n.name: n for n in cost.nodes}
    assert by_name["fc1"].flops == 2 * 3 * 16 * 8
    assert by_name["relu"].flops == 3 * 16
    assert by_name["fc2"].flops == 2 * 3 * 4 * 16
    assert by_name["add"].flops == 3 * 4
    assert by_name["add"].bytes_read == 3 * 4 * 4  # Add(Z, Z) reads Z once
    assert by_name["shared_reader"].weight_bytes == 8 * 16 * 4  # each reader pays for the shared weight
    assert cost.params == 8 * 16 + 4 * 16  # W1 counted once
    assert cost.gemm_flops == 2 * 3 * 16 * 8 * 2 + 2 * 3 * 4 * 16
    assert cost.sparse_flops_fraction == 0.0


def test_sparsity_is_detected_from_weights(rng):
    weight = rng.standard_normal((8, 4))
    model = matmul_model(weight * nm_mask(np.abs(weight), axis=0))
    cost = model_cost(model, batch=1, seq=2)
    assert cost.nodes[0].sparsity == "2:4"
    assert cost.sparse_flops_fraction == 1.0
    assert model_cost(model, batch=1, seq=2, detect_sparsity=False).sparse_flops_fraction == 0.0


def _gemm_transposed(weight: np.ndarray):
    """``Y = Gemm(X, W, transB=1)``: W is [N, K], its N:M groups run along axis 1."""
    from onnx import helper

    n, k = weight.shape
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="fc", transB=1)
    return helper_model([node], [tensor_info("X", ["batch", k])], [tensor_info("Y", ["batch", n])], {"W": weight})


@pytest.mark.parametrize("transposed", [False, True])
def test_a_weight_that_breaks_the_pattern_only_in_its_last_rows_is_not_tagged(rng, transposed):
    """The detection reads a weight's first rows first and the rest only when they fit the pattern."""
    weight = rng.standard_normal((256, 8))
    sparse = weight * nm_mask(np.abs(weight), axis=0)  # 2:4 along K (axis 0) everywhere
    broken = sparse.copy()
    broken[-4:, 0] = 1.0  # the last group of the first column: 4 of 4 non-zero
    for w, tag in ((sparse, "2:4"), (broken, None)):
        model = matmul_model(w) if not transposed else _gemm_transposed(w.T.copy())
        assert model_cost(model, batch=1, seq=2).nodes[0].sparsity == tag


def test_layers_from_name_scopes(rng):
    model = matmul_model(rng.standard_normal((8, 4)), scope="model.layers.3")
    (node,) = model.graph
    assert layer_of(node) == "model.layers.3"
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'm', 'm.lm_head', 'linear_14']"
    assert layer_of(node) == "m.lm_head"
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "not a list ["
    assert layer_of(node) == UNSCOPED
    scopes = "['', 'model.layers.3', 'model.layers.3.mlp.experts.0']"
    node.metadata_props["pkg.torch.onnx.name_scopes"] = scopes
    assert layer_of(node) == "model.layers.3"
    assert param_count(model) == (32, {"model.layers.3": 32})


def test_compare_layers_before_after(rng):
    weight = rng.standard_normal((8, 4))
    before = model_cost(matmul_model(weight, scope="model.layers.0"), batch=1, seq=2)
    after = model_cost(matmul_model(weight[:4], scope="model.layers.0"), batch=1, seq=2)
    assert compare_layers(before, after) == [
        {
            "layer": "model.layers.0",
            "params_before": 32,
            "params_after": 16,
            "flops_before": 128,
            "flops_after": 64,
        }
    ]
