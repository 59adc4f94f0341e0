"""Which channels of a tensor are provably zero, or provably constant, for every input.

A weight slot is zero at channel c when every entry with index c on that axis is zero. An activation slot
is zero when its producer maps zeros to zeros at c: a MatMul whose weight column c is zero, a ReLU of a
zero, a product with a zero factor, a sum of zeros. Ops without a rule answer "not zero", which is always
safe: it can only keep a channel that could have gone.

A *constant* channel holds one known value at every position for every input: what a zero weight column
with a non-zero bias produces (``torch.nn.utils.prune.ln_structured`` leaves exactly that), then carried
through elementwise activations, BatchNormalization, pooling and layout ops by evaluating the op on the
per-channel values. :func:`const_channel_values` answers with NaN where a channel is not provably constant
(a zero channel is the constant 0).
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.slots import ChannelFacts, Slot
from prune2deploy.graph.attributes import float_attr, int_attr, ints_attr
from prune2deploy.graph.constants import all_zero, zero_channels
from prune2deploy.graph.dims import value_dim
from prune2deploy.graph.op_categories import ZERO_AT_ZERO

__all__ = ["const_channel_values", "const_zero_mask", "why_not_constant", "zero_mask"]

# Ops that move axes around: the input axis is found through the channel classes, not by alignment. A
# hand-picked subset of the table's views, data movement, pools and reductions: those whose output channel
# is zero wherever the input channel is (a max or mean of zeros is zero; ReduceLogSum's is not).
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

# A zero channel stays zero: elementwise ops with f(0) == 0 (the table's ZERO_AT_ZERO), plus every layout
# op. Transpose has its own rule above the lookup; it is listed for completeness.
_ZERO_PRESERVING = _LAYOUT | ZERO_AT_ZERO | {"Transpose"}


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
        if op == "LayerNormalization":
            return _layernorm_out(node, slot, width)
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
        if _depthwise(node):  # a zero input channel also gives zero (not in a grouped conv: it mixes)
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


def _depthwise(node: ir.Node) -> bool:
    """One input channel per output channel (group == C_in == C_out): channel c out reads channel c alone."""
    groups = int_attr(node, "group", 1)
    x, y = node.inputs[0], node.outputs[0]
    return groups > 1 and value_dim(x, 1) == groups and value_dim(y, 1) == groups


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


def _layernorm_out(node: ir.Node, slot: Slot, width: int) -> np.ndarray:
    """A LayerNorm's output channel is zero wherever its scale and bias are (whatever its input)."""
    rank = len(slot.value.shape)
    scale, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if slot.axis != rank - 1 or int_attr(node, "axis", -1) % rank != rank - 1 or scale.const_value is None:
        return np.zeros(width, dtype=bool)
    zero = const_zero_mask(scale, 0)
    if bias is not None:
        if bias.const_value is None:
            return np.zeros(width, dtype=bool)
        zero &= const_zero_mask(bias, 0)
    return zero if zero.shape == (width,) else np.zeros(width, dtype=bool)


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


# Unary elementwise ops evaluated on per-channel constants (NaN, "unknown", propagates through each).
def _erf(x: np.ndarray) -> np.ndarray:
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x


