"""Fused q/k/v layouts decided by the graph: which projection columns each role's heads read.

One fused projection ``[.., W]`` may be split into heads before the roles are separated, in any layout:
GPT-NeoX reshapes to ``[.., heads, 3·head_dim]`` and splits the last axis into q, k and v (per-head
interleaving); Falcon's multi-query attention reshapes to ``[.., heads + 2, head_dim]`` and takes q, k and v
as slices / GatherND of the head axis. This module does not read module names: it follows an *index array*
(the projection column each element comes from) through the routing ops — Transpose, Split of a feature
axis, Slice / Gather / GatherND of the head axis — until each branch reaches an op that computes with it.
Those branch ends are the role sources; each carries ``[heads, head_dim]`` column ids, so removing a head
removes exactly those columns. The role of each source (q, k or v) comes from where it meets the attention
MatMuls (:func:`graph_role`), and the head-axis proof then checks it.

The rewrite (:func:`plan_route`) recomputes every routing constant from the surviving columns: a Reshape
keeps its layout with fewer heads, Split sizes, Slice bounds and Gather indices are renumbered. A layout in
which a removed head does not leave a rectangular block (removal would need a reorder) is refused.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from prune2deploy.graph.attributes import int_attr, ints_attr
from prune2deploy.graph.constants import const_array
from prune2deploy.graph.dims import rank as _rank
from prune2deploy.graph.dims import same_dim, shape_entries, static_dim

__all__ = ["Route", "RouteBlocked", "RoutedValue", "graph_role", "plan_route", "trace_route"]


class RouteBlocked(Exception):
    """The fused layout cannot be followed (the message names the node and says why)."""


@dataclass
class RoutedValue:
    """A tensor between the fused projection and the role sources.

    ``axes`` are the tensor axes that carry projection columns (ascending); ``index[i0, i1, ..]`` is the
    projection column of the element at those axes' positions.
    """

    value: ir.Value
    axes: list[int]
    index: np.ndarray


@dataclass
class Route:
    """The routing from one fused head-split Reshape to its role sources."""

    reshape: ir.Node
    width: int  # projection columns
    values: list[RoutedValue] = field(default_factory=list)
    steps: list[tuple[ir.Node, RoutedValue]] = field(default_factory=list)  # routing node, its routed input
    sources: list[RoutedValue] = field(default_factory=list)  # axes == [head axis, last axis]


def _ints(value: ir.Value | None) -> list[int] | None:
    array = const_array(value) if value is not None else None
    return None if array is None else [int(x) for x in array.reshape(-1)]


def trace_route(reshape: ir.Node) -> Route:
    """Follows the columns of ``reshape``'s input (``[.., W]``) to the role sources.

    Raises:
        RouteBlocked: the split or a routing op cannot be followed exactly.
    """
    data, out = reshape.inputs[0], reshape.outputs[0]
    r_in, r_out = _rank(data), _rank(out)
    width = static_dim(data.shape[-1]) if r_in else None
    if width is None or r_out is None or r_out <= r_in:
        raise RouteBlocked(f"{reshape.name}: the head split has no static width")
    dims = [static_dim(d) for d in list(out.shape)[r_in - 1 :]]
    if any(d is None for d in dims) or int(np.prod(dims)) != width:
        raise RouteBlocked(f"{reshape.name}: the split axes {dims} do not hold the {width} projection columns")
    if not all(same_dim(data.shape[i], out.shape[i]) for i in range(r_in - 1)):
        raise RouteBlocked(f"{reshape.name}: the head split changes the leading axes")
    entries = shape_entries(reshape.inputs[1])
    if entries is None or len(entries) != r_out or any(e is None for e in entries[r_in - 1 :]):
        raise RouteBlocked(f"{reshape.name}: the head split target's split entries are not constant")
    route = Route(reshape, width)
    start = RoutedValue(out, list(range(r_in - 1, r_out)), np.arange(width).reshape(dims))
    _collect(route, start)
    return route


def _selects(routed: RoutedValue, depth: int = 0) -> bool:
    """Whether a selection (Split / Slice / Gather / GatherND of column axes) follows, through Transposes."""
    for use in routed.value.uses():
        produced = _step(use.node, use.idx, routed)
        if produced is None:
            continue
        if use.node.op_type != "Transpose" or (depth < 4 and any(_selects(p, depth + 1) for p in produced)):
            return True
    return False


def _collect(route: Route, routed: RoutedValue) -> None:
    """Adds ``routed`` and what it routes to; a value no selection follows is a role source."""
    route.values.append(routed)
    if routed.value.is_graph_output():
        raise RouteBlocked(f"'{routed.value.name}' (fused q/k/v columns) is a graph output")
    if not _selects(routed):
        if len(routed.axes) != 2 or routed.axes[1] != _rank(routed.value) - 1:
            raise RouteBlocked(
                f"'{routed.value.name}' is computed with before it is one role's [.., heads, .., head_dim]"
                f" (axes {routed.axes} carry projection columns)"
            )
        route.sources.append(routed)
        return
    for use in routed.value.uses():
        produced = _step(use.node, use.idx, routed)
        if produced is None or (use.node.op_type == "Transpose" and not any(_selects(p) for p in produced)):
            raise RouteBlocked(
                f"{use.node.name} ({use.node.op_type}) reads fused q/k/v columns before they are split by role"
            )
        route.steps.append((use.node, routed))
        for value in produced:
            _collect(route, value)


def _step(node: ir.Node, index: int, routed: RoutedValue) -> list[RoutedValue] | None:
    """The routed outputs of ``node`` (a routing op reading ``routed``), or None: not a routing op."""
    op, axes = node.op_type, routed.axes
    if index != 0 or node.domain not in ("", "ai.onnx"):
        return None
    rank = _rank(routed.value)
    if op == "Transpose":
        perm = list(ints_attr(node, "perm", range(rank)[::-1]))
        new_axes = [perm.index(a) for a in axes]
        order = np.argsort(new_axes)
        return [RoutedValue(node.outputs[0], sorted(new_axes), routed.index.transpose(order))]
    if op == "Split":
        axis = int_attr(node, "axis", 0) % rank
        if axis not in axes:
            return None
        k = axes.index(axis)
        sizes = [static_dim(o.shape[axis]) if o.shape is not None else None for o in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != routed.index.shape[k]:
            raise RouteBlocked(f"{node.name}: Split of fused q/k/v columns with unknown sizes")
        bounds = np.cumsum([0, *sizes])
        return [
            RoutedValue(o, list(axes), np.take(routed.index, np.arange(bounds[i], bounds[i + 1]), axis=k))
            for i, o in enumerate(node.outputs)
        ]
    if not axes or op not in ("Slice", "Gather", "GatherND"):
        return None
    if op == "Gather":  # a Gather of any column axis but head_dim (BLOOM picks q/k/v off a [.., 3, ..] axis)
        picked = const_array(node.inputs[1])
        axis = int_attr(node, "axis", 0) % rank
        if axis not in axes[:-1] or picked is None or picked.ndim > 1 or len(set(picked.reshape(-1))) != picked.size:
            return None
        k = axes.index(axis)
        chosen = np.take(routed.index, picked.astype(np.int64) % routed.index.shape[k], axis=k)
        new_axes = list(axes) if picked.ndim == 1 else [a if a < axis else a - 1 for a in axes if a != axis]
        return [RoutedValue(node.outputs[0], new_axes, chosen)]
    head = axes[0]  # Slice and GatherND route roles off the head (first column-carrying) axis
    n = routed.index.shape[0]
    if op == "Slice":
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        s_axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if starts is None or ends is None or len(starts) != 1:
            return None
        s_axes = [0] if s_axes is None else s_axes
        if s_axes[0] % rank != head or (steps is not None and steps != [1]):
            return None
        picked = np.arange(n)[slice(starts[0], ends[0])]
        return [RoutedValue(node.outputs[0], list(axes), routed.index[picked])]
    picked = const_array(node.inputs[1])  # GatherND(x, [[i], ..]) on axis 0 == Gather(x, [i, ..], axis=0)
    if int_attr(node, "batch_dims", 0) or head != 0 or picked is None or picked.ndim != 2 or picked.shape[1] != 1:
        return None
    return [RoutedValue(node.outputs[0], list(axes), routed.index[picked[:, 0].astype(np.int64) % n])]


# Ops a role's tensor passes through on its way to the attention MatMuls. Expand is repeat_kv's broadcast:
# transformers 5.25's Falcon repeats its one kv head (Unsqueeze, Expand, Reshape) before the scores.
_PASS = {"Transpose", "Reshape", "Mul", "Div", "Add", "Sub", "Neg", "Slice", "Concat", "Split", "Cast"}
_PASS |= {"Unsqueeze", "Expand"}


def graph_role(value: ir.Value, *, limit: int = 200) -> str | None:
    """q, k or v by where ``value`` first meets a MatMul of two computed operands.

    The left operand of the scores is q; the right operand of the scores (whose output reaches a Softmax)
    is k; the right operand of the weighted sum (no Softmax after it) is v. ``None`` when no such MatMul
    is reached; the head-axis proof checks whatever this returns.
    """
    seen, queue = set(), deque([value])
    while queue and len(seen) < limit:
        current = queue.popleft()
        for use in current.uses():
            node = use.node
            if node in seen:
                continue
            seen.add(node)
            if node.op_type == "MatMul" and all(const_array(v) is None for v in node.inputs):
                if use.idx == 0:
                    return "q"
                return "k" if _reaches_softmax(node.outputs[0]) else "v"
            if node.op_type in _PASS or node.op_type in ("Where", "Pow", "ReduceMean", "Sqrt", "Reciprocal"):
                queue.extend(node.outputs)
    return None


def _reaches_softmax(value: ir.Value, depth: int = 8) -> bool:
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for current in frontier:
            for use in current.uses():
                if use.node.op_type == "Softmax":
                    return True
                if use.node.op_type not in ("MatMul", "Gemm"):
                    nxt.extend(use.node.outputs)
        frontier = nxt
    return False


def _keep_axes(index: np.ndarray, survivors: np.ndarray, where: str) -> list[np.ndarray]:
    """Per-axis kept positions of ``index`` (all-or-nothing slabs), or RouteBlocked."""
    mask = np.isin(index, survivors)
    keeps = [mask.any(axis=tuple(i for i in range(mask.ndim) if i != k)) for k in range(mask.ndim)]
    shaped = [k.reshape([-1 if i == j else 1 for j in range(mask.ndim)]) for i, k in enumerate(keeps)]
    if not np.array_equal(mask, functools.reduce(np.logical_and, shaped)):
        raise RouteBlocked(f"{where}: the kept columns are not whole slabs of the fused layout")
    return keeps


def plan_route(route: Route, survivors: np.ndarray) -> list[tuple]:
    """What the rewrite must change so that ``route`` carries only ``survivors`` (sorted column ids).

    Returns actions: ``("dim", value, axis, size)``, ``("entries", node, {entry: size})``,
    ``("input", node, i, array)`` (constants are cloned by the caller). Nothing is changed here, so a
    refusal leaves the graph as it was.
    """
    actions: list[tuple] = []
    for routed in route.values:
        keeps = _keep_axes(routed.index, survivors, routed.value.name or "?")
        for axis, keep in zip(routed.axes, keeps, strict=True):
            if keep.sum() == 0:
                raise RouteBlocked(f"'{routed.value.name}' would lose all of its columns")
            actions.append(("dim", routed.value, axis, int(keep.sum())))
        if routed.value is route.reshape.outputs[0]:
            entries = shape_entries(route.reshape.inputs[1])
            changes = {a: int(k.sum()) for a, k in zip(routed.axes, keeps, strict=True) if entries[a] != -1}
            actions.append(("entries", route.reshape, changes))
    for node, routed in route.steps:
        keeps = _keep_axes(routed.index, survivors, node.name)
        rank = _rank(routed.value)
        if node.op_type == "Split":
            k = routed.axes.index(int_attr(node, "axis", 0) % rank)
            outs = _outputs_of(route, node)
            sizes = [int(_keep_axes(o.index, survivors, node.name)[k].sum()) for o in outs]
            if sizes != [o.index.shape[k] for o in outs]:
                actions.append(("split", node, np.asarray(sizes, dtype=np.int64)))
            continue
        k = routed.axes.index(int_attr(node, "axis", 0) % rank) if node.op_type == "Gather" else 0
        keep = keeps[k]
        new_pos = np.cumsum(keep) - 1
        n = len(keep)
        if node.op_type == "Slice":
            starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
            picked = np.arange(n)[slice(starts[0], ends[0])]  # a contiguous range: its survivors stay one
            kept = picked[keep[picked]]
            start = int(keep[: picked[0]].sum())
            actions.append(("input", node, 1, np.asarray([start], dtype=np.int64)))
            actions.append(("input", node, 2, np.asarray([start + len(kept)], dtype=np.int64)))
        elif node.op_type in ("Gather", "GatherND"):
            picked = const_array(node.inputs[1]).astype(np.int64)
            flat = picked.reshape(-1) % n
            if not keep[flat].all():
                raise RouteBlocked(f"{node.name}: selects a removed head")
            actions.append(("input", node, 1, new_pos[flat].reshape(picked.shape).astype(np.int64)))
    return actions


def _outputs_of(route: Route, node: ir.Node) -> list[RoutedValue]:
    by_value = {r.value: r for r in route.values}
    return [by_value[o] for o in node.outputs]
