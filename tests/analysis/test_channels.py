"""Channel analysis: which tensors couple, where channels end, which are provably zero, what blocks."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_ir.passes.common import ShapeInferencePass

from prune2deploy.analysis.channels import analyze_channels
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import helper_model, tensor_info
from tests.fixtures.zeroing import group_by_id, zero_conv_in, zero_conv_out, zero_in, zero_out, zero_param


def _weights(group) -> set[str]:
    return set(group.summary()["weights"])


# -- structure -------------------------------------------------------------------------------------------------


def test_three_layer_mlp_has_two_prunable_groups(mlps):
    analysis = analyze_channels(fresh("mlps"))
    for branch in ("relu", "gelu", "silu", "relu3", "sigmoid"):
        first, second = group_by_id(analysis, f"{branch}.fc2"), group_by_id(analysis, f"{branch}.fc3")
        assert (first.width, second.width) == (24, 16)
        assert first.prunable and second.prunable
        assert len(first.contractions) == len(second.contractions) == 1
        assert first.zero_atoms == second.zero_atoms == []
    # The input features touch the graph input: their group is reported, not prunable.
    inputs = [g for g in analysis.groups if any(b["tensor"] == "x[1]" for b in g.summary()["blocked"])]
    assert len(inputs) == 1 and not inputs[0].prunable


def test_summary_is_json_and_names_weights(mlps):
    analysis = analyze_channels(fresh("mlps"))
    summary = group_by_id(analysis, "relu.fc2").summary()
    json.dumps(summary)
    assert summary["width"] == 24 and summary["prunable"] and summary["blocked"] == []
    assert {"relu.fc1.weight", "relu.fc1.bias", "relu.fc2.weight"} <= set(summary["weights"])
    assert summary["num_tensors"] >= 5  # weight rows, bias, Gemm output, ReLU output, next weight columns


@pytest.mark.parametrize("branch", ["relu", "gelu", "silu", "relu3"])
def test_zero_producer_columns_are_detected(mlps, branch, rng):
    model = fresh("mlps")
    first, second = rng.choice(24, 9, replace=False), rng.choice(16, 5, replace=False)
    zero_out(model, mlps, f"{branch}.fc1", first)
    zero_out(model, mlps, f"{branch}.fc2", second)
    analysis = analyze_channels(model)
    assert group_by_id(analysis, f"{branch}.fc2").zero_atoms == sorted(first)
    assert group_by_id(analysis, f"{branch}.fc3").zero_atoms == sorted(second)


def test_bias_keeps_a_channel_alive(mlps, rng):
    """Zero weight rows with a non-zero bias give a constant, not a zero: the channel stays."""
    model = fresh("mlps")
    params = mlps
    zero_param(model, params["relu.fc1.weight"], [1, 2, 3], 0)
    zero_param(model, params["relu.fc1.bias"], [2], 0)
    assert group_by_id(analyze_channels(model), "relu.fc2").zero_atoms == [2]
    model = fresh("mlps")
    zero_param(model, params["relu.fc1.weight"], [1, 2, 3], 0)
    zero_param(model, params["relu.fc1.bias"], [1, 2, 3], 0)
    assert group_by_id(analyze_channels(model), "relu.fc2").zero_atoms == [1, 2, 3]


def test_sigmoid_is_not_zero_preserving(mlps, rng):
    model = fresh("mlps")
    index = rng.choice(24, 6, replace=False)
    zero_out(model, mlps, "sigmoid.fc1", index)
    assert group_by_id(analyze_channels(model), "sigmoid.fc2").zero_atoms == []  # sigmoid(0) = 0.5
    zero_in(model, mlps, "sigmoid.fc2", index[:4])  # the consumer rows make them removable
    assert group_by_id(analyze_channels(model), "sigmoid.fc2").zero_atoms == sorted(index[:4])


def test_swiglu_gate_or_down_side_makes_channels_zero(mlps, rng):
    analysis = analyze_channels(fresh("mlps"))
    group = group_by_id(analysis, "swiglu.down")
    assert group.width == 20 and group.prunable and len(group.contractions) == 1
    gate, down = rng.choice(20, 5, replace=False), rng.choice(20, 3, replace=False)
    model = fresh("mlps")
    zero_out(model, mlps, "swiglu.gate", gate)  # product with a zero factor
    zero_in(model, mlps, "swiglu.down", down)  # consumer rows
    assert group_by_id(analyze_channels(model), "swiglu.down").zero_atoms == sorted({*gate, *down})
    model = fresh("mlps")
    zero_out(model, mlps, "swiglu.up", gate)
    assert group_by_id(analyze_channels(model), "swiglu.down").zero_atoms == sorted(gate)


def test_fused_split_group_pairs_gate_and_up(mlps, rng):
    """One gate_up projection split in two: channel i of the product is columns i and 12 + i."""
    analysis = analyze_channels(fresh("mlps"))
    group = group_by_id(analysis, "fused.down")
    assert group.prunable and len(group.atoms) == 12 and group.width == 24
    whole = next(ci for ci, slots in enumerate(group.classes) if any(s.value.shape[-1] == 24 for s in slots))
    for i, atom in enumerate(group.atoms):
        assert sorted(index for ci, index in atom if ci == whole) == [i, 12 + i]
    assert any(f.kind == "split" for f in group.fixups)
    model = fresh("mlps")
    gate = rng.choice(12, 4, replace=False)
    zero_out(model, mlps, "fused.gate_up", gate)  # gate half only: silu(0) * up = 0
    assert group_by_id(analyze_channels(model), "fused.down").zero_atoms == sorted(gate)
    model = fresh("mlps")
    zero_out(model, mlps, "fused.gate_up", gate + 12)  # up half only
    assert group_by_id(analyze_channels(model), "fused.down").zero_atoms == sorted(gate)


def test_residual_stream_is_one_group_coupled_across_add(cnns, rng):
    analysis = analyze_channels(fresh("cnns"))
    stream = group_by_id(analysis, "residual.conv_a (+1)")
    assert stream.width == 8 and stream.prunable
    assert {"residual.stem.weight", "residual.conv_b.weight", "residual.head.weight", "residual.conv_a.weight"} <= (
        _weights(stream)
    )
    assert len(stream.contractions) == 2  # conv_a and head read the stream
    bottleneck = group_by_id(analysis, "residual.conv_b")
    assert bottleneck.width == 6 and bottleneck.prunable

    index = rng.choice(8, 3, replace=False)
    model = fresh("cnns")
    zero_conv_out(model, "residual.stem", index)  # one writer of the stream is not enough
    assert group_by_id(analyze_channels(model), "residual.conv_a (+1)").zero_atoms == []
    zero_conv_out(model, "residual.conv_b", index)  # every writer zero: x + 0 is zero
    assert group_by_id(analyze_channels(model), "residual.conv_a (+1)").zero_atoms == sorted(index)

    model = fresh("cnns")
    zero_conv_in(model, "residual.head", index)  # one reader is not enough either
    assert group_by_id(analyze_channels(model), "residual.conv_a (+1)").zero_atoms == []
    zero_conv_in(model, "residual.conv_a", index)
    assert group_by_id(analyze_channels(model), "residual.conv_a (+1)").zero_atoms == sorted(index)


def test_concat_offsets(cnns, rng):
    analysis = analyze_channels(fresh("cnns"))
    group = group_by_id(analysis, "concat.fuse")
    assert group.width == 12 and len(group.atoms) == 12 and group.prunable
    model = fresh("cnns")
    index = rng.choice(7, 3, replace=False)
    zero_conv_out(model, "concat.b", index)  # the second branch starts at channel 5 of the concat
    group = group_by_id(analyze_channels(model), "concat.fuse")
    whole = next(ci for ci, slots in enumerate(group.classes) if any(s.value.name == "cat" for s in slots))
    zero_in_concat = sorted(i for a in group.zero_atoms for ci, i in group.atoms[a] if ci == whole)
    assert zero_in_concat == sorted(5 + index)


def test_depthwise_conv_joins_the_group_and_passes_zeros(cnns, rng):
    analysis = analyze_channels(fresh("cnns"))
    group = group_by_id(analysis, "mobile.project")
    assert group.width == 16 and group.prunable and len(group.contractions) == 1
    assert "mobile.dw.weight" in _weights(group)
    assert [f.kind for f in group.fixups] == ["groups"]
    model = fresh("cnns")
    index = rng.choice(16, 5, replace=False)
    # The exporter folds each BatchNormalization into its conv (scope mobile.bn1 = expand, bn2 = dw).
    zero_conv_out(model, "mobile.bn1", index[:3])  # zero input to depthwise: dw bias makes it non-zero
    zero_conv_out(model, "mobile.bn2", index[3:])  # zero depthwise filter and bias: zero
    assert group_by_id(analyze_channels(model), "mobile.project").zero_atoms == sorted(index[3:])


# -- blocked groups ----------------------------------------------------------------------------------------------


def _blocked_by(group) -> set[tuple[str, str]]:
    return {(node, reason) for _, node, reason in group.blocked}


def test_graph_output_and_unmapped_op_block_with_reason(mlps):
    analysis = analyze_channels(fresh("mlps"))
    hidden = group_by_id(analysis, "hidden.fc2")
    assert not hidden.prunable
    assert ("<graph output>", "graph outputs keep their shape") in _blocked_by(hidden)
    cumsum = group_by_id(analysis, "hidden.fc4")
    assert not cumsum.prunable
    assert any(node.endswith("cumsum") and "CumSum" in reason for node, reason in _blocked_by(cumsum))
    assert group_by_id(analysis, "hidden.fc3").prunable  # the group in between is free


def _mlp_graph(op_nodes, *, hidden: int = 10, with_shapes: bool = True, extra_inits=None):
    """X[N,6] -> MatMul W1 -> H -> <op_nodes: H -> A> -> MatMul W2 -> Y[N,3]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"), *op_nodes]
    nodes.append(helper.make_node("MatMul", ["A", "W2"], ["Y"], name="fc2"))
    inits = {
        "W1": rng.standard_normal((6, hidden)).astype(np.float32),
        "W2": rng.standard_normal((hidden, 3)).astype(np.float32),
        **(extra_inits or {}),
    }
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    if with_shapes:
        ShapeInferencePass()(model)
    return model