def _gelu(node: ir.Node, x: np.ndarray) -> np.ndarray:
    if node.attributes.get_string("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


_UNARY = {
    "Relu": lambda n, x: np.where(np.isnan(x), np.nan, np.maximum(x, 0)),
    "LeakyRelu": lambda n, x: np.where(x >= 0, x, x * float_attr(n, "alpha", 0.01)),
    "Sigmoid": lambda n, x: 1 / (1 + np.exp(-x)),
    "HardSigmoid": lambda n, x: np.clip(float_attr(n, "alpha", 0.2) * x + float_attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: x * np.clip(x / 6 + 0.5, 0, 1),
    "Tanh": lambda n, x: np.tanh(x),
    "Erf": lambda n, x: _erf(x),
    "Gelu": _gelu,
    "Exp": lambda n, x: np.exp(x),
    "Neg": lambda n, x: -x,
    "Abs": lambda n, x: np.abs(x),
    "Sqrt": lambda n, x: np.sqrt(np.where(x >= 0, x, np.nan)),
    "Reciprocal": lambda n, x: 1 / x,
    "Softplus": lambda n, x: np.log1p(np.exp(x)),
    "Elu": lambda n, x: np.where(x > 0, x, float_attr(n, "alpha", 1.0) * (np.exp(x) - 1)),
    "Identity": lambda n, x: x,
    "Dropout": lambda n, x: x,
}
_BINARY_EVAL = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Max": np.maximum,
    "Min": np.minimum,
    "Pow": np.power,
}
# Layout and pooling ops: a channel constant at every position stays constant with the same value.
_CONST_LAYOUT = {
    "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "MaxPool", "GlobalAveragePool",
    "GlobalMaxPool", "Resize", "Upsample", "ReduceMean", "ReduceMax", "ReduceMin",
}  # fmt: skip


def _uniform(array: np.ndarray) -> float:
    """The single value of a constant broadcast operand, NaN if it has more than one."""
    flat = np.asarray(array, dtype=np.float64).reshape(-1)
    return float(flat[0]) if flat.size and np.all(flat == flat[0]) else np.nan


def _operand_values(analysis: ChannelFacts, value: ir.Value | None, out: Slot, width: int, *, elementwise=True):
    """Per-channel constant values of the operand feeding ``out`` (NaN: not constant)."""
    linked = _aligned(value, out, width) if elementwise else _linked_input(analysis, value, out)
    if linked is not None:
        values = analysis.const_channels(linked)
        if values is not None and values.shape == (width,):
            return values
        return np.full(width, np.nan)
    if value is not None and value.const_value is not None:  # broadcast along this axis
        return np.full(width, _uniform(value.const_value.numpy()))
    return np.full(width, np.nan)


def const_channel_values(analysis: ChannelFacts, slot: Slot) -> np.ndarray | None:
    """Per channel of ``slot``: its value when it is the same at every position for every input, else NaN.

    ``None`` when the width is unknown. Zero channels (:func:`zero_mask`) are the constant 0.
    """
    width = _width(slot)
    if width is None:
        return None
    zero = analysis.zero_mask(slot)
    values = np.full(width, np.nan)
    with contextlib.suppress(AttributeError, IndexError, ValueError, TypeError):  # unknown, never a guess
        values = _const_values(analysis, slot, width)
    with np.errstate(all="ignore"):
        values = np.where(np.isfinite(values), values, np.nan)
    if zero is not None and zero.shape == (width,):
        values = np.where(zero, 0.0, values)
    return values


def _const_values(analysis: ChannelFacts, slot: Slot, width: int) -> np.ndarray:
    unknown = np.full(width, np.nan)
    value = slot.value
    if value.const_value is not None:
        array = value.const_value.numpy().astype(np.float64)
        moved = np.moveaxis(array, slot.axis, 0).reshape(width, -1)
        same = np.all(moved == moved[:, :1], axis=1) if moved.shape[1] else np.ones(width, dtype=bool)
        return np.where(same, moved[:, 0] if moved.shape[1] else np.nan, np.nan)
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return unknown
    op, inputs = node.op_type, list(node.inputs)
    with np.errstate(all="ignore"):
        if op in ("Gemm", "Conv"):
            bias = inputs[2] if len(inputs) > 2 else None
            if slot.axis != 1:  # Gemm's N, Conv's output channels
                return unknown
            weight_axis = (0 if int_attr(node, "transB", 0) else 1) if op == "Gemm" else 0
            wmask = analysis.zero_mask(Slot(inputs[1], weight_axis))
            if wmask is None or wmask.shape != (width,):
                return unknown
            if op == "Conv" and _depthwise(node):  # a zero input channel gives the bias too
                xmask = analysis.zero_mask(Slot(inputs[0], 1))
                if xmask is not None and xmask.shape == (width,):
                    wmask = wmask | xmask
                xvalues = analysis.const_channels(Slot(inputs[0], 1))  # zero as a constant: ReLU(bias < 0)
                if xvalues is not None and xvalues.shape == (width,):
                    wmask = wmask | (xvalues == 0)
            if bias is None:
                return np.where(wmask, 0.0, np.nan)
            if op == "Conv":  # the bias is [C_out], linked to axis 1 (not numpy-aligned)
                bias_values = analysis.const_channels(Slot(bias, 0))
                bias_values = np.full(width, np.nan) if bias_values is None else bias_values
            else:
                bias_values = _operand_values(analysis, bias, slot, width)
            return np.where(wmask, bias_values, np.nan)
        if op == "BatchNormalization" and slot.axis == 1:
            x, scale, b, mean, var = inputs[:5]
            eps = float_attr(node, "epsilon", 1e-5)
            s, bb, mu, v = (t.const_value.numpy().astype(np.float64) for t in (scale, b, mean, var))
            k = _operand_values(analysis, x, slot, width)
            return (k - mu) * s / np.sqrt(v + eps) + bb
        if op in _BINARY_EVAL:
            a = _operand_values(analysis, inputs[0], slot, width)
            b = _operand_values(analysis, inputs[1], slot, width)
            return _BINARY_EVAL[op](a, b)
        if op in _UNARY:
            return _UNARY[op](node, _operand_values(analysis, inputs[0], slot, width))
        if op == "Cast":
            return _operand_values(analysis, inputs[0], slot, width)
        if op == "Clip":  # ReLU6 exports as Clip(x, 0, 6): constant bounds clip a constant to a constant
            limits = [-np.inf, np.inf]
            for position, bound in enumerate(inputs[1:3]):
                if bound is None or bound.name == "":
                    continue
                if bound.const_value is None:
                    return unknown  # a run-time bound
                limits[position] = _uniform(bound.const_value.numpy())
            return np.clip(_operand_values(analysis, inputs[0], slot, width), *limits)
        if op == "AveragePool":
            pads = ints_attr(node, "pads", [])
            if any(pads) and int_attr(node, "count_include_pad", 0):
                return unknown  # borders average in zeros
            return _operand_values(analysis, inputs[0], slot, width, elementwise=False)
        if op in _CONST_LAYOUT:
            return _operand_values(analysis, inputs[0], slot, width, elementwise=False)
        if op == "Concat":
            pieces = [(part, offset) for part, whole, offset in analysis._segments if whole == slot]
            result = unknown.copy()
            for part, offset in pieces:
                part_values = analysis.const_channels(part)
                if part_values is not None:
                    result[offset : offset + len(part_values)] = part_values
            return result
        if op in ("Split", "Slice"):
            for part, whole, offset in analysis._segments:
                if part == slot:
                    whole_values = analysis.const_channels(whole)
                    return unknown if whole_values is None else whole_values[offset : offset + width]
            return _operand_values(analysis, inputs[0], slot, width)
    return unknown


def why_not_constant(analysis: ChannelFacts, slot: Slot, index: int, depth: int = 0) -> tuple[str, str]:
    """(node, reason) for a pruned channel ``index`` of ``slot`` that is neither zero nor constant: the first
    node, walking back to the pruned weight, that turns a constant channel into one that varies.

    So that a user sees why ``ln_structured``'s channels stayed: a padded depthwise conv after them, a
    Squeeze-Excite gate multiplied in, or an op without a constant rule.
    """
    node = slot.value.producer()
    if node is None:
        return "", f"'{slot.value.name}' is a graph input"
    name, op = node.name or node.op_type, node.op_type
    width = _width(slot)
    if op in ("Conv", "MatMul", "Gemm"):
        if op == "Conv" and _depthwise(node) and depth < 64:
            source = Slot(node.inputs[0], 1)
            values = analysis.const_channels(source)
            if values is not None and not np.isnan(values[index]):
                return name, (
                    f"{name} (depthwise Conv) pads its input: constant channel {index} is not constant at the "
                    "border positions after it, so it cannot fold into a bias; it is kept"
                )
            return why_not_constant(analysis, source, index, depth + 1)
        return name, f"{name} ({op}) computes channel {index} from the input: its weights there are not zero"
    if width is None:
        return name, f"{name} ({op}): the channel width is not static"
    elementwise = op not in _CONST_LAYOUT and op != "AveragePool"
    constant, varying = [], []
    for value in node.inputs:
        if value is None or value.name == "":
            continue
        linked = _aligned(value, slot, width) if elementwise else _linked_input(analysis, value, slot)
        if linked is None:
            continue
        values = analysis.const_channels(linked)
        known = values is not None and values.shape == (width,) and not np.isnan(values[index])
        (constant if known else varying).append(linked)
    if varying and constant:
        other = varying[0].value.name
        example = {"Mul": "a Squeeze-Excite gate", "Add": "a residual connection", "Sub": "a residual connection"}
        hint = f" ({example[op]}, for instance)" if op in example else ""
        return name, (
            f"{name} ({op}) combines constant channel {index} with '{other}', which depends on the input{hint}: "
            "the result is not constant; it is kept"
        )
    if varying and depth < 64:
        return why_not_constant(analysis, varying[0], index, depth + 1)
    return name, f"{name} ({op}) has no rule that carries a constant channel through it; channel {index} is kept"
