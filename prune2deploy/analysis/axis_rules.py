"""Per-op axis rules: how a channel axis crosses one ONNX op.

A rule receives a :class:`RuleContext` and the node. It links slots (``same``, ``segment``), declares
contractions (where a channel ends), blocks slots it cannot map, and records the constants that carry a
width (``fixup``). It returns ``None`` on success or a reason string, which blocks every axis of the node:
a rule never guesses. Axes the rule leaves untouched are blocked by the analysis.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.slots import RuleContext, Slot
from prune2deploy.graph.attributes import int_attr, ints_attr
from prune2deploy.graph.constants import const_value_array
from prune2deploy.graph.op_categories import ACTIVATIONS, ELEMENTWISE_BINARY, ELEMENTWISE_UNARY

__all__ = ["RULES", "axis_rule"]

Rule = Callable[[RuleContext, ir.Node], "str | None"]
RULES: dict[str, Rule] = {}


def axis_rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn

    return register


# -- elementwise ------------------------------------------------------------------------------------------

# Identity is a view, but as a one-operand op it maps every axis to itself like the unary ops.
_UNARY = sorted(ELEMENTWISE_UNARY | ACTIVATIONS | {"Identity"})
_BINARY = sorted(ELEMENTWISE_BINARY)


@axis_rule(*_UNARY)
def _unary(ctx: RuleContext, node: ir.Node) -> str | None:
    data_inputs = node.inputs[:1]
    if node.op_type == "Clip":  # min/max are scalars
        for extra in node.inputs[1:]:
            if extra is not None and ctx.rank(extra):
                return "Clip with non-scalar bounds"
            if extra is not None and ctx.rank(extra) == 0:
                pass
    if node.op_type == "PRelu":
        data_inputs = node.inputs[:2]
    if not ctx.link_elementwise(data_inputs, node.outputs[0]):
        return "unknown rank"
    for extra in node.outputs[1:]:  # Dropout's mask
        if extra is not None and ctx.rank(extra) is not None:
            ctx.link_elementwise([node.outputs[0]], extra)
    return None


@axis_rule(*_BINARY)
def _binary(ctx: RuleContext, node: ir.Node) -> str | None:
    return None if ctx.link_elementwise(node.inputs, node.outputs[0]) else "unknown rank"


# -- contractions -----------------------------------------------------------------------------------------


@axis_rule("MatMul")
def _matmul(ctx: RuleContext, node: ir.Node) -> str | None:
    a, b = node.inputs
    y = node.outputs[0]
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if None in (ra, rb, ry) or ra < 2 or rb < 2:
        return "MatMul with 1-D or unknown-rank operand"
    ctx.contract(Slot(a, ra - 1), Slot(b, rb - 2))
    ctx.same(Slot(a, ra - 2), Slot(y, ry - 2))
    ctx.same(Slot(b, rb - 1), Slot(y, ry - 1))
    # batch dims broadcast like elementwise ops
    for value, rank in ((a, ra), (b, rb)):
        for axis in range(rank - 2):
            out_axis = ry - rank + axis
            if ctx.dim(value, axis) == 1 and ctx.dim(y, out_axis) != 1:
                ctx.touched.add(Slot(value, axis))
            else:
                ctx.same(Slot(value, axis), Slot(y, out_axis))
    return None


@axis_rule("Gemm")
def _gemm(ctx: RuleContext, node: ir.Node) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    ta, tb = int_attr(node, "transA", 0), int_attr(node, "transB", 0)
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.contract(Slot(a, a_k), Slot(b, b_k))
    ctx.same(Slot(a, a_m), Slot(y, 0))
    ctx.same(Slot(b, b_n), Slot(y, 1))
    if c is not None and not ctx.link_elementwise([c], y):
        return "Gemm bias of unknown rank"
    return None


@axis_rule("Conv")
def _conv(ctx: RuleContext, node: ir.Node) -> str | None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    rank = ctx.rank(x)
    if rank is None or ctx.rank(y) != rank:
        return "Conv input or output of unknown rank (run shape inference first)"
    if w is None or w.const_value is None:
        return "Conv with a non-constant weight"
    groups = int_attr(node, "group", 1)
    cin, cout = ctx.dim(x, 1), ctx.dim(y, 1)
    ctx.same(Slot(x, 0), Slot(y, 0))
    for axis in range(2, rank):  # spatial axes change size: not channels
        ctx.block(Slot(x, axis), "spatial axis")
        ctx.block(Slot(y, axis), "spatial axis")
        ctx.block(Slot(w, axis), "kernel axis")
    if groups == 1:
        ctx.contract(Slot(x, 1), Slot(w, 1))
        ctx.same(Slot(w, 0), Slot(y, 1))
        if bias is not None:
            ctx.same(Slot(bias, 0), Slot(y, 1))
        return None
    if groups == cin == cout and ctx.dim(w, 1) == 1:
        # Depthwise: channel c in -> channel c out, one filter each; the group count follows the width.
        ctx.same(Slot(x, 1), Slot(y, 1))
        ctx.same(Slot(w, 0), Slot(y, 1))
        ctx.touched.add(Slot(w, 1))
        if bias is not None:
            ctx.same(Slot(bias, 0), Slot(y, 1))
        ctx.fixup("groups", Slot(y, 1))
        return None
    if not (isinstance(cin, int) and isinstance(cout, int)) or cin % groups or cout % groups:
        reason = f"grouped convolution (group={groups}) with channel counts not divisible by the groups"
        for slot in (Slot(x, 1), Slot(y, 1), Slot(w, 0), Slot(w, 1)):
            ctx.block(slot, reason)
        if bias is not None:
            ctx.block(Slot(bias, 0), reason)
        return None
    # Grouped (ResNeXt): output channels are the weight's rows, input channel g·(C_in/G) + j meets column j of
    # group g's rows. Both sides stay prunable if every group keeps as many channels as the others (the pass
    # keeps removable channels to even them out): "grouped" fixups ask for that.
    ctx.contract_grouped(Slot(x, 1), Slot(w, 1), groups)
    ctx.same(Slot(w, 0), Slot(y, 1))
    if bias is not None:
        ctx.same(Slot(bias, 0), Slot(y, 1))
    ctx.fixup("grouped", Slot(y, 1), groups=groups)
    ctx.fixup("grouped", Slot(x, 1), groups=groups)
    return None


@axis_rule("BatchNormalization")
def _batchnorm(ctx: RuleContext, node: ir.Node) -> str | None:
    if len([o for o in node.outputs if o is not None and o.uses()]) > 1 or int_attr(node, "training_mode", 0):
        return "BatchNormalization in training mode"
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank is None:
        return "unknown rank"
    for axis in range(rank):
        ctx.same(Slot(x, axis), Slot(y, axis))
    for param in node.inputs[1:5]:
        if param is None or param.const_value is None:
            return "BatchNormalization with non-constant statistics"
        ctx.same(Slot(param, 0), Slot(y, 1))
    for extra in node.outputs[1:]:
        if extra is not None and ctx.rank(extra) is not None:
            for axis in range(ctx.rank(extra)):
                ctx.block(Slot(extra, axis), "running statistics output")
    return None


# -- per-axis reductions ------------------------------------------------------------------------------------


def _reduced_axes(ctx: RuleContext, node: ir.Node) -> list[int] | None:
    rank = ctx.rank(node.inputs[0])
    if rank is None:
        return None
    axes = ints_attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        const = const_value_array(node.inputs[1])
        if const is None:
            return None
        axes = const.tolist()
    if axes is None or len(axes) == 0:
        return None if int_attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


@axis_rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1", "ReduceSumSquare")
def _reduce(ctx: RuleContext, node: ir.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return "reduction axes are not constant"
    keep = int_attr(node, "keepdims", 1)
    out_axis = 0
    for axis in range(ctx.rank(x)):
        if axis in axes:
            ctx.block(Slot(x, axis), f"{node.op_type} reduces over this axis (a norm or pooling over channels)")
            if keep:
                ctx.block(Slot(y, out_axis), "reduced axis")
                out_axis += 1
            continue
        ctx.same(Slot(x, axis), Slot(y, out_axis))
        out_axis += 1
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        ctx.touched.add(Slot(node.inputs[1], 0))
    return None


@axis_rule("Softmax", "LogSoftmax", "LayerNormalization", "ArgMax", "ArgMin", "CumSum", "TopK")
def _along_axis(ctx: RuleContext, node: ir.Node) -> str | None:
    """Ops that mix values along one axis (or, for LayerNormalization, all axes from ``axis`` on)."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        return "unknown rank"
    default = -1
    axis = int_attr(node, "axis", default) % rank
    if node.op_type == "LayerNormalization" and _channel_norm(ctx, node, axis, rank):
        return None
    if node.op_type in ("CumSum", "TopK"):
        return f"{node.op_type} is not mapped"
    mixed = set(range(axis, rank)) if node.op_type == "LayerNormalization" else {axis}
    for out_index, y in enumerate(node.outputs):
        if y is None or ctx.rank(y) is None:
            continue
        if node.op_type == "LayerNormalization" and out_index > 0:
            for a in range(ctx.rank(y)):
                ctx.block(Slot(y, a), "LayerNormalization statistics")
            continue
        for a in range(rank):
            if a in mixed:
                ctx.block(Slot(x, a), f"{node.op_type} normalises over this axis")
                if a < ctx.rank(y):
                    ctx.block(Slot(y, a), f"{node.op_type} normalises over this axis")
            else:
                ctx.same(Slot(x, a), Slot(y, a))
    if node.op_type == "LayerNormalization":
        for param in node.inputs[1:3]:
            if param is not None:
                for a in range(ctx.rank(param)):
                    ctx.block(Slot(param, a), "LayerNormalization scale/bias over a normalised axis")
    return None


