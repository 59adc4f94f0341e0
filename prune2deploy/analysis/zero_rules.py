"""Which channels of a tensor are provably zero for every input.

A weight slot is zero at channel c when every entry with index c on that axis is zero. An activation slot
is zero when its producer maps zeros to zeros at c: a MatMul whose weight column c is zero, a ReLU of a
zero, a product with a zero factor, a sum of zeros. Ops without a rule answer "not zero", which is always
safe: it can only keep a channel that could have gone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.slots import ChannelFacts, Slot
from prune2deploy.graph.attributes import float_attr, int_attr, ints_attr
from prune2deploy.graph.constants import all_zero, zero_channels
from prune2deploy.graph.dims import value_dim

__all__ = ["const_zero_mask", "zero_mask"]

# Ops that move axes around: the input axis is found through the channel classes, not by alignment.
_LAYOUT = frozenset(
    (
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Expand",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Resize",
        "Upsample",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceL2",
        "ReduceL1",
        "ReduceSumSquare",
    )
)

# f(0) == 0 for these, so a zero channel stays zero (elementwise ones, plus every layout op).
_ZERO_PRESERVING = _LAYOUT | frozenset(
    (
        "Relu",
        "LeakyRelu",
        "Gelu",
        "Erf",
        "Tanh",
        "HardSwish",
        "Elu",
        "Selu",
        "Celu",
        "Softsign",
        "Mish",
        "Neg",
        "Abs",
        "Sqrt",
        "Sin",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Identity",
        "Cast",
        "Dropout",
        "ThresholdedRelu",
        "IsNaN",
        "IsInf",
        "Transpose",
    )
)


def const_zero_mask(value: ir.Value, axis: int) -> np.ndarray:
    """Per channel of ``axis``: every entry of the constant ``value`` with that index is zero."""
    return zero_channels(value.const_value.numpy(), axis)


def _width(slot: Slot) -> int | None:
    d = value_dim(slot.value, slot.axis)
    return d if isinstance(d, int) else None


def _linked_input(analysis: ChannelFacts, value: ir.Value | None, out: Slot) -> Slot | None:
    """The axis of ``value`` that is the same channel space as ``out`` (None if broadcast or absent)."""
    if value is None or value.shape is None:
        return None
    root = analysis._same.find(out)
    found = [
        Slot(value, axis)
        for axis in range(len(value.shape))
        if Slot(value, axis) in analysis._same.parent and analysis._same.find(Slot(value, axis)) == root
    ]
    return found[0] if len(found) == 1 else None  # two axes in one class: ambiguous, answer "not zero"


def _aligned(value: ir.Value | None, out: Slot, width: int) -> Slot | None:
    """Numpy-broadcast alignment of an elementwise operand with an output axis."""
    if value is None or value.shape is None or out.value.shape is None:
        return None
    axis = out.axis - (len(out.value.shape) - len(value.shape))
    if axis < 0 or value_dim(value, axis) != width:
        return None
    return Slot(value, axis)


def _operand(
    analysis: ChannelFacts, value: ir.Value | None, out: Slot, width: int, *, elementwise: bool = True
) -> np.ndarray:
    """Zero mask of the operand's slot that feeds ``out``; a broadcast operand is zero only if all-zero."""
    linked = _aligned(value, out, width) if elementwise else _linked_input(analysis, value, out)
    if linked is not None:
        mask = analysis.zero_mask(linked)
        if mask is not None and mask.shape == (width,):
            return mask
        return np.zeros(width, dtype=bool)
    return np.full(width, all_zero(value))