def test_op_without_rule_blocks_its_group():
    model = _mlp_graph(
        [helper.make_node("Tile", ["H", "reps"], ["A"], name="tile")],
        extra_inits={"reps": np.array([1, 1], np.int64)},
    )
    (group,) = [g for g in analyze_channels(model).groups if g.width == 10]
    assert not group.prunable
    assert ("tile", "no axis rule for op Tile") in _blocked_by(group)


# -- zero rules, op by op -------------------------------------------------------------------------------------

_C = {"c": np.float32(0.5)}

ZERO_PRESERVING = {
    "Relu": ([helper.make_node("Relu", ["H"], ["A"])], {}),
    "Tanh": ([helper.make_node("Tanh", ["H"], ["A"])], {}),
    "LeakyRelu": ([helper.make_node("LeakyRelu", ["H"], ["A"], alpha=0.1)], {}),
    "Elu": ([helper.make_node("Elu", ["H"], ["A"])], {}),
    "Selu": ([helper.make_node("Selu", ["H"], ["A"])], {}),
    "Erf": ([helper.make_node("Erf", ["H"], ["A"])], {}),
    "Softsign": ([helper.make_node("Softsign", ["H"], ["A"])], {}),
    "HardSwish": ([helper.make_node("HardSwish", ["H"], ["A"])], {}),
    "Neg": ([helper.make_node("Neg", ["H"], ["A"])], {}),
    "Abs": ([helper.make_node("Abs", ["H"], ["A"])], {}),
    "Sin": ([helper.make_node("Sin", ["H"], ["A"])], {}),
    "Relu6": ([helper.make_node("Clip", ["H", "lo", "hi"], ["A"])], {"lo": np.float32(0), "hi": np.float32(6)}),
    "MulConst": ([helper.make_node("Mul", ["H", "c"], ["A"])], _C),
    "DivConst": ([helper.make_node("Div", ["H", "c"], ["A"])], _C),
    "Square": ([helper.make_node("Pow", ["H", "two"], ["A"])], {"two": np.float32(2)}),
    "Silu": ([helper.make_node("Sigmoid", ["H"], ["S"]), helper.make_node("Mul", ["H", "S"], ["A"])], {}),
    "Transpose2": (
        [helper.make_node("Transpose", ["H"], ["T"], perm=[1, 0]), helper.make_node("Transpose", ["T"], ["A"])],
        {},
    ),
}