def _channel_norm(ctx: RuleContext, node: ir.Node, axis: int, rank: int) -> bool:
    """A LayerNormalization over the last axis with constant per-channel scale and bias: its channels are
    the input's, and it normalises over them (``ctx.norm``), so a channel may go where the input is zero
    there; removing it changes the statistics by a known ratio that the pass corrects exactly."""
    width = ctx.dim(node.inputs[0], rank - 1)
    params = [p for p in node.inputs[1:3] if p is not None]
    if axis != rank - 1 or not isinstance(width, int):
        return False
    if any(p.const_value is None or tuple(p.const_value.shape) != (width,) for p in params):
        return False
    if any(out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs[1:]):
        return False
    x, y = node.inputs[0], node.outputs[0]
    for a in range(rank):
        ctx.same(Slot(x, a), Slot(y, a))
    for param in params:
        ctx.same(Slot(param, 0), Slot(y, rank - 1))
    ctx.norm(Slot(x, rank - 1))
    return True


# -- layout ops ----------------------------------------------------------------------------------------------


@axis_rule("Transpose")
def _transpose(ctx: RuleContext, node: ir.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank is None:
        return "unknown rank"
    perm = ints_attr(node, "perm") or list(reversed(range(rank)))
    for out_axis, in_axis in enumerate(perm):
        ctx.same(Slot(x, in_axis), Slot(y, out_axis))
    return None


@axis_rule("Unsqueeze", "Squeeze")
def _unsqueeze(ctx: RuleContext, node: ir.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return "unknown rank"
    axes = const_value_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None:
        attr = ints_attr(node, "axes")
        axes = np.array(attr) if attr is not None else None
    if axes is None:
        if node.op_type == "Squeeze":
            axes = np.array([a for a in range(rx) if ctx.dim(x, a) == 1])
        else:
            return "Unsqueeze axes are not constant"
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        ctx.touched.add(Slot(node.inputs[1], 0))
    if node.op_type == "Unsqueeze":
        added = {int(a) % ry for a in axes.ravel()}
        kept_out = [a for a in range(ry) if a not in added]
        for in_axis, out_axis in enumerate(kept_out):
            ctx.same(Slot(x, in_axis), Slot(y, out_axis))
        for a in added:
            ctx.block(Slot(y, a), "new axis")
    else:
        removed = {int(a) % rx for a in axes.ravel()}
        kept_in = [a for a in range(rx) if a not in removed]
        for out_axis, in_axis in enumerate(kept_in):
            ctx.same(Slot(x, in_axis), Slot(y, out_axis))
        for a in removed:
            ctx.block(Slot(x, a), "squeezed axis")
    return None


@axis_rule("Reshape")
def _reshape(ctx: RuleContext, node: ir.Node) -> str | None:
    """Maps axes that a reshape leaves intact (same width, same product of everything before them).

    An axis that is split or merged (e.g. [.., C] -> [.., H, d], the attention heads) is blocked: heads are
    a structure of their own. When the target shape is a constant, or a Concat of pieces, the entry that
    carries a mapped channel's width is rewritten by the pass.
    """
    x, shape, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return "unknown rank"
    ctx.touched.add(Slot(shape, 0)) if ctx.rank(shape) else None
    in_dims = [ctx.dim(x, a) for a in range(rx)]
    out_dims = [ctx.dim(y, a) for a in range(ry)]

    def prefixes(dims):
        result, ints, syms = [], 1, []
        for d in dims:
            result.append((ints, tuple(sorted(syms))) if None not in dims[: len(result)] else None)
            if isinstance(d, int):
                ints *= d
            else:
                syms.append(str(d))
        return result

    def suffixes(dims):
        return prefixes(dims[::-1])[::-1]

    # An axis of equal width is intact when everything before it has the same size, or everything after it
    # does (the latter maps the channel axis of [B*S, C] <-> [B, S, C] when the batch symbols differ).
    in_pre, out_pre = prefixes(in_dims), prefixes(out_dims)
    in_suf, out_suf = suffixes(in_dims), suffixes(out_dims)
    mapped: dict[int, int] = {}
    for i, d in enumerate(in_dims):
        if d is None or (in_pre[i] is None and in_suf[i] is None):
            continue
        for j, e in enumerate(out_dims):
            intact = (in_pre[i] is not None and out_pre[j] == in_pre[i]) or (
                in_suf[i] is not None and out_suf[j] == in_suf[i]
            )
            if e == d and intact and j not in mapped.values():
                mapped[i] = j
                break
    for i in range(rx):
        if i in mapped:
            ctx.same(Slot(x, i), Slot(y, mapped[i]))
            if isinstance(in_dims[i], int):
                ctx.fixup("width", Slot(y, mapped[i]), shape=shape, index=mapped[i])
        else:
            ctx.block(Slot(x, i), "Reshape splits or merges this axis (e.g. into heads)")
    for j in range(ry):
        if j not in mapped.values():
            ctx.block(Slot(y, j), "Reshape creates this axis by splitting or merging")
    return None


@axis_rule("Expand")
def _expand(ctx: RuleContext, node: ir.Node) -> str | None:
    x, shape, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if ctx.rank(shape):
        ctx.touched.add(Slot(shape, 0))
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return "unknown rank"
    for axis in range(rx):
        out_axis = ry - rx + axis
        if ctx.dim(x, axis) == 1 and ctx.dim(y, out_axis) != 1:
            ctx.block(Slot(y, out_axis), "Expand broadcasts this axis")
            ctx.touched.add(Slot(x, axis))
            continue
        ctx.same(Slot(x, axis), Slot(y, out_axis))
        if isinstance(ctx.dim(x, axis), int):
            ctx.fixup("width", Slot(y, out_axis), shape=shape, index=out_axis, expand=True)
    for out_axis in range(ry - rx):
        ctx.block(Slot(y, out_axis), "Expand adds this axis")
    return None


@axis_rule("Concat")
def _concat(ctx: RuleContext, node: ir.Node) -> str | None:
    y = node.outputs[0]
    ry = ctx.rank(y)
    if ry is None or any(ctx.rank(v) != ry for v in node.inputs):
        return "unknown rank"
    axis = int_attr(node, "axis") % ry
    offset = 0
    for value in node.inputs:
        for a in range(ry):
            if a != axis:
                ctx.same(Slot(value, a), Slot(y, a))
        width = ctx.dim(value, axis)
        if not isinstance(width, int):
            for v in node.inputs:
                ctx.block(Slot(v, axis), "Concat of inputs with non-static width")
            ctx.block(Slot(y, axis), "Concat of inputs with non-static width")
            return None
        ctx.segment(Slot(value, axis), Slot(y, axis), offset)
        offset += width
    return None


@axis_rule("Split")
def _split(ctx: RuleContext, node: ir.Node) -> str | None:
    x = node.inputs[0]
    rx = ctx.rank(x)
    if rx is None:
        return "unknown rank"
    axis = int_attr(node, "axis", 0) % rx
    split_value = node.inputs[1] if len(node.inputs) > 1 else None
    if split_value is not None:
        ctx.touched.add(Slot(split_value, 0))
    offset = 0
    for index, y in enumerate(node.outputs):
        for a in range(rx):
            if a != axis:
                ctx.same(Slot(x, a), Slot(y, a))
        width = ctx.dim(y, axis)
        if not isinstance(width, int):
            return "Split with non-static sizes"
        ctx.segment(Slot(y, axis), Slot(x, axis), offset)
        offset += width
        ctx.fixup("split", Slot(y, axis), split=split_value, index=index, count=len(node.outputs))
    return None


@axis_rule("Slice")
def _slice(ctx: RuleContext, node: ir.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    rx = ctx.rank(x)
    if rx is None:
        return "unknown rank"
    starts, ends = const_value_array(node.inputs[1]), const_value_array(node.inputs[2])
    axes_v = node.inputs[3] if len(node.inputs) > 3 else None
    steps_v = node.inputs[4] if len(node.inputs) > 4 else None
    axes = const_value_array(axes_v) if axes_v is not None else np.arange(rx if starts is None else len(starts))
    steps = const_value_array(steps_v) if steps_v is not None else None
    for extra in node.inputs[1:]:
        if extra is not None and ctx.rank(extra):
            ctx.touched.add(Slot(extra, 0))
    if axes is None:
        return "Slice axes are not constant"
    sliced = {int(a) % rx: k for k, a in enumerate(axes.ravel())}
    for a in range(rx):
        if a not in sliced:
            ctx.same(Slot(x, a), Slot(y, a))
            continue
        k = sliced[a]
        width_in, width_out = ctx.dim(x, a), ctx.dim(y, a)
        if (
            starts is None
            or ends is None
            or (steps is not None and int(steps.ravel()[k]) != 1)
            or not isinstance(width_in, int)
            or not isinstance(width_out, int)
        ):
            ctx.block(Slot(x, a), "Slice with dynamic bounds or a step on this axis")
            ctx.block(Slot(y, a), "Slice with dynamic bounds or a step on this axis")
            continue
        start = int(starts.ravel()[k])
        start = max(0, min(width_in, start + width_in if start < 0 else start))
        ctx.segment(Slot(y, a), Slot(x, a), start)
        ctx.fixup("slice", Slot(y, a), whole=Slot(x, a), start=start, k=k, starts=node.inputs[1], ends=node.inputs[2])
    return None


@axis_rule("Gather")
def _gather(ctx: RuleContext, node: ir.Node) -> str | None:
    data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rd, ri, ry = ctx.rank(data), ctx.rank(indices), ctx.rank(y)
    if None in (rd, ri, ry):
        return "unknown rank"
    axis = int_attr(node, "axis", 0) % rd
    # Embedding lookup: data [V, C], indices [..] -> y [.., C]. The gathered axis is not a channel.
    ctx.block(Slot(data, axis), "gathered axis (e.g. vocabulary)")
    for a in range(ri):
        ctx.same(Slot(indices, a), Slot(y, axis + a))
    for a in range(rd):
        if a < axis:
            ctx.same(Slot(data, a), Slot(y, a))
        elif a > axis:
            ctx.same(Slot(data, a), Slot(y, a - 1 + ri))
    return None


@axis_rule("GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "LpPool", "Resize", "Upsample")
def _pool(ctx: RuleContext, node: ir.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank is None or ctx.rank(y) != rank:
        return "unknown rank"
    ctx.same(Slot(x, 0), Slot(y, 0))
    ctx.same(Slot(x, 1), Slot(y, 1))
    for a in range(2, rank):
        ctx.block(Slot(x, a), "spatial axis")
        ctx.block(Slot(y, a), "spatial axis")
    for extra in node.inputs[1:]:
        if extra is not None and ctx.rank(extra):
            ctx.block(Slot(extra, 0), "Resize parameters")
    for extra in node.outputs[1:]:
        if extra is not None and ctx.rank(extra):
            for a in range(ctx.rank(extra)):
                ctx.block(Slot(extra, a), "MaxPool indices")
    return None


@axis_rule("Flatten")
def _flatten(ctx: RuleContext, node: ir.Node) -> str | None:
    """[N, C, 1, 1] -> [N, C] keeps the channel axis (the usual CNN head); other flattens merge axes."""
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank is None:
        return "unknown rank"
    axis = int_attr(node, "axis", 1) % rank if rank else 0
    dims = [ctx.dim(x, a) for a in range(rank)]
    ctx_trailing_ones = all(d == 1 for d in dims[axis + 1 :])
    if axis == 1 and ctx_trailing_ones:
        ctx.same(Slot(x, 0), Slot(y, 0))
        ctx.same(Slot(x, 1), Slot(y, 1))
        for a in range(2, rank):
            ctx.touched.add(Slot(x, a))
        return None
    return "Flatten merges the channel axis with others"


@axis_rule("Shape", "Size")
def _shape(ctx: RuleContext, node: ir.Node) -> str | None:
    """Reading a shape is fine unless the widths it reads are used: then the analysis cannot follow."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        return "unknown rank"
    start = int_attr(node, "start", 0) if node.op_type == "Shape" else 0
    end = int_attr(node, "end", rank) if node.op_type == "Shape" else rank
    read = set(range(rank)[slice(start, end)]) if node.op_type == "Shape" else set(range(rank))
    for a in range(rank):
        if a in read and isinstance(ctx.dim(x, a), int):
            ctx.block(Slot(x, a), f"{node.op_type} reads the width of this axis")
        else:
            ctx.touched.add(Slot(x, a))
    for y in node.outputs:
        if ctx.rank(y):
            ctx.touched.add(Slot(y, 0))
    return None


@axis_rule("Constant", "ConstantOfShape", "Range")
def _source(ctx: RuleContext, node: ir.Node) -> str | None:
    for value in node.inputs:
        if value is not None and ctx.rank(value):
            ctx.touched.add(Slot(value, 0))
    for y in node.outputs:
        if ctx.rank(y) is not None:
            for a in range(ctx.rank(y)):
                ctx.block(Slot(y, a), f"{node.op_type} builds this tensor from a shape")
    return None
