"""Attention blocks: where the heads are, how query heads read key/value heads, and which heads are zero.

The exporter leaves no "attention" op: a block is a q/k/v projection (MatMul against a constant with an
optional bias Add and scalings, or a GPT-2 style Gemm between flatten/unflatten Reshapes; optionally one
fused projection and a Split), a Reshape that splits the last axis into (heads, head_dim) — or, for fused
per-head layouts, into [heads, 3·head_dim], [heads + 2·kv, head_dim] or [heads, 3, head_dim] followed by
the ops that pick the roles (``head_routes``) — per-head work (RoPE, scores, softmax, the weighted sum of
V), a Reshape that merges (heads, head_dim) back and the output projection. Roles come from the graph:
where each branch meets the attention MatMuls (module names are a fallback and label reports). This
module then *proves* the head structure by following the head axis forward from the three role tensors
through every op that reads it. Each op either maps the axis (Transpose, elementwise ops whose other
operands broadcast over heads, batched MatMul, Slice/Concat/Split on other axes, the GQA repeat, a single
kv head broadcast over the query heads, the exporter's merge-batch-and-heads transpose trick) or blocks
the block with the op and the reason. A block that is not proven is reported as unsupported and left
alone: the passes built on this never guess.

Two head spaces exist per block: query heads (H) and key/value heads (K). They meet at a GQA repeat
(``Unsqueeze → Expand → Reshape``: query head ``h`` reads kv head ``h // (H / K)``), at a ``Gather`` over
the kv-head axis (an explicit map, what the head passes write for uneven groups) or, for MHA and
multi-query, directly at the score and value MatMuls (identity map; every head reads kv head 0). Those
meeting points are where a pass rewrites the q-head → kv-head map; K and V must be mapped the same way.

When is a head's contribution zero? The block's output is ``Σ_h O_h · (P_h · V_{map(h)})`` where ``O_h``
are the output projection's rows of head ``h`` and ``P_h`` is the head's attention matrix. The term is
zero for every input when ``O_h = 0``, or when ``V_{map(h)} = 0`` (value weight columns *and* value bias
of that kv head are zero, and no past cache feeds V: a cache is a graph input, never provably zero).
Zero *query* (or key) columns do **not** remove a head: the scores become 0, softmax turns them into a
uniform average over the visible positions, and the head still outputs ``mean(V)``. A kv head can go
when every query head reading it is gone.

Where the parts live: the data model in ``attention_types``, the projection finder in ``projections``,
fused layouts in ``head_routes``, the head-axis proof in ``head_axis``; this module runs them per block
and finds the zero heads.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.attention_types import (
    AttentionAnalysis,
    AttentionBlock,
    Projection,
    SplitReshape,
)
from prune2deploy.analysis.head_axis import HeadAxisBlocked, trace_heads
from prune2deploy.analysis.head_routes import Route, RouteBlocked, graph_role, trace_route
from prune2deploy.analysis.projections import projection_behind, role_of, split_reshape
from prune2deploy.graph.attributes import ints_attr
from prune2deploy.graph.constants import const_array
from prune2deploy.graph.dims import rank as _rank
from prune2deploy.graph.dims import static_dim
from prune2deploy.graph.scopes import layer_of, module_of

# The result types live in attention_types; these two are re-exported because analyze_attention returns them.
__all__ = ["AttentionAnalysis", "AttentionBlock", "analyze_attention"]

log = logging.getLogger(__name__)

#: Ops between a V split and the value MatMul that keep zeros zero (for the zero-V criterion).
_ZERO_PRESERVING = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Gather"}


def _block_key(node: ir.Node) -> str:
    return module_of(node) or layer_of(node) or "<graph>"


def analyze_attention(model: ir.Model) -> AttentionAnalysis:
    """Finds and proves every attention block of ``model`` (which must carry value shapes)."""
    candidates: dict[str, AttentionBlock] = {}
    notes: dict[str, list[str]] = {}  # fused layouts that could not be followed (said when roles are missing)
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        found = split_reshape(node)
        if found is None:
            _fused_split(node, candidates)
            continue
        n, d, entry = found
        projection, why = projection_behind(node.inputs[0])
        key = _block_key(node)
        block = candidates.setdefault(key, AttentionBlock(name=key, layer=layer_of(node)))
        if projection is None:
            block.reasons.append(f"{node.name} splits heads but {_why_no_projection(node, why)}")
            continue
        route, route_why = None, ""
        if projection.split is None:
            try:
                route = trace_route(node)
            except RouteBlocked as exc:
                route, route_why = None, str(exc)
                notes.setdefault(key, []).append(route_why)
            if route is not None and not _plain(route):
                _add_routed(block, node, projection, route)
                continue
        role = graph_role(node.outputs[0]) or _name_role(projection)
        if role is None:
            why = f"; {route_why}" if projection.split is None and route is None else ""
            block.reasons.append(
                f"{node.name}: the heads of '{projection.module}' never meet a q·kᵀ or p·v MatMul{why}"
            )
            continue
        if role in block.splits:
            block.reasons.append(
                f"two {role} projections ({block.projections[role].matmul.name}, {projection.matmul.name})"
            )
            continue
        projection.role = role
        block.projections[role] = projection
        block.splits[role] = SplitReshape(role, node, entry)
        if role == "q":
            block.num_heads, head_dim = n, d
        else:
            block.num_kv_heads, head_dim = n, d
        if block.head_dim and block.head_dim != head_dim:
            block.reasons.append(f"head_dim differs between projections ({block.head_dim} vs {head_dim})")
        block.head_dim = head_dim
    blocks = []
    for block in candidates.values():
        if not block.splits and not block.reasons:
            continue
        missing = [r for r in "qkv" if r not in block.splits]
        if missing:
            why = "; ".join(notes.get(block.name, []))
            block.reasons.append(f"no {'/'.join(missing)} projection found" + (f" ({why})" if why else ""))
        elif _heads_of(block, "k") != _heads_of(block, "v"):
            block.reasons.append("key and value have different head counts")
        if block.supported:
            try:
                trace_heads(model, block)
            except HeadAxisBlocked as exc:
                block.reasons.append(str(exc))
        if block.supported:
            _find_zero_heads(block)
        else:
            log.info("attention block %s not supported: %s", block.name, "; ".join(block.reasons))
        blocks.append(block)
    blocks += _unmatched_softmax(model, blocks)
    return AttentionAnalysis(blocks)


_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "GroupNormalization"}


def _why_no_projection(split: ir.Node, why: str) -> str:
    """Names a normalisation over all heads' channels between the projection and the head split (OLMo-2's
    q/k norm), which is why head removal is refused there; otherwise the projection finder's reason."""
    width = static_dim(split.inputs[0].shape[-1]) if split.inputs[0].shape else None
    seen, frontier = set(), [split.inputs[0]]
    while frontier and len(seen) < 16:
        node = frontier.pop().producer()
        if node is None or node in seen or node.op_type in ("MatMul", "Gemm"):
            continue
        seen.add(node)
        if _normalises_last_axis(node, width):
            return (
                f"{node.name} ({node.op_type}) normalises over all {width} channels of every head between the"
                " projection and the head split (a q/k norm over all heads): each head's output depends on"
                " the other heads' channels, so removing a head is not exact; only a per-head norm over"
                " head_dim (after the split) lets heads go"
            )
        frontier.extend(v for v in node.inputs if v is not None)
    return why


