"""Constant channels (zero weights, non-zero bias: ``torch.nn.utils.prune.ln_structured``) fold exactly.

A channel that is act(bias) at every position is removed and its contribution k·W[c] added to the
consumer's bias where the consumer reads it at every output position (MatMul, Gemm, unpadded Conv); a
padded Conv keeps it and says why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.utils.prune as prune

from prune2deploy import api
from prune2deploy.frontends.torch import ExportSpec
from prune2deploy.spec import CompileOptions
from tests.fixtures.results import pass_record

FAST = {"profile": False}


class _MLP(torch.nn.Module):
    def __init__(self, act: torch.nn.Module, *, out_bias: bool = True) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.act = act
        self.fc2 = torch.nn.Linear(32, 8, bias=out_bias)
        self.example_inputs = ExportSpec({"x": torch.randn(2, 16)}, {"x": {0: "batch"}}, ["y"])

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Conv(torch.nn.Module):
    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 8, kernel, padding=kernel // 2)
        self.example_inputs = ExportSpec({"x": torch.randn(2, 3, 8, 8)}, {"x": {0: "batch"}}, ["y"])
        with torch.no_grad():  # relu(bias) > 0: the pruned channels are constants, not zeros
            self.conv1.bias.uniform_(0.1, 0.5)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _compiled(module, tmp_path) -> tuple[dict, ir.Model]:
    result = api.compile(module, tmp_path / "out", CompileOptions(**FAST))
    assert result.report["verification"]["passed"]
    assert all(o["max_rel"] < 1e-4 for o in result.report["verification"]["outputs"].values())
    return result.report, ir.load(str(tmp_path / "out" / "model.onnx"))


def _widths(model: ir.Model, *ops: str) -> list[tuple[int, ...]]:
    """Sorted (in, out) widths of the contractions' weights (Gemm's transB layout undone)."""
    widths = []
    for node in model.graph:
        if node.op_type in ops:
            shape = tuple(node.inputs[1].const_value.shape)
            if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                shape = shape[::-1]
            widths.append(shape)
    return sorted(widths)


@pytest.mark.parametrize(("act", "out_bias"), [(torch.nn.GELU(), True), (torch.nn.SiLU(), False)])
def test_ln_structured_linear_folds_into_the_next_bias(act, out_bias, tmp_path):
    torch.manual_seed(0)
    module = _MLP(act, out_bias=out_bias).eval()
    prune.ln_structured(module.fc1, "weight", amount=0.5, n=2, dim=0)  # zero rows, bias untouched
    assert torch.count_nonzero(module.fc1.bias) == 32
    report, model = _compiled(module, tmp_path)
    record = pass_record(report, "remove-channels")
    assert record["channels_removed"] == 16 and record["constant_channels_folded"] == 16
    assert _widths(model, "MatMul", "Gemm") == [(16, 8), (16, 16)]


def test_ln_structured_conv_folds_into_a_1x1_conv(tmp_path):
    torch.manual_seed(0)
    module = _Conv(kernel=1).eval()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 1.5)
    prune.ln_structured(module.conv1, "weight", amount=0.25, n=1, dim=0)
    report, model = _compiled(module, tmp_path)
    assert pass_record(report, "remove-channels")["constant_channels_folded"] == 4
    assert _widths(model, "Conv") == [(8, 12, 1, 1), (12, 3, 3, 3)]


def test_padded_conv_keeps_a_constant_channel_and_says_why(tmp_path):
    torch.manual_seed(0)
    module = _Conv(kernel=3).eval()
    prune.ln_structured(module.conv1, "weight", amount=0.25, n=1, dim=0)
    report, model = _compiled(module, tmp_path)
    record = pass_record(report, "remove-channels")
    assert record["channels_removed"] == 0
    assert any("pads its input" in reason for reason in record["refused"].values())
    assert _widths(model, "Conv") == [(8, 16, 3, 3), (16, 3, 3, 3)]


def test_constant_channel_of_a_graph_built_in_code():
    """MatMul → Add(bias) → Relu → MatMul without bias: the fold inserts an Add; outputs unchanged."""
    from onnx import helper
    from onnx_ir.passes.common import ShapeInferencePass

    from prune2deploy.passes.remove_channels import RemoveChannelsPass
    from tests.fixtures.graphs import helper_model, run, snapshot, tensor_info

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 6)).astype(np.float32)
    w1[:, [1, 4]] = 0
    b1 = rng.normal(size=6).astype(np.float32) + 1.0
    w2 = rng.normal(size=(6, 5)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "B1"], ["a"], name="bias1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    model = helper_model(
        nodes, [tensor_info("x", ["batch", 8])], [tensor_info("y", ["batch", 5])], {"W1": w1, "B1": b1, "W2": w2}
    )
    model = ShapeInferencePass()(model).model
    reference = snapshot(model)
    result = RemoveChannelsPass()(model)
    assert result.record["constant_channels_folded"] == 2 and result.record["channels_removed"] == 2
    assert model.graph.initializers["W2"].const_value.shape == (4, 5)
    feeds = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feeds)["y"], run(reference, feeds)["y"], rtol=1e-5, atol=1e-5)


class _ConvAct(torch.nn.Module):
    """conv → BN → act → 1×1 conv: MobileNet's ReLU6 exports as Clip(x, 0, 6)."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.act = act
        self.conv2 = torch.nn.Conv2d(16, 8, 1)
        self.example_inputs = ExportSpec({"x": torch.randn(2, 3, 8, 8)}, {"x": {0: "batch"}}, ["y"])
        with torch.no_grad():  # BN shifts in (0.1, 0.5): the pruned channels are constants inside (0, 6)
            self.bn.running_mean.uniform_(-0.5, -0.1)
            self.bn.bias.zero_()

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("act", [torch.nn.ReLU6(), torch.nn.Hardtanh(-0.2, 0.3)], ids=["relu6", "hardtanh"])
def test_constant_channel_through_clip_folds(act, tmp_path):
    torch.manual_seed(0)
    module = _ConvAct(act).eval()
    prune.ln_structured(module.conv1, "weight", amount=0.25, n=1, dim=0)
    report, model = _compiled(module, tmp_path)
    assert pass_record(report, "remove-channels")["constant_channels_folded"] == 4
    assert _widths(model, "Conv") == [(8, 12, 1, 1), (12, 3, 3, 3)]


