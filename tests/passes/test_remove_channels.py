"""remove-channels: zero random channels, run the pass, check the new shapes and that ORT outputs match."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes.common import ShapeInferencePass

from prune2deploy.analysis.channels import analyze_channels
from prune2deploy.passes.base import P2DResult
from prune2deploy.passes.remove_channels import RemoveChannelsPass
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import (
    assert_same_outputs,
    find_param,
    helper_model,
    node_in_scope,
    run,
    set_initializer,
    snapshot,
    tensor_info,
)
from tests.fixtures.results import outcome
from tests.fixtures.zeroing import zero_conv_in, zero_conv_out, zero_in, zero_out


def _prune(model: ir.Model, **options) -> P2DResult:
    return RemoveChannelsPass(**options)(model)


def _weights(model: ir.Model, params, names) -> dict[str, tuple[ir.Value, bool]]:
    return {name: find_param(model, params[name]) for name in names}


def _torch_shape(handle: tuple[ir.Value, bool]) -> tuple[int, ...]:
    value, transposed = handle
    shape = tuple(value.const_value.shape)
    return shape[::-1] if transposed else shape


# -- 1. MLPs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["relu", "gelu", "silu", "relu3"])
def test_mlp_two_groups(mlps, branch, rng):
    model = fresh("mlps")
    names = [f"{branch}.fc{i}.weight" for i in (1, 2, 3)]
    handles = _weights(model, mlps, names)
    first, second = rng.choice(24, 9, replace=False), rng.choice(16, 5, replace=False)
    zero_out(model, mlps, f"{branch}.fc1", first)
    zero_out(model, mlps, f"{branch}.fc2", second)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {
        f"{branch}.fc2": {"width_before": 24, "width_after": 15, "removed": 9},
        f"{branch}.fc3": {"width_before": 16, "width_after": 11, "removed": 5},
    }
    assert record["channels_removed"] == 14 and record["exact"]
    assert [_torch_shape(handles[n]) for n in names] == [(15, 8), (11, 15), (4, 11)]
    if f"{branch}.fc1.bias" in mlps:
        bias = model.graph.initializers
        kept = np.setdiff1d(np.arange(24), first)
        assert any(
            v.const_value.shape == (15,) and np.array_equal(v.const_value.numpy(), mlps[f"{branch}.fc1.bias"][kept])
            for v in bias.values()
        )
    assert_same_outputs(reference, model, rng)


def test_consumer_rows_alone_remove_channels(mlps, rng):
    model = fresh("mlps")
    index = rng.choice(24, 7, replace=False)
    zero_in(model, mlps, "gelu.fc2", index)  # only the reader side is zero; fc1 columns are live
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {"gelu.fc2": {"width_before": 24, "width_after": 17, "removed": 7}}
    assert_same_outputs(reference, model, rng)


# -- 2. SwiGLU ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["gate", "up", "down"])
def test_swiglu(mlps, side, rng):
    model = fresh("mlps")
    handles = _weights(model, mlps, ["swiglu.gate.weight", "swiglu.up.weight", "swiglu.down.weight"])
    index = rng.choice(20, 6, replace=False)
    (zero_in if side == "down" else zero_out)(model, mlps, f"swiglu.{side}", index)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {"swiglu.down": {"width_before": 20, "width_after": 14, "removed": 6}}
    assert [_torch_shape(h) for h in handles.values()] == [(14, 8), (14, 8), (8, 14)]
    assert_same_outputs(reference, model, rng)


# -- 3. Gemm, transB = 0 / 1 -------------------------------------------------------------------------------------


def _gemm_mlp(trans1: int, trans2: int, rng) -> ir.Model:
    """X[N,6] -> Gemm(W1, B1) -> Relu -> Transpose? -> Gemm(W2, B2, transA?) -> Y[N,3]."""
    w1 = rng.standard_normal((10, 6) if trans1 else (6, 10)).astype(np.float32)
    w2 = rng.standard_normal((3, 10) if trans2 else (10, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], name="fc1", transB=trans1),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("Transpose", ["R"], ["RT"], name="t", perm=[1, 0]),  # [10, N]: read with transA=1
        helper.make_node("Gemm", ["RT", "W2", "B2"], ["Y"], name="fc2", transA=1, transB=trans2, alpha=0.5),
    ]
    inits = {"W1": w1, "B1": rng.standard_normal(10).astype(np.float32), "W2": w2, "B2": np.ones(3, np.float32)}
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    ShapeInferencePass()(model)
    return model


@pytest.mark.parametrize(("trans1", "trans2"), [(1, 1), (0, 0), (1, 0)])
def test_gemm_trans_b(trans1, trans2, rng):
    model = _gemm_mlp(trans1, trans2, rng)
    inits = model.graph.initializers
    w1, b1, w2 = (inits[n].const_value.numpy().copy() for n in ("W1", "B1", "W2"))
    index = np.array([0, 3, 4, 9])
    if trans1:
        w1[index] = 0
    else:
        w1[:, index] = 0
    b1[index] = 0
    inits["W1"].const_value, inits["B1"].const_value = ir.tensor(w1, name="W1"), ir.tensor(b1, name="B1")
    if trans2:  # also zero one consumer column on a live producer channel
        w2[:, 5] = 0
    else:
        w2[5] = 0
    inits["W2"].const_value = ir.tensor(w2, name="W2")
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 5
    assert inits["W1"].const_value.shape == ((5, 6) if trans1 else (6, 5))
    assert inits["B1"].const_value.shape == (5,)
    assert inits["W2"].const_value.shape == ((3, 5) if trans2 else (5, 3))
    assert_same_outputs(reference, model, rng)


# -- 4. Conv - BN - ReLU ---------------------------------------------------------------------------------------


def test_conv_bn_relu_folded_by_exporter(cnns, rng):
    """The exporter folds BN into the conv: SCOP's gamma = beta = 0 becomes zero rows and bias."""
    model = fresh("cnns")
    first, second = rng.choice(12, 5, replace=False), rng.choice(10, 4, replace=False)
    zero_conv_out(model, "convbn.bn1", first)
    zero_conv_out(model, "convbn.bn2", second)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {
        "convbn.bn2": {"width_before": 12, "width_after": 7, "removed": 5},
        "convbn.conv3": {"width_before": 10, "width_after": 6, "removed": 4},
    }
    shapes = [
        tuple(node_in_scope(model, s, "Conv").inputs[1].shape) for s in ("convbn.bn1", "convbn.bn2", "convbn.conv3")
    ]
    assert shapes == [(7, 3, 3, 3), (6, 7, 3, 3), (4, 6, 1, 1)]
    assert_same_outputs(reference, model, rng)