NOT_ZERO_PRESERVING = {
    "Sigmoid": ([helper.make_node("Sigmoid", ["H"], ["A"])], {}),
    "Softplus": ([helper.make_node("Softplus", ["H"], ["A"])], {}),
    "Exp": ([helper.make_node("Exp", ["H"], ["A"])], {}),
    "Cos": ([helper.make_node("Cos", ["H"], ["A"])], {}),
    "HardSigmoid": ([helper.make_node("HardSigmoid", ["H"], ["A"])], {}),
    "AddConst": ([helper.make_node("Add", ["H", "c"], ["A"])], _C),
    "SubFromConst": ([helper.make_node("Sub", ["c", "H"], ["A"])], _C),
    "PowZero": ([helper.make_node("Pow", ["H", "zero"], ["A"])], {"zero": np.float32(0)}),
    "ClipAbove": ([helper.make_node("Clip", ["H", "lo"], ["A"])], {"lo": np.float32(0.25)}),
    "Reciprocal": ([helper.make_node("Reciprocal", ["H"], ["A"])], {}),
    "Sigmoid*Relu": (
        [
            helper.make_node("Relu", ["H"], ["R"]),
            helper.make_node("Sigmoid", ["H"], ["S"]),
            helper.make_node("Add", ["R", "S"], ["A"]),
        ],
        {},
    ),
}