def zero_mask(analysis: ChannelFacts, slot: Slot) -> np.ndarray | None:
    width = _width(slot)
    if width is None:
        return None
    if slot.value.const_value is not None:
        return const_zero_mask(slot.value, slot.axis)
    node = slot.value.producer()
    none = np.zeros(width, dtype=bool)
    if node is None or node.domain not in ("", "ai.onnx"):
        return none
    op = node.op_type
    inputs = list(node.inputs)
    try:
        if op in ("MatMul", "Gemm", "Conv"):
            return _contraction_output(analysis, node, slot, width)
        if op == "BatchNormalization":
            return _batchnorm(analysis, node, slot, width)
        if op in ("Add", "Sub", "Max", "Min"):
            return _operand(analysis, inputs[0], slot, width) & _operand(analysis, inputs[1], slot, width)
        if op == "Where":
            return _operand(analysis, inputs[1], slot, width) & _operand(analysis, inputs[2], slot, width)
        if op == "Mul":
            return _operand(analysis, inputs[0], slot, width) | _operand(analysis, inputs[1], slot, width)
        if op == "Div":
            denominator = inputs[1]
            if denominator.const_value is not None and not np.all(denominator.const_value.numpy() != 0):
                return none
            return _operand(analysis, inputs[0], slot, width)
        if op == "Pow":
            exponent = inputs[1].const_value
            if exponent is None or not np.all(exponent.numpy() > 0):
                return none
            return _operand(analysis, inputs[0], slot, width)
        if op == "Clip":
            bounds = [
                v.const_value.numpy() if v is not None and v.const_value is not None else None for v in inputs[1:3]
            ]
            lo = bounds[0] if len(bounds) > 0 else None
            hi = bounds[1] if len(bounds) > 1 else None
            if (lo is not None and np.any(lo > 0)) or (hi is not None and np.any(hi < 0)):
                return none
            return _operand(analysis, inputs[0], slot, width)
        if op == "Concat":
            return _concat(analysis, node, slot, width)
        if op in ("Split", "Slice"):
            for part, whole, offset in analysis._segments:
                if part == slot:
                    mask = analysis.zero_mask(whole)
                    return none if mask is None else mask[offset : offset + width]
            return _operand(analysis, inputs[0], slot, width)
        if op == "Gather":
            return _operand(analysis, inputs[0], slot, width, elementwise=False)
        if op == "Transpose":
            rank = len(inputs[0].shape)
            perm = ints_attr(node, "perm", list(reversed(range(rank))))
            mask = analysis.zero_mask(Slot(inputs[0], perm[slot.axis]))
            return none if mask is None else mask
        if op in _ZERO_PRESERVING:
            elementwise = op not in _LAYOUT
            return _operand(analysis, inputs[0], slot, width, elementwise=elementwise)
    except (AttributeError, IndexError, ValueError):
        return none
    return none


def _contraction_output(analysis: ChannelFacts, node: ir.Node, slot: Slot, width: int) -> np.ndarray:
    """MatMul/Gemm/Conv: zero where the producing weight column (and bias) is zero."""
    inputs = list(node.inputs)
    bias = inputs[2] if len(inputs) > 2 else None
    none = np.zeros(width, dtype=bool)

    def mask_of(value: ir.Value, axis: int) -> np.ndarray:
        mask = analysis.zero_mask(Slot(value, axis))
        return none if mask is None or mask.shape != (width,) else mask

    if node.op_type == "Conv":
        if slot.axis != 1:
            return none
        weight_zero = mask_of(inputs[1], 0)
        if int_attr(node, "group", 1) > 1:  # depthwise: a zero input channel also gives zero
            weight_zero = weight_zero | mask_of(inputs[0], 1)
        bias_zero = np.ones(width, dtype=bool) if bias is None else mask_of(bias, 0)
        return weight_zero & bias_zero
    a, b = inputs[0], inputs[1]
    rank_out = len(slot.value.shape)
    if node.op_type == "MatMul":
        if slot.axis == rank_out - 1:
            return mask_of(b, len(b.shape) - 1)
        if slot.axis == rank_out - 2:
            return mask_of(a, len(a.shape) - 2)
        return none
    if slot.axis == 1:
        product = mask_of(b, 0 if int_attr(node, "transB", 0) else 1)
    else:
        product = mask_of(a, 1 if int_attr(node, "transA", 0) else 0)
    if bias is not None:
        product = product & _operand(analysis, bias, slot, width)
    return product


def _batchnorm(analysis: ChannelFacts, node: ir.Node, slot: Slot, width: int) -> np.ndarray:
    x, scale, b, mean, var = node.inputs[:5]
    if slot.axis != 1:
        return np.zeros(width, dtype=bool)
    eps = float_attr(node, "epsilon", 1e-5)
    s, bb, mu, v = (t.const_value.numpy().astype(np.float64) for t in (scale, b, mean, var))
    shift = bb - mu * s / np.sqrt(v + eps)
    by_params = (s == 0) & (bb == 0)
    by_input = _operand(analysis, x, slot, width) & (shift == 0)
    return by_params | by_input


def _concat(analysis: ChannelFacts, node: ir.Node, slot: Slot, width: int) -> np.ndarray:
    pieces = [(part, offset) for part, whole, offset in analysis._segments if whole == slot]
    if pieces:
        result = np.zeros(width, dtype=bool)
        for part, offset in pieces:
            mask = analysis.zero_mask(part)
            if mask is not None:
                result[offset : offset + len(mask)] = mask
        return result
    result = np.ones(width, dtype=bool)
    for value in node.inputs:
        result &= _operand(analysis, value, slot, width)
    return result