class _ExpandDepthwise(torch.nn.Module):
    """1×1 expand → ReLU → padded depthwise 3×3 → ReLU → 1×1 project (MobileNetV2 without BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = torch.nn.Conv2d(3, 8, 1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = torch.nn.Conv2d(8, 4, 1)
        self.example_inputs = ExportSpec({"x": torch.randn(2, 3, 8, 8)}, {"x": {0: "batch"}}, ["y"])
        with torch.no_grad():
            self.expand.bias.uniform_(-0.5, -0.1)  # a pruned expand channel is relu(bias) = 0 ...
            self.dw.bias.uniform_(0.1, 0.5)  # ... so the dw conv gives relu(its bias) there: a constant

    def forward(self, x):
        return self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))


def test_depthwise_conv_of_a_constant_zero_channel_gives_its_bias(tmp_path):
    """The expand channel is zero only as a constant (ReLU of a negative bias), not structurally: the padded
    depthwise conv still reads zeros there, so its output is its bias, which folds into the projection."""
    torch.manual_seed(0)
    module = _ExpandDepthwise().eval()
    prune.ln_structured(module.expand, "weight", amount=0.25, n=1, dim=0)
    report, model = _compiled(module, tmp_path)
    assert pass_record(report, "remove-channels")["channels_removed"] == 2
    assert _widths(model, "Conv") == [(4, 6, 1, 1), (6, 1, 3, 3), (6, 3, 1, 1)]
