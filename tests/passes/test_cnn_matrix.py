"""Issue 14's CNN matrix: five CNN styles, masked as users mask them, compiled by the default pipeline.

Each (family, mask) pair: ``torch.nn.utils.prune.ln_structured`` on conv / linear weights (bias left: the
channel becomes the constant act(bias) or a BN-shifted constant), a SCOP-style BN mask (gamma and beta
zeroed: the channel becomes zero) or, for ConvNeXt, residual-stream channels zeroed in every block. The
compiled model must be exact against the masked reference on ONNX Runtime (max |diff| <= 1e-4 of the
output's scale), smaller, with the masked convs really narrower by exactly the channels that can go; the
channels that cannot go exactly (constants before a padded conv, a padded depthwise conv or a
Squeeze-Excite gate) stay, and the pass's refusals say why.

The expected widths are computed from the masks and the module's BN statistics (a pruned channel whose
BN shift is negative is zero after ReLU, and goes even before a padded conv), never written in.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from prune2deploy.graph.scopes import module_of
from prune2deploy.pipeline import build_passes, run_pipeline
from prune2deploy.spec import CompileOptions
from tests import families
from tests.fixtures import cnn_families as cf

F = torch.nn.functional


def _shift(module: torch.nn.Module, name: str) -> torch.Tensor:
    """What an eval-mode BN outputs for a zero input channel: beta - mean·gamma/sqrt(var + eps)."""
    bn = module.get_submodule(name)
    return (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


def _zero_after(module, bn: str, channels: list[int], act) -> list[int]:
    """The channels among ``channels`` that act(BN shift) makes exactly zero."""
    values = act(_shift(module, bn))
    return [c for c in channels if float(values[c]) == 0.0]


def _per_group_min(channels: list[int], width: int, groups: int) -> int:
    """Channels a grouped conv loses on one side: the same count from every group, the smallest group's."""
    size = width // groups
    return groups * min(sum(1 for c in channels if c // size == g) for g in range(groups))


# (family, mask) -> masked -> ({(module, weight axis): width}, [phrases the refusals must contain])
def _resnet_ln(m: cf.Masked):
    widths, refusals = {}, []
    for block, width in (("layer1", 16), ("layer2", 32)):
        masked = m.channels[f"{block}.conv1"]
        zero = _zero_after(m.module, f"{block}.bn1", masked, F.relu)
        assert len(zero) < len(masked), "the test needs constant channels that a padded conv keeps"
        widths[(f"{block}.conv1", 0)] = width - len(zero)
        widths[(f"{block}.conv2", 1)] = width - len(zero)
        refusals.append("pads its input")
    return widths, refusals


def _resnet_bn(m: cf.Masked):
    widths = {}
    for block, width in (("layer1", 16), ("layer2", 32)):
        removed = len(m.channels[f"{block}.bn1"])
        widths |= {(f"{block}.conv1", 0): width - removed, (f"{block}.conv2", 1): width - removed}
    return widths, []


def _mobilenet_ln(m: cf.Masked):
    dw1, dw2, expand2 = (m.channels[k] for k in ("block1.dw.0", "block2.dw.0", "block2.expand.0"))
    # block1: a constant dw channel is multiplied by its SE gate, so only exact zeros go.
    gone1 = _zero_after(m.module, "block1.dw.1", dw1, F.hardswish)
    # block2 (no SE): a constant dw channel folds into project; a constant expand channel goes only when ReLU6
    # makes it zero (then the dw conv sees zeros and gives its bias), else the padded dw conv keeps it.
    gone2 = sorted(set(dw2) | set(_zero_after(m.module, "block2.expand.1", expand2, F.relu6)))
    assert len(gone2) < len(set(dw2) | set(expand2)), "the test needs an expand channel the dw conv keeps"
    widths = {
        ("block1.dw.0", 0): 64 - len(gone1),
        ("block1.project.0", 1): 64 - len(gone1),
        ("block2.expand.0", 0): 48 - len(gone2),
        ("block2.dw.0", 0): 48 - len(gone2),
        ("block2.project.0", 1): 48 - len(gone2),
    }
    return widths, ["Squeeze-Excite", "depthwise Conv) pads its input"]


def _mobilenet_bn(m: cf.Masked):
    gone1, gone2 = len(m.channels["block1.dw.1"]), len(m.channels["block2.expand.1"])
    widths = {
        ("block1.expand.0", 0): 64 - gone1,
        ("block1.se.fc1", 1): 64 - gone1,
        ("block1.se.fc2", 0): 64 - gone1,
        ("block1.project.0", 1): 64 - gone1,
        ("block2.dw.0", 0): 48 - gone2,  # a zero input to the dw conv gives its bias: folded into project
        ("block2.project.0", 1): 48 - gone2,
    }
    return widths, []


def _densenet_ln(m: cf.Masked):
    bottleneck = m.channels["block1.1.conv1"]
    zero = _zero_after(m.module, "block1.1.norm2", bottleneck, F.relu)
    assert len(zero) < len(bottleneck)
    widths = {
        # growth channels are read only by pre-activation BN → ReLU → 1×1 convs (and the head): they fold
        ("block1.0.conv2", 0): 8 - len(m.channels["block1.0.conv2"]),
        ("block1.1.conv1", 0): 32 - len(zero),  # the 3×3 after it pads: only zeros go
        ("block1.1.conv2", 1): 32 - len(zero),
        ("block2.1.conv2", 0): 8 - len(m.channels["block2.1.conv2"]),
        ("fc", 1): 36 - len(m.channels["block2.1.conv2"]),
    }
    return widths, ["pads its input"]


def _densenet_bn(m: cf.Masked):
    widths = {}
    for block in ("block1.0", "block2.0"):
        gone = len(m.channels[f"{block}.norm2"])
        widths |= {(f"{block}.conv1", 0): 32 - gone, (f"{block}.conv2", 1): 32 - gone}
    return widths, []


def _resnext_ln(m: cf.Masked):
    widths = {}
    for block in ("block1", "block2"):
        gone = _per_group_min(m.channels[f"{block}.grouped.0"], 32, 4)
        assert 0 < gone < len(m.channels[f"{block}.grouped.0"]), "the test needs uneven groups"
        widths |= {(f"{block}.grouped.0", 0): 32 - gone, (f"{block}.expand.0", 1): 32 - gone}
    return widths, []


def _resnext_bn(m: cf.Masked):
    into = _per_group_min(m.channels["block1.reduce.1"], 32, 4)  # the grouped conv's input side
    out = _per_group_min(m.channels["block2.grouped.1"], 32, 4)  # its output side
    assert into > 0 and out > 0
    widths = {
        ("block1.reduce.0", 0): 32 - into,
        ("block1.grouped.0", 1): (32 - into) // 4,  # weight [C_out, C_in / groups, 3, 3]
        ("block2.grouped.0", 0): 32 - out,
        ("block2.expand.0", 1): 32 - out,
    }
    return widths, []


def _convnext_ln(m: cf.Masked):
    widths = {}
    for block, hidden in (("stage1.0", 64), ("stage2.0", 128)):
        gone = len(m.channels[f"{block}.pwconv1"])  # gelu(bias): constants, folded into pwconv2's bias
        widths |= {(f"{block}.pwconv1", 0): hidden - gone, (f"{block}.pwconv2", 1): hidden - gone}
    return widths, []


def _convnext_stream(m: cf.Masked):
    first, second = 16 - len(m.channels["stem.0"]), 32 - len(m.channels["downsample.1"])
    widths = {("stem.0", 0): first, ("downsample.1", 1): first}
    widths |= {("downsample.1", 0): second, ("fc", 1): second}
    for block in ("stage1.0", "stage1.1"):
        widths |= {(f"{block}.dwconv", 0): first, (f"{block}.pwconv1", 1): first, (f"{block}.pwconv2", 0): first}
    widths |= {("stage2.0.dwconv", 0): second, ("stage2.0.pwconv1", 1): second, ("stage2.0.pwconv2", 0): second}
    return widths, []


EXPECTED = {
    ("resnet", "ln"): _resnet_ln,
    ("resnet", "bn"): _resnet_bn,
    ("mobilenet", "ln"): _mobilenet_ln,
    ("mobilenet", "bn"): _mobilenet_bn,
    ("densenet", "ln"): _densenet_ln,
    ("densenet", "bn"): _densenet_bn,
    ("resnext", "ln"): _resnext_ln,
    ("resnext", "bn"): _resnext_bn,
    ("convnext", "ln"): _convnext_ln,
    ("convnext", "stream"): _convnext_stream,
}


def _weights(model: ir.Model) -> dict[str, tuple[int, ...]]:
    """Weight shape of each Conv / MatMul / Gemm by torch module (a MatMul's weight is [in, out])."""
    shapes = {}
    for node in model.graph:
        if node.op_type in ("Conv", "MatMul", "Gemm") and node.inputs[1].const_value is not None:
            name = node.inputs[1].name
            key = name.removesuffix(".weight") if name.endswith(".weight") else module_of(node)
            shape = tuple(node.inputs[1].const_value.shape)
            shapes[key] = shape[::-1] if node.op_type == "MatMul" else shape  # as torch's Linear: [out, in]
    return shapes


@pytest.fixture(scope="module")
def compiled():
    """(family, mask) -> (masked reference bytes, compiled model, pipeline result), compiled once."""
    cache = {}

    def get(name: str, mask: str):
        if (name, mask) not in cache:
            model = cf.fresh(name, mask)
            reference = ir.to_proto(model).SerializeToString()
            result = run_pipeline(model, build_passes(CompileOptions(profile=False, portable=True)))
            cache[(name, mask)] = (reference, model, result)
        return cache[(name, mask)]

    return get


@pytest.mark.parametrize(("name", "mask"), list(EXPECTED))
def test_cnn_matrix_is_exact_smaller_and_narrower(name, mask, compiled):
    reference, model, result = compiled(name, mask)
    masked = cf.masked(name, mask)
    widths, refusals = EXPECTED[(name, mask)](masked)
    assert result.exact
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)}
    expected, actual = families.run(reference, feeds), families.run(model, feeds)
    for key, value in expected.items():
        scale = max(1.0, float(np.abs(value).max()))
        assert actual[key].shape == value.shape
        assert float(np.abs(actual[key] - value).max()) <= 1e-4 * scale, key
    before = cf.param_count(ir.from_proto(onnx.ModelProto.FromString(reference)))
    assert cf.param_count(model) < before
    shapes = _weights(model)
    assert {(k, axis): shapes[k][axis] for k, axis in widths} == widths
    refused = " | ".join(next(r for r in result.passes if r.name == "remove-channels").refused.values())
    for phrase in refusals:
        assert phrase in refused, refused


def test_convnext_stream_norms_keep_their_statistics(compiled):
    """Every LayerNorm on the residual stream (stem, blocks, downsample, head) lost channels and was rebuilt
    with the full width's statistics: none is left as a LayerNormalization."""
    _, model, result = compiled("convnext", "stream")
    record = next(r for r in result.passes if r.name == "remove-channels").record
    assert sum(g.get("layernorms_rescaled", 0) for g in record["per_group"].values()) == 6
    assert "LayerNormalization" not in {n.op_type for n in model.graph}


def test_grouped_conv_keeps_its_group_count(compiled):
    _, model, _ = compiled("resnext", "ln")
    groups = [n.attributes["group"].value for n in model.graph if n.op_type == "Conv" and "group" in n.attributes]
    assert groups.count(cf.ResNeXtStyle.groups) == 2