def _normalises_last_axis(node: ir.Node, width: int | None) -> bool:
    """A norm op, or a reduction whose axes include the last, over a last axis of ``width`` channels."""
    data = node.inputs[0] if node.inputs else None
    if width is None or data is None or not data.shape or static_dim(data.shape[-1]) != width:
        return False
    if node.op_type in _NORMS:
        return True
    if not node.op_type.startswith("Reduce"):
        return False
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    axes = axes.reshape(-1).tolist() if axes is not None else ints_attr(node, "axes", None)
    return axes is not None and (len(data.shape) - 1) in [int(a) % len(data.shape) for a in axes]


def _name_role(projection: Projection) -> str | None:
    """The role by module name (for graphs whose heads never reach the attention MatMuls by themselves)."""
    role = role_of(projection.module)
    if role == "qkv":
        return "qkv"[projection.split_index] if projection.split is not None and projection.split_index < 3 else None
    return role


def _plain(route: Route) -> bool:
    """Not a fused layout: one branch (a projection of one role; a kv-head Gather after it is the head-axis
    proof's business), or branches that share columns (a selection that repeats heads is no role split)."""
    if len(route.sources) < 2:
        return True
    columns = np.concatenate([s.index.reshape(-1) for s in route.sources])
    return len(np.unique(columns)) != len(columns)


def _heads_of(block: AttentionBlock, role: str) -> int | None:
    projection = block.projections[role]
    if projection.columns is not None:
        return int(projection.columns.shape[0])
    return static_dim(block.splits[role].node.outputs[0].shape[-2])