def _bn_chain(rng, *, conv_bias: bool) -> ir.Model:
    """Conv(3→8) -> BN -> Relu -> Conv(8→6) -> BN -> Relu -> Conv(6→4), shapes inferred, BN kept."""
    nodes, inits = [], {}
    x, cin = "X", 3
    for i, (cout, k) in enumerate([(8, 3), (6, 3)]):
        inputs = [x, f"W{i}"] + ([f"C{i}"] if conv_bias else [])
        nodes.append(helper.make_node("Conv", inputs, [f"c{i}"], name=f"conv{i}", pads=[k // 2] * 4))
        nodes.append(
            helper.make_node(
                "BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"
            )
        )
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
        inits[f"W{i}"] = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        if conv_bias:
            inits[f"C{i}"] = rng.standard_normal(cout).astype(np.float32)
        inits[f"g{i}"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        inits[f"b{i}"] = rng.uniform(-0.5, 0.5, cout).astype(np.float32)
        inits[f"m{i}"] = rng.uniform(-0.5, 0.5, cout).astype(np.float32)
        inits[f"v{i}"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        x, cin = f"r{i}", cout
    nodes.append(helper.make_node("Conv", [x, "W2"], ["Y"], name="conv2"))
    inits["W2"] = rng.standard_normal((4, cin, 1, 1)).astype(np.float32)
    model = helper_model(nodes, [tensor_info("X", ["N", 3, 8, 8])], [tensor_info("Y", ["N", 4, 8, 8])], inits)
    ShapeInferencePass()(model)
    return model


def _set(model: ir.Model, name: str, index, value: float = 0.0) -> None:
    init = model.graph.initializers[name]
    data = init.const_value.numpy().copy()
    data[index] = value
    set_initializer(init, data)


@pytest.mark.parametrize("conv_bias", [True, False])
def test_bn_gamma_beta_zero(conv_bias, rng):
    model = _bn_chain(rng, conv_bias=conv_bias)
    first, second = [1, 2, 6], [0, 5]
    for i, index in ((0, first), (1, second)):
        _set(model, f"g{i}", index)
        _set(model, f"b{i}", index)
    _set(model, "g1", [3])  # gamma alone is not enough: beta makes the channel a non-zero constant
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 5
    inits = model.graph.initializers
    assert inits["W0"].const_value.shape == (5, 3, 3, 3)
    assert inits["W1"].const_value.shape == (4, 5, 3, 3)
    assert inits["W2"].const_value.shape == (4, 4, 1, 1)
    for p in "gbmv":
        assert inits[f"{p}0"].const_value.shape == (5,) and inits[f"{p}1"].const_value.shape == (4,)
    if conv_bias:
        assert inits["C0"].const_value.shape == (5,) and inits["C1"].const_value.shape == (4,)
    assert_same_outputs(reference, model, rng)


def test_bn_zero_input_with_zero_shift(rng):
    """Zero conv rows and bias, BN with mean = beta = 0: BN passes the zero through."""
    model = _bn_chain(rng, conv_bias=True)
    _set(model, "W0", [4])
    _set(model, "C0", [4])
    _set(model, "m0", [4])
    _set(model, "b0", [4])
    _set(model, "W0", [2])
    _set(model, "C0", [2])  # channel 2: BN's shift (beta - mean * gamma / std) is not zero: kept
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 1
    assert_same_outputs(reference, model, rng)


# -- 5. depthwise ------------------------------------------------------------------------------------------------


def test_mobilenet_block_rewrites_depthwise_groups(cnns, rng):
    model = fresh("cnns")
    index = rng.choice(16, 6, replace=False)
    zero_conv_out(model, "mobile.bn2", index)  # depthwise filter + (BN-folded) bias
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {"mobile.project": {"width_before": 16, "width_after": 10, "removed": 6}}
    dw = node_in_scope(model, "mobile.bn2", "Conv")
    assert dw.attributes["group"].value == 10
    assert tuple(dw.inputs[1].shape) == (10, 1, 3, 3)
    assert tuple(node_in_scope(model, "mobile.bn1", "Conv").inputs[1].shape) == (10, 3, 1, 1)
    assert tuple(node_in_scope(model, "mobile.project", "Conv").inputs[1].shape) == (6, 10, 1, 1)
    assert_same_outputs(reference, model, rng)


# -- 6. residual -------------------------------------------------------------------------------------------------


def test_residual_bottleneck_and_stream(cnns, rng):
    model = fresh("cnns")
    inner = rng.choice(6, 2, replace=False)
    zero_conv_out(model, "residual.conv_a", inner)
    stream = rng.choice(8, 3, replace=False)
    zero_conv_out(model, "residual.stem", stream)
    zero_conv_out(model, "residual.conv_b", stream[:2])  # channel stream[2] still written by conv_b: kept
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {
        "residual.conv_b": {"width_before": 6, "width_after": 4, "removed": 2},
        "residual.conv_a (+1)": {"width_before": 8, "width_after": 6, "removed": 2},
    }
    shapes = {
        s: tuple(node_in_scope(model, f"residual.{s}", "Conv").inputs[1].shape)
        for s in ("stem", "conv_a", "conv_b", "head")
    }
    assert shapes == {"stem": (6, 3, 3, 3), "conv_a": (4, 6, 3, 3), "conv_b": (6, 4, 3, 3), "head": (5, 6, 1, 1)}
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize(
    ("stem", "head", "removed"),
    [
        (False, True, 0),  # conv_a still reads the live stem output
        (True, False, 0),  # head still reads conv_b's live output added to the stream
        (True, True, 3),  # conv_a reads zeros; conv_b's output only reaches head's zero rows
    ],
)
def test_residual_stream_needs_every_reader(cnns, stem, head, removed, rng):
    model = fresh("cnns")
    if stem:
        zero_conv_out(model, "residual.stem", [0, 1, 2])
    if head:
        zero_conv_in(model, "residual.head", [0, 1, 2])
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == removed
    assert node_in_scope(model, "residual.conv_b", "Conv").inputs[1].shape[0] == 8 - removed
    assert_same_outputs(reference, model, rng)


# -- 7. concat ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["a", "b"])
def test_concat_offsets(cnns, branch, rng):
    model = fresh("cnns")
    width, offset = (5, 0) if branch == "a" else (7, 5)
    index = rng.choice(width, 3, replace=False)
    fuse = node_in_scope(model, "concat.fuse", "Conv").inputs[1]
    before = fuse.const_value.numpy().copy()
    zero_conv_out(model, f"concat.{branch}", index)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {"concat.fuse": {"width_before": 12, "width_after": 9, "removed": 3}}
    kept = np.setdiff1d(np.arange(12), offset + index)
    np.testing.assert_array_equal(fuse.const_value.numpy(), before[:, kept])
    assert node_in_scope(model, f"concat.{branch}", "Conv").inputs[1].shape[0] == width - 3
    assert_same_outputs(reference, model, rng)


# -- 8. fused projection + Split / Slice ---------------------------------------------------------------------------


@pytest.mark.parametrize("half", ["gate", "up", "down"])
def test_fused_gate_up_split(mlps, half, rng):
    model = fresh("mlps")
    handle = find_param(model, mlps["fused.gate_up.weight"])
    index = rng.choice(12, 5, replace=False)
    if half == "gate":
        zero_out(model, mlps, "fused.gate_up", index)
    elif half == "up":
        zero_out(model, mlps, "fused.gate_up", index + 12)
    else:
        zero_in(model, mlps, "fused.down", index)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"] == {"fused.down": {"width_before": 24, "width_after": 14, "removed": 5}}
    assert _torch_shape(handle) == (14, 8)
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert split.inputs[1].const_value.numpy().tolist() == [7, 7]
    assert_same_outputs(reference, model, rng)


def _slice_split_model(rng, *, use_split: bool) -> ir.Model:
    """X -> MatMul W[6, 4+5+3] -> {gate, up, extra} (unequal Split or three Slices) -> gate*up @ Wd, extra @ We."""
    if use_split:
        split_nodes = [helper.make_node("Split", ["P", "sizes"], ["G", "U", "E"], name="split", axis=1)]
    else:
        split_nodes = [
            helper.make_node("Slice", ["P", f"s{i}", f"e{i}", "ax"], [out], name=f"slice{i}")
            for i, out in enumerate(["G", "U", "E"])
        ]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["P"], name="proj"),
        *split_nodes,
        helper.make_node("Relu", ["G"], ["RG"], name="act"),
        helper.make_node("Mul", ["RG", "U"], ["H"], name="mul"),
        helper.make_node("MatMul", ["H", "Wd"], ["Y"], name="down"),
        helper.make_node("MatMul", ["E", "We"], ["Z"], name="extra"),
    ]
    inits = {
        "W": rng.standard_normal((6, 12)).astype(np.float32),
        "Wd": rng.standard_normal((4, 2)).astype(np.float32),
        "We": rng.standard_normal((4, 2)).astype(np.float32),
        "sizes": np.array([4, 4, 4], np.int64),
        "ax": np.array([1], np.int64),
    }
    for i, (s, e) in enumerate([(0, 4), (4, 8), (8, 100)]):
        inits[f"s{i}"], inits[f"e{i}"] = np.array([s], np.int64), np.array([e], np.int64)
    outputs = [tensor_info("Y", ["N", 2]), tensor_info("Z", ["N", 2])]
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], outputs, inits)
    ShapeInferencePass()(model)
    return model


@pytest.mark.parametrize("use_split", [True, False])
def test_three_way_split_or_slice(use_split, rng):
    model = _slice_split_model(rng, use_split=use_split)
    w = model.graph.initializers["W"]
    data = w.const_value.numpy().copy()
    data[:, [1, 6, 8, 11]] = 0  # gate 1 and up 2 (column 6): product channels 1 and 2; extra 0 and 3
    w.const_value = ir.tensor(data, name="W")
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 4
    assert w.const_value.shape == (6, 6)  # gate and up lose columns 1 and 2 each, extra loses 2
    if use_split:
        (split,) = [n for n in model.graph if n.op_type == "Split"]
        assert split.inputs[1].const_value.numpy().tolist() == [2, 2, 2]
        np.testing.assert_array_equal(w.const_value.numpy(), data[:, [0, 3, 4, 7, 9, 10]])
    else:
        bounds = [
            (n.inputs[1].const_value.numpy().item(), n.inputs[2].const_value.numpy().item())
            for n in model.graph
            if n.op_type == "Slice"
        ]
        assert bounds == [(0, 2), (2, 4), (4, 6)]
    assert_same_outputs(reference, model, rng)


# -- 9. blocked groups are left alone ------------------------------------------------------------------------------


def test_blocked_groups_untouched(mlps, rng):
    model = fresh("mlps")
    zero_out(model, mlps, "hidden.fc1", [0, 1, 2, 3])  # hidden activation is a graph output
    zero_in(model, mlps, "hidden.fc4", [0, 1, 2])  # read through CumSum: no rule maps it
    shapes = {n: tuple(v.const_value.shape) for n, v in model.graph.initializers.items()}
    reference = snapshot(model)
    analysis = analyze_channels(model)
    pass_ = _prune(model)
    assert pass_.record["channels_removed"] == 0
    assert {n: tuple(v.const_value.shape) for n, v in model.graph.initializers.items()} == shapes
    blocked = {g.id: g.summary()["blocked"] for g in analysis.groups if not g.prunable}
    assert {"node": "<graph output>", "tensor": "relu[1]", "reason": "graph outputs keep their shape"} in (
        blocked["hidden.fc2"]
    )
    assert any(b["node"] == "node_cumsum" and "CumSum" in b["reason"] for b in blocked["hidden.fc4"])
    assert_same_outputs(reference, model, rng)


def test_op_without_rule_untouched(rng):
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Tile", ["H", "reps"], ["A"], name="tile"),
        helper.make_node("MatMul", ["A", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "reps": np.array([1, 1], np.int64),
    }
    inits["W1"][:, [2, 3]] = 0
    inits["W2"][[2, 3]] = 0
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    ShapeInferencePass()(model)
    reference = snapshot(model)
    analysis = analyze_channels(model)
    pass_ = _prune(model)
    assert pass_.record["channels_removed"] == 0
    (group,) = [g for g in analysis.groups if g.width == 10]
    assert ("tile", "no axis rule for op Tile") in {(n, r) for _, n, r in group.blocked}
    assert model.graph.initializers["W1"].const_value.shape == (6, 10)
    assert_same_outputs(reference, model, rng)


# -- 10. sigmoid ---------------------------------------------------------------------------------------------------


def test_sigmoid_zero_producer_is_not_removed(mlps, rng):
    model = fresh("mlps")
    index = rng.choice(24, 8, replace=False)
    zero_out(model, mlps, "sigmoid.fc1", index)  # sigmoid(0) = 0.5 is a constant: it folds into fc2's bias
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"]["sigmoid.fc2"] == {
        "width_before": 24,
        "width_after": 16,
        "removed": 8,
        "constant_folded": 8,
    }
    assert_same_outputs(reference, model, rng)


def test_sigmoid_of_a_zero_consumer_is_removed(mlps, rng):
    model = fresh("mlps")
    index = rng.choice(24, 5, replace=False)
    zero_in(model, mlps, "sigmoid.fc2", index)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"]["sigmoid.fc2"] == {"width_before": 24, "width_after": 19, "removed": 5}
    assert_same_outputs(reference, model, rng)


# -- 11. shared initializers -----------------------------------------------------------------------------------------


def _two_branches(rng, *, shared: str) -> ir.Model:
    """Branch a: X@W1a -> Relu -> @W2a. Branch b: X@W1b -> Sigmoid -> @W2b. ``shared`` names tensors used by both."""
    names = {k: k for k in ("W1a", "W1b", "B1a", "B1b", "W2a", "W2b")}
    for base in shared.split():
        names[base + "b"] = names[base + "a"]
    nodes = [
        helper.make_node("MatMul", ["X", names["W1a"]], ["Ha"], name="fc1a"),
        helper.make_node("Add", ["Ha", names["B1a"]], ["Ba"], name="bias_a"),
        helper.make_node("Relu", ["Ba"], ["Ra"], name="relu_a"),
        helper.make_node("MatMul", ["Ra", names["W2a"]], ["Ya"], name="fc2a"),
        helper.make_node("MatMul", ["X", names["W1b"]], ["Hb"], name="fc1b"),
        helper.make_node("Add", ["Hb", names["B1b"]], ["Bb"], name="bias_b"),
        helper.make_node("Sigmoid", ["Bb"], ["Rb"], name="sig_b"),
        helper.make_node("MatMul", ["Rb", names["W2b"]], ["Yb"], name="fc2b"),
    ]
    inits = {}
    for name in set(names.values()):
        shape = {"W1": (6, 10), "B1": (10,), "W2": (10, 3)}[name[:2]]
        inits[name] = rng.standard_normal(shape).astype(np.float32)
    inits["B1a"][[1, 2, 5]] = 0
    if "W2" in shared.split():
        inits["W2a"][[1, 2, 5]] = 0
    else:
        inits["W1a"][:, [1, 2, 5]] = 0
    outputs = [tensor_info("Ya", ["N", 3]), tensor_info("Yb", ["N", 3])]
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], outputs, inits)
    ShapeInferencePass()(model)
    return model