@pytest.mark.parametrize("op", sorted(ZERO_PRESERVING))
def test_zero_preserving_ops(op):
    nodes, inits = ZERO_PRESERVING[op]
    model = _mlp_graph(nodes, extra_inits=inits)
    w1 = model.graph.initializers["W1"]
    data = w1.const_value.numpy().copy()
    data[:, [1, 4, 7]] = 0
    w1.const_value = ir.tensor(data, name="W1")
    (group,) = [g for g in analyze_channels(model).groups if g.width == 10]
    assert group.prunable and group.zero_atoms == [1, 4, 7]


@pytest.mark.parametrize("op", sorted(NOT_ZERO_PRESERVING))
def test_not_zero_preserving_ops(op):
    nodes, inits = NOT_ZERO_PRESERVING[op]
    model = _mlp_graph(nodes, extra_inits=inits)
    w1 = model.graph.initializers["W1"]
    data = w1.const_value.numpy().copy()
    data[:, [1, 4, 7]] = 0
    w1.const_value = ir.tensor(data, name="W1")
    (group,) = [g for g in analyze_channels(model).groups if g.width == 10]
    assert group.zero_atoms == []


# -- graphs without shape annotations --------------------------------------------------------------------------


def _gemm_chain(*, with_shapes: bool) -> ir.Model:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], name="fc1", transB=1),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("Gemm", ["R", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((10, 6)).astype(np.float32),
        "B1": rng.standard_normal(10).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
    }
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    if with_shapes:
        ShapeInferencePass()(model)
    return model


def test_values_without_shapes_block_their_group():
    """Without shapes the analysis cannot follow a channel through the ReLU: it must not call it prunable."""
    groups = [g for g in analyze_channels(_gemm_chain(with_shapes=False)).groups if g.prunable]
    assert groups == []
    model = _gemm_chain(with_shapes=False)
    blocked = [g for g in analyze_channels(model).groups if any("no shape" in r for _, _, r in g.blocked)]
    assert blocked, "the reason names the missing shape"
    (group,) = [g for g in analyze_channels(_gemm_chain(with_shapes=True)).groups if g.width == 10]
    assert group.prunable


def test_conv_without_shapes_is_blocked_with_a_clear_reason():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["H"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("Conv", ["R", "W2"], ["Y"], name="conv2"),
    ]
    inits = {
        "W1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "B1": rng.standard_normal(8).astype(np.float32),
        "W2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
    }
    model = helper_model(nodes, [tensor_info("X", ["N", 3, 8, 8])], [tensor_info("Y", ["N", 4, 8, 8])], inits)
    analysis = analyze_channels(model)
    assert not any(g.prunable for g in analysis.groups)
    reasons = {r for g in analysis.groups for _, _, r in g.blocked} | {r for _, _, r in analysis._blocked}
    assert not any("non-constant weight" in r for r in reasons), reasons
    ShapeInferencePass()(model)
    (group,) = [g for g in analyze_channels(model).groups if g.width == 8]
    assert group.prunable