def _fused_split(node: ir.Node, candidates: dict[str, AttentionBlock]) -> None:
    """A Reshape ``[.., W] -> [.., a, b, c..]`` (BLOOM's ``[heads, 3, head_dim]``) is a fused head split
    when a projection feeds it and its columns route to three branches that meet the attention MatMuls;
    anything else is some other Reshape and is left alone."""
    r_in, r_out = _rank(node.inputs[0]), _rank(node.outputs[0])
    if r_in is None or r_out is None or r_out < r_in + 2:
        return
    projection, _ = projection_behind(node.inputs[0])
    if projection is None or projection.split is not None:
        return
    try:
        route = trace_route(node)
    except RouteBlocked:
        return
    if _plain(route) or any(graph_role(s.value) is None for s in route.sources):
        return
    key = _block_key(node)
    _add_routed(candidates.setdefault(key, AttentionBlock(name=key, layer=layer_of(node))), node, projection, route)


def _add_routed(block: AttentionBlock, node: ir.Node, projection: Projection, route: Route) -> None:
    """One fused head split feeds all three roles; each branch's role comes from the attention MatMuls."""
    if block.splits:
        block.reasons.append(f"{node.name}: a fused q/k/v head split next to other projections")
        return
    roles: dict[str, object] = {}
    for source in route.sources:
        role = graph_role(source.value)
        if role is None or role in roles:
            found = "no q·kᵀ or p·v MatMul" if role is None else f"a second {role}"
            block.reasons.append(f"{node.name}: branch '{source.value.name}' of the fused q/k/v reaches {found}")
            return
        roles[role] = source
    if set(roles) != set("qkv"):
        block.reasons.append(f"{node.name}: the fused projection's branches are {sorted(roles)}, not q, k and v")
        return
    block.route = route
    for role, source in roles.items():
        part = dataclasses.replace(projection, role=role, columns=source.index)
        block.projections[role] = part
        block.splits[role] = SplitReshape(role, node, source.axes[0], value=source.value)
    block.num_heads, block.head_dim = roles["q"].index.shape
    block.num_kv_heads = roles["k"].index.shape[0]
    if roles["k"].index.shape[1] != block.head_dim or roles["v"].index.shape[1] != block.head_dim:
        block.reasons.append(f"{node.name}: q, k and v heads of the fused projection differ in width")


def _unmatched_softmax(model: ir.Model, blocks: list[AttentionBlock]) -> list[AttentionBlock]:
    """Attention the analysis did not even find (no head-split Reshapes) is reported, not ignored.

    A Softmax over a rank ≥ 3 tensor that no proven block covers, in a module no block is named after, is
    listed as an unsupported block so that ``inspect`` shows it (classifier softmaxes are rank 2).
    """
    covered = {t.value for b in blocks for t in b.tensors}
    named = {b.name for b in blocks}
    extra: dict[str, AttentionBlock] = {}
    for node in model.graph:
        if node.op_type != "Softmax" or node.outputs[0] in covered or (_rank(node.inputs[0]) or 0) < 3:
            continue
        key = _block_key(node)
        if key in named:
            continue
        block = extra.setdefault(key, AttentionBlock(name=key, layer=layer_of(node)))
        block.reasons.append(f"{node.name}: Softmax with no recognised q/k/v head-split Reshapes around it")
    return list(extra.values())


def _find_zero_heads(block: AttentionBlock) -> None:
    d, heads = block.head_dim, block.num_heads
    o = block.projections["o"].weight_array().reshape(heads, d, -1)
    for h in np.flatnonzero(~np.any(o != 0, axis=(1, 2))):
        block.zero_heads[int(h)] = "output projection rows are zero"
    block.v_zero_blocked = _v_path_blocker(block)
    if block.v_zero_blocked:
        return
    v = block.projections["v"]
    weight = v.role_weight().reshape(-1, block.num_kv_heads, d)
    zero = ~np.any(weight != 0, axis=(0, 2))
    bias = v.role_bias()
    if bias is not None:
        zero &= ~np.any(bias.reshape(block.num_kv_heads, d) != 0, axis=1)
    for h in range(heads):
        if zero[block.kv_of(h)] and h not in block.zero_heads:
            block.zero_heads[h] = "value heads are zero"


def _v_path_blocker(block: AttentionBlock) -> str:
    """Why zero V columns would not prove a zero head ('' when they do)."""
    if "v" in block.cache_inputs:
        return "V is concatenated with a past cache (a graph input, not provably zero)"
    values = [block.splits["v"].head_value]
    while values:
        value = values.pop()
        for use in value.uses():
            node = use.node
            if node.op_type in ("MatMul", "Shape"):
                continue
            if node.op_type not in _ZERO_PRESERVING:
                return f"{node.name} ({node.op_type}) on the V path may turn zeros into non-zeros"
            values.extend(node.outputs)
    return ""