@pytest.mark.parametrize("shared", ["W1", "B1", "W1 B1"])
def test_shared_initializer_couples_branches(shared, rng):
    """Only branch a has zero channels; its weights are shared with branch b, which still needs them all —
    unless branch b's are constants (shared zero W1: sigmoid(bias)), which fold into fc2b's bias."""
    model = _two_branches(rng, shared=shared)
    reference = snapshot(model)
    analysis = analyze_channels(model)
    pass_ = _prune(model)
    coupled = [g for g in analysis.groups if {c.node.name for c in g.contractions} == {"fc2a", "fc2b"}]
    assert len(coupled) == 1 and coupled[0].zero_atoms == []
    folded = 3 if "W1" in shared.split() else 0
    assert pass_.record["channels_removed"] == pass_.record["constant_channels_folded"] == folded
    assert_same_outputs(reference, model, rng)


def test_shared_zero_consumer_prunes_both_branches(rng):
    """W2 (with zero rows) is read by both branches: the channels go from both, and W2 is sliced once."""
    model = _two_branches(rng, shared="W2")
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 3
    inits = model.graph.initializers
    assert inits["W1a"].const_value.shape == inits["W1b"].const_value.shape == (6, 7)
    assert inits["W2a"].const_value.shape == (7, 3) and "W2b" not in inits
    assert_same_outputs(reference, model, rng)


def test_unshared_branch_still_pruned(rng):
    model = _two_branches(rng, shared="")
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 3
    inits = model.graph.initializers
    assert inits["W1a"].const_value.shape == (6, 7) and inits["W1b"].const_value.shape == (6, 10)
    assert_same_outputs(reference, model, rng)


def test_shared_reshape_target_is_copied(rng):
    """Two Reshapes read one shape constant; only one of them sits on a pruned group."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Reshape", ["H", "shape"], ["HR"], name="reshape_a"),
        helper.make_node("MatMul", ["HR", "W2"], ["Y"], name="fc2"),
        helper.make_node("MatMul", ["X", "V1"], ["G"], name="gc1"),
        helper.make_node("Reshape", ["G", "shape"], ["GR"], name="reshape_b"),
        helper.make_node("MatMul", ["GR", "V2"], ["Z"], name="gc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "V1": rng.standard_normal((6, 10)).astype(np.float32),
        "V2": rng.standard_normal((10, 3)).astype(np.float32),
        "shape": np.array([-1, 10], np.int64),
    }
    inits["W2"][[0, 7]] = 0
    outputs = [tensor_info("Y", ["N", 3]), tensor_info("Z", ["N", 3])]
    model = helper_model(nodes, [tensor_info("X", ["N", 6])], outputs, inits)
    ShapeInferencePass()(model)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 2
    reshape_a, reshape_b = (n for n in model.graph if n.op_type == "Reshape")
    assert (
        reshape_a.inputs[1].const_value.numpy().tolist() == [-1, 8]
        or reshape_a.inputs[1] is model.graph.initializers["shape"]
    )
    assert reshape_b.inputs[1].const_value.numpy().tolist() == [-1, 10]
    assert_same_outputs(reference, model, rng)


def test_weight_read_inside_a_subgraph_is_not_sliced(rng):
    """W1 is also read by an If branch (outer-scope reference): slicing it would break that branch."""
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["T"], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("T", TensorProto.FLOAT, ["N", 10])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["X"], ["E0"], name="neg"), helper.make_node("MatMul", ["E0", "W1"], ["E"])],
        "else",
        [],
        [helper.make_tensor_value_info("E", TensorProto.FLOAT, ["N", 10])],
    )
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("MatMul", ["R", "W2"], ["Y"], name="fc2"),
        helper.make_node("If", ["cond"], ["Z"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
    }
    inits["W1"][:, [2, 4]] = 0
    inputs = [tensor_info("X", ["N", 6]), tensor_info("cond", [], TensorProto.BOOL)]
    outputs = [tensor_info("Y", ["N", 3]), tensor_info("Z", ["N", 10])]
    model = helper_model(nodes, inputs, outputs, inits)
    ShapeInferencePass()(model)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 0
    assert model.graph.initializers["W1"].const_value.shape == (6, 10)
    assert_same_outputs(reference, model, rng)


# -- 12. min_width / multiple_of ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "width"),
    [
        ({}, 5),
        ({"multiple_of": 4}, 8),
        ({"min_width": 10}, 10),
        ({"min_width": 10, "multiple_of": 4}, 12),
        ({"multiple_of": 16}, 16),
        ({"multiple_of": 32}, 24),
    ],
)
def test_min_width_and_multiple_of(mlps, options, width, rng):
    model = fresh("mlps")
    handle = find_param(model, mlps["relu.fc2.weight"])
    zero_out(model, mlps, "relu.fc1", rng.choice(24, 19, replace=False))
    reference = snapshot(model)
    record = outcome(_prune(model, **options))
    if width == 24:
        assert "relu.fc2" not in record["per_group"]
    else:
        assert record["per_group"]["relu.fc2"] == {"width_before": 24, "width_after": width, "removed": 24 - width}
    assert _torch_shape(handle) == (16, width)
    assert_same_outputs(reference, model, rng)


def test_all_channels_zero_keeps_min_width(mlps, rng):
    model = fresh("mlps")
    zero_out(model, mlps, "silu.fc2", np.arange(16))
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["per_group"]["silu.fc3"] == {"width_before": 16, "width_after": 1, "removed": 15}
    assert_same_outputs(reference, model, rng)


# -- 13. idempotence -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"multiple_of": 4}])
def test_idempotent(mlps, cnns, options, rng):
    for name, zero in (
        ("mlps", lambda m: (zero_out(m, mlps, "relu.fc1", range(9)), zero_in(m, mlps, "fused.down", range(6)))),
        ("cnns", lambda m: (zero_conv_out(m, "mobile.bn2", range(5)), zero_conv_out(m, "concat.b", range(5)))),
    ):
        model = fresh(name)
        zero(model)
        reference = snapshot(model)
        first = _prune(model, **options)
        assert first.record["channels_removed"] > 0
        once = snapshot(model)
        second = RemoveChannelsPass(**options)(model)
        assert not second.modified and second.record["channels_removed"] == 0
        assert snapshot(model) == once
        assert_same_outputs(reference, model, rng, trials=1)


def test_record_counts(mlps):
    model = fresh("mlps")
    pass_ = _prune(model)
    analysis = analyze_channels(fresh("mlps"))
    assert pass_.record["groups_total"] == len(analysis.groups)
    assert pass_.record["groups_prunable"] == sum(g.prunable for g in analysis.groups)
    assert pass_.record["groups_changed"] == 0 and pass_.refused == {}
    assert repr(RemoveChannelsPass()) == "RemoveChannelsPass(min_width=1, multiple_of=1)"


# -- more op patterns ------------------------------------------------------------------------------------------------


def _zero_cols(model: ir.Model, name: str, index, axis: int = 1) -> None:
    init = model.graph.initializers[name]
    data = init.const_value.numpy().copy()
    slicer = [slice(None)] * data.ndim
    slicer[axis] = np.asarray(index)
    data[tuple(slicer)] = 0
    set_initializer(init, data)


def _graph(nodes, inputs, outputs, inits, *, opset: int = 18) -> ir.Model:
    model = helper_model(nodes, inputs, outputs, inits, opset=opset)
    ShapeInferencePass()(model)
    return model


@pytest.mark.parametrize("head", ["gap-flatten-gemm", "reducemean-matmul", "maxpool-gap-flatten"])
def test_cnn_classifier_head(head, rng):
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["C"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["C"], ["R"], name="relu"),
    ]
    if head == "gap-flatten-gemm":
        nodes += [
            helper.make_node("GlobalAveragePool", ["R"], ["P"], name="gap"),
            helper.make_node("Flatten", ["P"], ["F"], name="flatten"),
            helper.make_node("Gemm", ["F", "Wf", "Bf"], ["Y"], name="fc", transB=1),
        ]
    elif head == "reducemean-matmul":
        nodes += [
            helper.make_node("ReduceMean", ["R", "axes"], ["P"], name="mean", keepdims=0),
            helper.make_node("MatMul", ["P", "WfT"], ["Y"], name="fc"),
        ]
    else:
        nodes += [
            helper.make_node("MaxPool", ["R"], ["M"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalMaxPool", ["M"], ["P"], name="gmp"),
            helper.make_node("Flatten", ["P"], ["F"], name="flatten"),
            helper.make_node("Gemm", ["F", "Wf", "Bf"], ["Y"], name="fc", transB=1),
        ]
    wf = rng.standard_normal((5, 8)).astype(np.float32)
    inits = {
        "W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(8).astype(np.float32),
        "Wf": wf,
        "WfT": wf.T.copy(),
        "Bf": rng.standard_normal(5).astype(np.float32),
        "axes": np.array([2, 3], np.int64),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 3, 8, 8])], [tensor_info("Y", ["N", 5])], inits)
    _zero_cols(model, "W", [1, 5, 6], axis=0)
    _zero_cols(model, "B", [1, 5, 6], axis=0)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 3
    assert model.graph.initializers["W"].const_value.shape == (5, 3, 3, 3)
    fc = "WfT" if head == "reducemean-matmul" else "Wf"
    assert model.graph.initializers[fc].const_value.shape == (5, 5)  # [out, C] or [C, out]: 8 -> 5 either way
    assert_same_outputs(reference, model, rng)


def test_embedding_columns(rng):
    """Gather from an embedding table: zero columns of the table are zero channels of the lookup."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["H"], name="embed"),
        helper.make_node("MatMul", ["H", "W"], ["Y"], name="proj"),
    ]
    inits = {"E": rng.standard_normal((11, 8)).astype(np.float32), "W": rng.standard_normal((8, 4)).astype(np.float32)}
    model = _graph(nodes, [tensor_info("ids", ["N", 5], TensorProto.INT64)], [tensor_info("Y", ["N", 5, 4])], inits)
    _zero_cols(model, "E", [0, 7])
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 2
    assert model.graph.initializers["E"].const_value.shape == (11, 6)
    assert model.graph.initializers["W"].const_value.shape == (6, 4)
    feeds = {"ids": rng.integers(0, 11, (3, 5)).astype(np.int64)}
    np.testing.assert_allclose(run(reference, feeds, threads=1)["Y"], run(model, feeds, threads=1)["Y"], atol=1e-5)


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (helper.make_node("LayerNormalization", ["H", "g", "b"], ["A"], axis=0, name="ln"), "normalises over"),
        (helper.make_node("Softmax", ["H"], ["A"], name="softmax"), "normalises over this axis"),
        (helper.make_node("Slice", ["H", "st", "en", "ax", "step"], ["A"], name="strided"), "step"),
    ],
)
def test_channel_mixing_ops_block(op, reason, rng):
    width = 5 if op.op_type == "Slice" else 10
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        op,
        helper.make_node("MatMul", ["A", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((width, 3)).astype(np.float32),
        "g": np.ones(10, np.float32),
        "b": np.zeros(10, np.float32),
        **{k: np.array([v], np.int64) for k, v in {"st": 0, "en": 10, "ax": 1, "step": 2}.items()},
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    _zero_cols(model, "W1", [2, 4])
    _zero_cols(model, "W2", [2, 4], axis=0)
    reference = snapshot(model)
    analysis = analyze_channels(model)
    pass_ = _prune(model)
    assert pass_.record["channels_removed"] == 0
    reasons = [r for g in analysis.groups for _, n, r in g.blocked if n == op.name]
    assert any(reason in r for r in reasons), reasons
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize(("input_zero", "removed"), [(True, 2), (False, 0)])
def test_layernorm_over_channels_keeps_its_statistics(input_zero, removed, rng):
    """fc1 → LayerNorm(last axis) → fc2: a channel zero at the norm's input (and read by zero rows) goes, and
    the norm is rebuilt with the full width's statistics; one the norm still averages over stays."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("LayerNormalization", ["H", "g", "b"], ["A"], name="ln"),
        helper.make_node("MatMul", ["A", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, 10).astype(np.float32),
        "b": rng.uniform(-0.3, 0.3, 10).astype(np.float32),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    if input_zero:
        _zero_cols(model, "W1", [2, 4])
    _zero_cols(model, "W2", [2, 4], axis=0)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == removed
    assert model.graph.initializers["W2"].const_value.shape == (10 - removed, 3)
    assert ("LayerNormalization" in {n.op_type for n in model.graph}) == (not input_zero)
    if input_zero:
        assert next(iter(record["per_group"].values()))["layernorms_rescaled"] == 1
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize(
    ("zeroed", "side", "shapes"),
    [
        # conv1's outputs 1 (group 0) and 5, 6 (group 1) are zero: one goes from each group, the input side.
        ({"W1": ([1, 5, 6], 0)}, "in", {"W1": (6, 4, 1, 1), "W2": (8, 3, 3, 3), "W3": (5, 8, 1, 1)}),
        # conv3 reads nothing of the grouped outputs 0, 1 (group 0) and 4 (group 1): one from each group.
        ({"W3": ([0, 1, 4], 1)}, "out", {"W1": (8, 4, 1, 1), "W2": (6, 4, 3, 3), "W3": (5, 6, 1, 1)}),
    ],
)
def test_grouped_conv_keeps_equal_groups(zeroed, side, shapes, rng):
    """conv1 → grouped 3×3 (group=2, 8 → 8) → ReLU → 1×1 conv: both sides of the grouped conv shrink, by the
    same count in every group. A zero input channel of a grouped conv does not make its output channel of
    the same index zero (it mixes four inputs), so the output side must stay whole in the first case."""
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["H"], name="conv1"),
        helper.make_node("Conv", ["H", "W2"], ["G"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["G"], ["R"], name="relu"),
        helper.make_node("Conv", ["R", "W3", "B3"], ["Y"], name="conv3"),
    ]
    inits = {
        "W1": rng.standard_normal((8, 4, 1, 1)).astype(np.float32),
        "W2": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "W3": rng.standard_normal((5, 8, 1, 1)).astype(np.float32),
        "B3": rng.standard_normal(5).astype(np.float32),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 4, 6, 6])], [tensor_info("Y", ["N", 5, 6, 6])], inits)
    for name, (index, axis) in zeroed.items():
        _zero_cols(model, name, index, axis=axis)
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 2
    assert {k: tuple(model.graph.initializers[k].const_value.shape) for k in shapes} == shapes
    assert next(n for n in model.graph if n.name == "grouped").attributes["group"].value == 2
    assert_same_outputs(reference, model, rng)


def test_concat_of_one_tensor_twice(rng):
    """Concat(H, H): channel c of H is channels c and 10 + c of the concat; both rows must be zero."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Concat", ["H", "H"], ["C"], name="cat", axis=1),
        helper.make_node("MatMul", ["C", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((20, 3)).astype(np.float32),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    _zero_cols(model, "W2", [1, 11, 3, 14], axis=0)  # channel 1 fully, 3 and 4 only half
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 1
    assert model.graph.initializers["W1"].const_value.shape == (6, 9)
    assert model.graph.initializers["W2"].const_value.shape == (18, 3)
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize(("start", "end"), [(2, 8), (-4, 2**63 - 1), (0, 6)])
def test_slice_drops_dead_channels(start, end, rng):
    """Channels a Slice never reads are dead: they go, and the Slice bounds follow."""
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["P"], name="proj"),
        helper.make_node("Slice", ["P", "st", "en", "ax"], ["S"], name="slice"),
        helper.make_node("MatMul", ["S", "Wd"], ["Y"], name="down"),
    ]
    width = len(range(12)[slice(start, min(end, 12))])
    inits = {
        "W": rng.standard_normal((6, 12)).astype(np.float32),
        "Wd": rng.standard_normal((width, 3)).astype(np.float32),
        "st": np.array([start], np.int64),
        "en": np.array([end], np.int64),
        "ax": np.array([-1], np.int64),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    _zero_cols(model, "Wd", [1], axis=0)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 12 - width + 1
    assert model.graph.initializers["W"].const_value.shape == (6, width - 1)
    assert_same_outputs(reference, model, rng)


def test_split_with_attribute_sizes_opset12(rng):
    """Opset < 13 carries Split sizes in an attribute: the rewrite must keep that form."""
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["P"], name="proj"),
        helper.make_node("Split", ["P"], ["G", "U"], name="split", axis=1, split=[5, 5]),
        helper.make_node("Mul", ["G", "U"], ["H"], name="mul"),
        helper.make_node("MatMul", ["H", "Wd"], ["Y"], name="down"),
    ]
    inits = {"W": rng.standard_normal((6, 10)).astype(np.float32), "Wd": rng.standard_normal((5, 3)).astype(np.float32)}
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits, opset=12)
    _zero_cols(model, "W", [0, 8])  # gate 0 and up 3
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 2
    assert model.graph.initializers["W"].const_value.shape == (6, 6)
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize("target", [[10], [1, 10], [4, 1, 10]])
def test_expand_target_shorter_than_output(target, rng):
    """Expand broadcasts from the right: the width entry of a short target is not at the output's index."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),  # [N, 10]
        helper.make_node("Expand", ["H", "shape"], ["E"], name="expand"),
        helper.make_node("MatMul", ["E", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "shape": np.array(target, np.int64),
    }
    out = ["N", 3] if len(target) < 3 else [4, "N", 3]
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", out)], inits)
    _zero_cols(model, "W2", [3, 4, 9], axis=0)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 3
    (expand,) = [n for n in model.graph if n.op_type == "Expand"]
    assert expand.inputs[1].const_value.numpy().tolist() == [*target[:-1], 7]
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize("op", ["Reshape", "Slice"])
def test_two_groups_through_one_node(op, rng):
    """One Reshape / two-axis Slice carries the widths of two groups: both entries must be rewritten."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["A"], name="fc1"),  # [N, 3, 16]
        helper.make_node("Transpose", ["A"], ["AT"], name="t1", perm=[0, 2, 1]),  # [N, 16, 3]
        helper.make_node("MatMul", ["AT", "W2"], ["B"], name="fc2"),  # [N, 16, 12]
        helper.make_node("MatMul", ["R", "W3"], ["C"], name="fc3"),  # [N, r, 7]: the 12 axis ends here
        helper.make_node("Transpose", ["C"], ["CT"], name="t2", perm=[0, 2, 1]),  # [N, 7, r]
        helper.make_node("MatMul", ["CT", "W4"], ["Y"], name="fc4"),  # [N, 7, 2]: the 16 axis ends here
    ]
    if op == "Reshape":
        nodes.insert(3, helper.make_node("Reshape", ["B", "shape"], ["R"], name="reshape"))
        rows, cols = 16, 12
    else:
        nodes.insert(3, helper.make_node("Slice", ["B", "st", "en", "ax"], ["R"], name="slice"))
        rows, cols = 12, 9  # rows 2..13 of 16, columns 1..9 of 12 (columns 0, 10, 11 are dead)
    inits = {
        "W1": rng.standard_normal((5, 16)).astype(np.float32),
        "W2": rng.standard_normal((3, 12)).astype(np.float32),
        "W3": rng.standard_normal((cols, 7)).astype(np.float32),
        "W4": rng.standard_normal((rows, 2)).astype(np.float32),
        "shape": np.array([-1, 16, 12], np.int64),
        "st": np.array([2, 1], np.int64),
        "en": np.array([14, 10], np.int64),
        "ax": np.array([1, 2], np.int64),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 3, 5])], [tensor_info("Y", ["N", 7, 2])], inits)
    _zero_cols(model, "W1", [3, 9, 10])
    _zero_cols(model, "W2", [0, 5])
    reference = snapshot(model)
    record = outcome(_prune(model))
    (node,) = [n for n in model.graph if n.op_type == op]
    if op == "Reshape":
        assert record["channels_removed"] == 5
        assert node.inputs[1].const_value.numpy().tolist() == [-1, 13, 10]
    else:
        # dead rows 0, 1, 14, 15 and column 11 go too; the zero row 3, 9, 10 and column 0, 5 as well
        assert record["channels_removed"] == 7 + 4
        assert node.inputs[1].const_value.numpy().tolist() == [0, 0]
        assert node.inputs[2].const_value.numpy().tolist() == [9, 8]
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize("runtime_width", [False, True])
def test_reshape_target_built_by_concat(runtime_width, rng):
    """A target assembled at run time: a constant width piece is rewritten (on a private copy of the Concat);
    a width read from another tensor cannot be, and the group is skipped with the reason."""
    width_piece = ["g1"] if runtime_width else ["c10"]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Shape", ["H"], ["s0"], name="batch", start=0, end=1),
        helper.make_node("MatMul", ["X", "V"], ["G"], name="other"),
        helper.make_node("Shape", ["G"], ["g1"], name="other_width", start=1),
        helper.make_node("Concat", ["s0", *width_piece], ["target"], name="cat", axis=0),
        helper.make_node("Reshape", ["H", "target"], ["R"], name="reshape"),
        helper.make_node("MatMul", ["R", "W2"], ["Y"], name="fc2"),
        helper.make_node("Reshape", ["G", "target"], ["Z"], name="reshape_other"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "V": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "c10": np.array([10], np.int64),
    }
    inits["W2"][[1, 2]] = 0
    outputs = [tensor_info("Y", ["N", 3]), tensor_info("Z", ["N", 10])]
    model = _graph(nodes, [tensor_info("X", ["N", 6])], outputs, inits)
    reference = snapshot(model)
    result = _prune(model)
    record = result.record
    if runtime_width:
        assert record["channels_removed"] == 0
        assert "run-time value" in next(iter(result.refused.values()))
        assert model.graph.initializers["W1"].const_value.shape == (6, 10)
    else:
        assert record["channels_removed"] == 2 and result.refused == {}
        reshape, reshape_other = (n for n in model.graph if n.op_type == "Reshape")
        assert reshape.inputs[1] is not reshape_other.inputs[1]  # the other Reshape keeps [N, 10]
        assert reshape.inputs[1].producer().inputs[1].const_value.numpy().tolist() == [8]
    assert_same_outputs(reference, model, rng)


def test_weight_on_the_left_matmul(rng):
    """Y = W2 @ relu(W1 @ X): the channel axis is the rows of the activation."""
    nodes = [
        helper.make_node("MatMul", ["W1", "X"], ["H"], name="fc1"),  # [N, 10, 5]
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("MatMul", ["W2", "R"], ["Y"], name="fc2"),  # [N, 3, 5]
    ]
    inits = {
        "W1": rng.standard_normal((10, 6)).astype(np.float32),
        "W2": rng.standard_normal((3, 10)).astype(np.float32),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6, 5])], [tensor_info("Y", ["N", 3, 5])], inits)
    _zero_cols(model, "W1", [0, 4, 9], axis=0)
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 3
    assert model.graph.initializers["W1"].const_value.shape == (7, 6)
    assert model.graph.initializers["W2"].const_value.shape == (3, 7)
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize("where", ["activation", "weight"])
def test_mask_multiplied_in_graph(where, rng):
    """Masks left in the graph (torch.nn.utils.prune's weight_orig * weight_mask, or a channel mask on an
    activation): the zero comes from the mask, and the mask is sliced with the weight."""
    if where == "weight":
        nodes = [
            helper.make_node("Mul", ["W1", "M"], ["W1m"], name="apply_mask"),
            helper.make_node("MatMul", ["X", "W1m"], ["H"], name="fc1"),
            helper.make_node("Relu", ["H"], ["A"], name="relu"),
        ]
        mask = np.ones((6, 10), np.float32)
        mask[:, [2, 3, 7]] = 0
    else:
        nodes = [
            helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
            helper.make_node("Mul", ["H", "M"], ["A"], name="apply_mask"),
        ]
        mask = np.ones(10, np.float32)
        mask[[2, 3, 7]] = 0
    nodes.append(helper.make_node("MatMul", ["A", "W2"], ["Y"], name="fc2"))
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "M": mask,
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 3
    assert model.graph.initializers["M"].const_value.shape == (*mask.shape[:-1], 7)
    assert np.all(model.graph.initializers["M"].const_value.numpy() == 1)
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize("op", ["Reshape", "Slice"])
def test_two_axes_of_one_group_through_one_node(op, rng):
    """An outer product h h^T has two axes in one group; a Reshape/Slice keeping both carries two widths."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),  # [N, 10]
        helper.make_node("Unsqueeze", ["H", "two"], ["Hc"], name="col"),  # [N, 10, 1]
        helper.make_node("Unsqueeze", ["H", "one"], ["Hr"], name="row"),  # [N, 1, 10]
        helper.make_node("Mul", ["Hc", "Hr"], ["O"], name="outer"),  # [N, 10, 10]
        helper.make_node("MatMul", ["R", "W2"], ["P"], name="fc2"),  # [N, 10, 3]
        helper.make_node("Transpose", ["P"], ["PT"], name="t", perm=[0, 2, 1]),  # [N, 3, 10]
        helper.make_node("MatMul", ["PT", "W3"], ["Y"], name="fc3"),  # [N, 3, 2]
    ]
    if op == "Reshape":
        nodes.insert(4, helper.make_node("Reshape", ["O", "shape"], ["R"], name="reshape"))
    else:
        nodes.insert(4, helper.make_node("Slice", ["O", "st", "en", "ax"], ["R"], name="slice"))
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 3)).astype(np.float32),
        "W3": rng.standard_normal((10, 2)).astype(np.float32),
        "one": np.array([1], np.int64),
        "two": np.array([2], np.int64),
        "shape": np.array([-1, 10, 10], np.int64),
        "st": np.array([0, 0], np.int64),
        "en": np.array([10, 10], np.int64),
        "ax": np.array([1, 2], np.int64),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3, 2])], inits)
    if op == "Slice":
        _zero_cols(model, "W1", [1, 5, 8])  # zero rows and columns of the outer product
    else:  # zero consumer rows (a Reshape with two axes in one class cannot tell which input axis is which)
        _zero_cols(model, "W2", [1, 5, 8], axis=0)
        _zero_cols(model, "W3", [1, 5, 8], axis=0)
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 3
    (node,) = [n for n in model.graph if n.op_type == op]
    if op == "Reshape":
        assert node.inputs[1].const_value.numpy().tolist() == [-1, 7, 7]
    else:
        assert node.inputs[2].const_value.numpy().tolist() == [7, 7]
    assert_same_outputs(reference, model, rng)


def test_float16_weights_keep_their_type(rng):
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
        helper.make_node("Add", ["H", "B1"], ["A"], name="bias"),
        helper.make_node("Relu", ["A"], ["R"], name="relu"),
        helper.make_node("MatMul", ["R", "W2"], ["Y"], name="fc2"),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float16),
        "B1": rng.standard_normal(10).astype(np.float16),
        "W2": rng.standard_normal((10, 3)).astype(np.float16),
    }
    io = TensorProto.FLOAT16
    model = _graph(nodes, [tensor_info("X", ["N", 6], io)], [tensor_info("Y", ["N", 3], io)], inits)
    _zero_cols(model, "W1", [0, 3])
    _zero_cols(model, "B1", [0, 3], axis=0)
    reference = snapshot(model)
    assert outcome(_prune(model))["channels_removed"] == 2
    for name, shape in (("W1", (6, 8)), ("B1", (8,)), ("W2", (8, 3))):
        value = model.graph.initializers[name]
        assert value.const_value.shape == shape and value.const_value.dtype == ir.DataType.FLOAT16
    feeds = {"X": rng.standard_normal((3, 6)).astype(np.float16)}
    np.testing.assert_allclose(
        run(reference, feeds, threads=1)["Y"], run(model, feeds, threads=1)["Y"], rtol=2e-3, atol=2e-3
    )


def test_groups_in_one_module_are_counted_apart(rng):
    """Two groups whose contractions sit in one module get distinct ids, so the record counts both."""

    def scoped(node):
        entry = node.metadata_props.add()
        entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr(["", "block", node.name])
        return node

    nodes = [
        scoped(helper.make_node("MatMul", ["X", "W1"], ["H1"], name="fc1")),
        scoped(helper.make_node("Relu", ["H1"], ["R1"], name="relu1")),
        scoped(helper.make_node("MatMul", ["R1", "W2"], ["H2"], name="fc2")),
        scoped(helper.make_node("Relu", ["H2"], ["R2"], name="relu2")),
        scoped(helper.make_node("MatMul", ["R2", "W3"], ["Y"], name="fc3")),
    ]
    inits = {
        "W1": rng.standard_normal((6, 10)).astype(np.float32),
        "W2": rng.standard_normal((10, 8)).astype(np.float32),
        "W3": rng.standard_normal((8, 3)).astype(np.float32),
    }
    model = _graph(nodes, [tensor_info("X", ["N", 6])], [tensor_info("Y", ["N", 3])], inits)
    _zero_cols(model, "W1", [1, 2])
    _zero_cols(model, "W2", [0, 4, 5])
    reference = snapshot(model)
    analysis = analyze_channels(model)
    pass_ = _prune(model)
    ids = [g.id for g in analysis.groups]
    assert len(ids) == len(set(ids)), ids
    assert pass_.record["channels_removed"] == 5 and pass_.record["groups_changed"] == 2
    assert sorted(g["removed"] for g in pass_.record["per_group"].values()) == [2, 3]
    assert_same_outputs(reference, model, rng)


def test_concat_branch_fully_zero(cnns, rng):
    """Every channel of one concat branch is zero: that branch keeps min_width channels of its own."""
    model = fresh("cnns")
    zero_conv_out(model, "concat.a", range(5))
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert node_in_scope(model, "concat.a", "Conv").inputs[1].shape[0] >= 1
    assert record["per_group"]["concat.fuse"]["removed"] == 4
    assert_same_outputs(reference, model, rng)


@pytest.mark.parametrize("use_split", [True, False])
def test_split_part_fully_zero(use_split, rng):
    model = _slice_split_model(rng, use_split=use_split)
    _zero_cols(model, "W", [8, 9, 10, 11])  # the whole "extra" part
    reference = snapshot(model)
    record = outcome(_prune(model))
    assert record["channels_removed"] == 3
    assert model.graph.initializers["W"].const_value.shape == (6, 9)
    assert_same_outputs(reference, model, rng)


def _zero_atoms_of(group, atoms, slots) -> None:
    for ci, cls in enumerate(group.classes):
        index = sorted({i for a in atoms for c, i in group.atoms[a] if c == ci})
        for slot in cls:
            if slot in slots and slot.is_const:
                data = slot.value.const_value.numpy().copy()
                cut = [slice(None)] * data.ndim
                cut[slot.axis] = index
                data[tuple(cut)] = 0
                slot.value.const_value = ir.tensor(data, name=slot.value.name)


@pytest.mark.parametrize("name", ["mlps", "cnns"])
@pytest.mark.parametrize("side", ["consumer", "producer"])
def test_every_prunable_group_at_once(name, side, rng):
    """All groups of a zoo pruned in one run, zeros on the reading side (the contractions' constant
    operands) or on the writing side (every other constant of the group: weights, biases, BN, scales)."""
    model = fresh(name)
    analysis = analyze_channels(model)
    chosen = {}
    for group in (g for g in analysis.groups if g.prunable):
        atoms = sorted(rng.choice(len(group.atoms), max(1, len(group.atoms) // 3), replace=False).tolist())
        readers = {s for c in group.contractions for s in (c.lhs, c.rhs)}
        writers = {s for s in group.slots if s not in readers and s.value not in {r.value for r in readers}}
        _zero_atoms_of(group, atoms, readers if side == "consumer" else writers)
        chosen[group.id] = len(atoms)
    reference = snapshot(model)
    record = outcome(_prune(model))
    if side == "consumer":  # every chosen channel is removable from its readers alone
        assert {k: v["removed"] for k, v in record["per_group"].items()} == chosen
    else:  # sigmoid maps zero to the constant 0.5, which folds into the next bias; the rest map zero to zero
        removed = {k: v["removed"] for k, v in record["per_group"].items()}
        assert removed == chosen
        folded = {k: v.get("constant_folded", 0) for k, v in record["per_group"].items()}
        assert {k for k, v in folded.items() if v} == {k for k in chosen if k.startswith("sigmoid.")}
    assert_same_outputs(reference, model, rng)
