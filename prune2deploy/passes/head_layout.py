"""Rewrite one proven attention block to a new head layout: which query heads, which kv heads, which map.

Both head passes reduce to this: ``remove-heads`` keeps a subset of query heads and the kv heads they
read; ``regroup-gqa`` permutes query heads and replaces the kv heads by pooled ones. The rewrite

- takes the chosen query columns of the q projection (and bias) and the matching output-projection rows,
- installs the new K and V columns (and biases; fused QKV weights and Split sizes included),
- rewrites every constant that carries a head count (split/merge Reshape targets, the GQA Expand/Reshape
  targets) on a *clone*, since the exporter shares these small constants between layers and roles,
- expresses the query → kv map: a uniform map keeps the ``Unsqueeze → Expand → Reshape`` repeat with new
  counts; any other map becomes a ``Gather`` over the kv-head axis (replacing the repeat, or inserted at
  the MHA meeting points), which is exact for uneven groups,
- updates the static head width of every head tensor the proof found, including past/present caches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.attention_types import AttentionBlock, Projection
from prune2deploy.analysis.head_routes import plan_route
from prune2deploy.graph.constants import const_array
from prune2deploy.graph.dims import set_dim, shape_entries
from prune2deploy.graph.initializers import NameCounter, add_initializer

__all__ = ["HeadLayout", "apply_head_layout", "head_columns", "uniform_group_size"]

log = logging.getLogger(__name__)


@dataclass
class HeadLayout:
    """The block after the rewrite.

    Attributes:
        q_heads: original query heads to keep, in their new order.
        k_weight, v_weight: new key/value projection columns, ``[in, kv_heads' * head_dim]``.
        k_bias, v_bias: new biases (``None`` when the block has none).
        mapping: new query head ``i`` reads new kv head ``mapping[i]``.
        head_dim: unchanged head width (gives the kv head count from the new columns).
        kv_heads: the original kv heads the new K/V columns are, when they are a subset (head removal);
            ``None`` when they are new (pooled) heads. A routed fused layout only takes a removal.
    """

    q_heads: list[int]
    k_weight: np.ndarray
    v_weight: np.ndarray
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    mapping: list[int]
    head_dim: int
    kv_heads: list[int] | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.k_weight.shape[1] // self.head_dim


def head_columns(heads: Sequence[int], head_dim: int) -> np.ndarray:
    """Column (or row) indices of ``heads`` in a ``[.., heads * head_dim]`` layout."""
    return (np.asarray(heads, dtype=np.int64)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def uniform_group_size(mapping: Sequence[int], num_kv: int) -> int | None:
    """``r`` when ``mapping[i] == i // r`` (what an Expand repeat expresses), else ``None``."""
    if not mapping or num_kv == 0 or len(mapping) % num_kv:
        return None
    r = len(mapping) // num_kv
    return r if all(m == i // r for i, m in enumerate(mapping)) else None


class _Editor:
    """Creates fresh constants and clones shape vectors; never changes a value other nodes may read."""

    def __init__(self, model: ir.Model, tag: str) -> None:
        self.model = model
        self.names = NameCounter(tag)
        self.replaced: list[ir.Value] = []

    def fresh_name(self, base: str) -> str:
        return self.names(self.model.graph, base)

    def const(self, array: np.ndarray, base: str, like: ir.Value | None = None) -> ir.Value:
        name = self.fresh_name(base or "const")
        dtype = like.dtype if like is not None and like.dtype is not None else None
        return add_initializer(self.model.graph, name, array, dtype)

    def set_weight(self, projection: Projection, array: np.ndarray) -> None:
        """Installs an ``[in, out]`` weight in the projection's own storage order."""
        self.set_input(projection.matmul, 1, array.T if projection.transposed else array)

    def set_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        self.replaced.append(old)
        node.replace_input_with(index, self.const(array, old.name or "w", like=old))

    def set_shape_entries(self, node: ir.Node, index: int, changes: dict[int, int]) -> None:
        """Rewrites entries of ``node``'s shape input on a private copy (constant or Concat of pieces)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return
        target = node.inputs[index]
        array = const_array(target)
        if array is not None:
            new = array.copy().reshape(-1)
            for entry, value in changes.items():
                new[entry] = value
            self.replaced.append(target)
            node.replace_input_with(index, self.const(new, target.name or "shape", like=target))
            return
        concat = target.producer()
        pieces = list(concat.inputs)
        offset = 0
        for p_index, piece in enumerate(list(pieces)):
            length = int(piece.shape[0])
            local = {e - offset: v for e, v in changes.items() if offset <= e < offset + length}
            if local:
                data = const_array(piece)
                if data is None:  # the analysis only proves targets whose head entries are constant
                    raise RuntimeError(f"{concat.name}: shape piece {p_index} is not constant")
                new = data.copy().reshape(-1)
                for entry, value in local.items():
                    new[entry] = value
                pieces[p_index] = self.const(new, piece.name or "shape_piece", like=piece)
            offset += length
        clone = ir.node("Concat", pieces, attributes={"axis": 0}, name=self.fresh_name(concat.name or "concat"))
        clone.outputs[0].name = self.fresh_name(target.name or "shape")
        clone.outputs[0].shape = target.shape
        clone.outputs[0].type = target.type
        self.model.graph.insert_before(node, clone)
        node.replace_input_with(index, clone.outputs[0])

    def gather(self, data: ir.Value, indices: Sequence[int], axis: int, before: ir.Node, like: ir.Value) -> ir.Value:
        index_value = self.const(np.asarray(indices, dtype=np.int64), "head_map")
        node = ir.node("Gather", [data, index_value], attributes={"axis": axis}, name=self.fresh_name("head_gather"))
        out = node.outputs[0]
        out.name = self.fresh_name(f"{data.name}_heads")
        out.type = like.type
        if like.shape is not None:
            dims = list(like.shape)
            dims[axis] = len(indices)
            out.shape = ir.Shape(dims)
        self.model.graph.insert_before(before, node)
        return out

    def drop_unused(self) -> None:
        graph = self.model.graph
        for value in self.replaced:
            unused = not list(value.uses()) and not value.is_graph_input() and not value.is_graph_output()
            if unused and graph.initializers.get(value.name) is value:
                graph.initializers.pop(value.name)


def _static_width(value: ir.Value) -> int:
    return int(value.shape[-1])


def _check_layout(block: AttentionBlock, layout: HeadLayout) -> None:
    """Refuses a layout that cannot describe this block (a caller bug must not produce a wrong graph)."""
    if not block.supported:
        raise ValueError(f"{block.name} is not a supported attention block: {block.reasons}")
    if layout.kv_heads is None and any(space == "kv" for *_, space in block.head_constants):
        raise ValueError(f"{block.name}: per-kv-head constants cannot follow new (pooled) kv heads")
    heads = layout.q_heads
    if not heads or len(set(heads)) != len(heads) or not all(0 <= h < block.num_heads for h in heads):
        raise ValueError(f"{block.name}: query heads {heads} are not distinct heads of 0..{block.num_heads - 1}")
    if layout.head_dim != block.head_dim or layout.k_weight.shape[1] % block.head_dim:
        raise ValueError(f"{block.name}: new K columns do not hold whole heads of {block.head_dim}")
    if layout.v_weight.shape != layout.k_weight.shape:
        raise ValueError(f"{block.name}: new K and V weights differ in shape")
    if len(layout.mapping) != len(heads) or not all(0 <= m < layout.num_kv_heads for m in layout.mapping):
        raise ValueError(f"{block.name}: query → kv map {layout.mapping} does not fit {layout.num_kv_heads} kv heads")


def _apply_route(edit: _Editor, block: AttentionBlock, layout: HeadLayout) -> None:
    """Keeps the surviving columns of a routed fused projection and renumbers every routing constant.

    Raises:
        ValueError: the layout is not a head removal (a fused per-head layout cannot take new kv heads).
        RouteBlocked: the kept columns do not form whole slabs of the layout; nothing was changed.
    """
    q, k, v = (block.projections[r] for r in "qkv")
    kv_heads, heads = layout.kv_heads, layout.q_heads
    if kv_heads is None or heads != sorted(heads) or layout.mapping != [kv_heads.index(block.kv_of(h)) for h in heads]:
        raise ValueError(f"{block.name}: a fused per-head q/k/v layout only takes head removal, not {layout}")
    removed = [q.columns[h] for h in range(block.num_heads) if h not in heads]
    removed += [p.columns[g] for g in range(block.num_kv_heads) if g not in kv_heads for p in (k, v)]
    survivors = np.setdiff1d(np.arange(block.route.width), np.concatenate(removed) if removed else [])
    actions = plan_route(block.route, survivors)  # may refuse: before any change
    edit.set_weight(q, q.weight_array()[:, survivors])
    _set_width(q, len(survivors))
    if q.bias is not None:
        edit.set_input(q.bias_add, list(q.bias_add.inputs).index(q.bias), q.bias_array()[survivors])
    for kind, node_or_value, *rest in actions:
        if kind == "dim":
            set_dim(node_or_value, *rest)
        elif kind == "entries":
            edit.set_shape_entries(node_or_value, 1, rest[0])
        elif kind == "input":
            edit.set_input(node_or_value, *rest)
        elif kind == "split":
            _set_split_sizes(edit, node_or_value, rest[0])


def _set_width(projection: Projection, width: int) -> None:
    """The projection's output width, after its bias Add and scalings too."""
    set_dim(projection.matmul.outputs[0], -1, width)
    for node in ([projection.bias_add] if projection.bias_add is not None else []) + projection.scales:
        set_dim(node.outputs[0], -1, width)


def _set_split_sizes(edit: _Editor, split: ir.Node, sizes: np.ndarray) -> None:
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        edit.set_input(split, 1, sizes)
    else:
        split.resize_inputs(2)
        split.replace_input_with(1, edit.const(sizes, "split"))
        split.attributes.pop("num_outputs", None)


def apply_head_layout(model: ir.Model, block: AttentionBlock, layout: HeadLayout, *, tag: str = "heads") -> dict:
    """Rewrites ``block`` to ``layout``; returns what changed (for the pass record).

    The block must come from a fresh :func:`~prune2deploy.analysis.attention.analyze_attention` of this
    model (the proof's node and value references are used directly).
    """
    _check_layout(block, layout)
    edit = _Editor(model, tag)
    new_h, new_k = len(layout.q_heads), layout.num_kv_heads
    _install_projections(edit, block, layout)
    _rewrite_head_counts(edit, block, layout)
    gathers = _rewrite_kv_map(model, edit, block, layout)
    # Static head widths of every head tensor (graph inputs/outputs of a KV cache included).
    for tensor in block.tensors:
        if tensor.merged:
            continue
        set_dim(tensor.value, tensor.axis, new_h if tensor.space == "q" else new_k)
    edit.drop_unused()
    return {
        "heads_before": block.num_heads,
        "heads_after": new_h,
        "kv_heads_before": block.num_kv_heads,
        "kv_heads_after": new_k,
        "gathers": gathers,
        "cache_changed": bool(block.cache_inputs) and new_k != block.num_kv_heads,
    }


def _install_projections(edit: _Editor, block: AttentionBlock, layout: HeadLayout) -> None:
    """Installs the kept query columns, the new K/V columns and the matching output-projection rows.

    Three weight layouts: a routed block (:func:`_apply_route`), one fused QKV weight cut by a Split, or a
    weight per role. A Gemm projection's ``[N, out] -> [.., out]`` Reshape carries the new width too.
    """
    d = block.head_dim
    q_cols = head_columns(layout.q_heads, d)
    q, k, v, o = (block.projections[r] for r in "qkvo")
    q_weight = q.role_weight()[:, q_cols]
    q_bias = None if q.bias is None else q.role_bias()[q_cols]
    if (layout.k_bias is None) != (k.bias is None) or (layout.v_bias is None) != (v.bias is None):
        raise ValueError("the new layout's biases do not match the block's")

    new_parts = {"q": (q_weight, q_bias), "k": (layout.k_weight, layout.k_bias), "v": (layout.v_weight, layout.v_bias)}
    if block.route is not None:
        _apply_route(edit, block, layout)
    elif q.split is not None:
        _install_fused_qkv(edit, block, new_parts)
    else:
        for role in "qkv":
            proj = block.projections[role]
            weight, bias = new_parts[role]
            edit.set_weight(proj, weight)
            _set_width(proj, weight.shape[1])
            if proj.bias is not None:
                edit.set_input(proj.bias_add, list(proj.bias_add.inputs).index(proj.bias), bias)
    edit.set_weight(o, o.weight_array()[head_columns(layout.q_heads, d)])
    # Gemm projections: the [N, out] -> [.., out] Reshape after them carries the (fused) width.
    for proj in {id(p.unflatten): p for p in (q, k, v)}.values():
        if proj.unflatten is not None:
            width = _static_width(proj.matmul.outputs[0])
            entries = shape_entries(proj.unflatten.inputs[1])
            if entries[-1] != -1:
                edit.set_shape_entries(proj.unflatten, 1, {len(entries) - 1: width})
            set_dim(proj.unflatten.outputs[0], -1, width)


def _install_fused_qkv(edit: _Editor, block: AttentionBlock, new_parts: dict) -> None:
    """One weight for all roles: rebuilds it in Split order and rewrites the Split sizes."""
    q = block.projections["q"]
    order = sorted("qkv", key=lambda r: block.projections[r].offset)
    weight = np.concatenate([new_parts[r][0] for r in order], axis=1)
    edit.set_weight(q, weight)
    if q.bias is not None:
        edit.set_input(
            q.bias_add, list(q.bias_add.inputs).index(q.bias), np.concatenate([new_parts[r][1] for r in order])
        )
    # The Split's outputs are in offset order, so its sizes follow ``order`` too.
    sizes = np.asarray([new_parts[r][0].shape[1] for r in order], dtype=np.int64)
    _set_split_sizes(edit, q.split, sizes)
    _set_width(q, weight.shape[1])
    for role in "qkv":
        proj = block.projections[role]
        set_dim(proj.split.outputs[proj.split_index], -1, new_parts[role][0].shape[1])


def _rewrite_head_counts(edit: _Editor, block: AttentionBlock, layout: HeadLayout) -> None:
    """Head counts baked into constants: split / merge Reshape targets (-1 stays -1), other head-count
    Reshapes, and per-head constants (taken at the kept heads; computed ones through a Gather)."""
    d = block.head_dim
    new_h, new_k = len(layout.q_heads), layout.num_kv_heads
    for role, split in block.splits.items() if block.route is None else ():
        entries = shape_entries(split.node.inputs[1])
        count = new_h if role == "q" else new_k
        if entries[split.head_entry] != -1:
            edit.set_shape_entries(split.node, 1, {split.head_entry: count})
    merge_entries = shape_entries(block.merge.inputs[1])
    if merge_entries[block.merge_entry] != -1:
        edit.set_shape_entries(block.merge, 1, {block.merge_entry: new_h * d})
    set_dim(block.merge.outputs[0], -1, new_h * d)
    for node, entry, space in block.head_reshapes:
        edit.set_shape_entries(node, 1, {entry: new_h if space == "q" else new_k})
    for node, index, axis, space in block.head_constants:
        heads = layout.q_heads if space == "q" else layout.kv_heads
        operand = node.inputs[index]
        array = const_array(operand)
        if array is not None:
            edit.set_input(node, index, np.take(array, heads, axis=axis))
        else:  # computed per head (MPT's sliced ALiBi bias): this node reads the kept heads' entries
            node.replace_input_with(index, edit.gather(operand, heads, axis, node, like=operand))


def _rewrite_kv_map(model: ir.Model, edit: _Editor, block: AttentionBlock, layout: HeadLayout) -> int:
    """Expresses the query → kv map; returns the number of Gathers inserted.

    A uniform map keeps each ``Unsqueeze → Expand → Reshape`` repeat with new counts; any other map
    replaces the repeat by a Gather over the kv-head axis. Existing Gathers get the new map, and the MHA
    meeting points (joins) get a Gather unless the map is the identity or a single kv head broadcasts.
    """
    new_h, new_k = len(layout.q_heads), layout.num_kv_heads
    rep = uniform_group_size(layout.mapping, new_k)
    gathers = 0
    for repeat in block.repeats:
        if rep is not None:
            _retarget_repeat(edit, block, repeat, rep, new_h, new_k)
        else:
            old = repeat.reshape.outputs[0]
            new = edit.gather(repeat.unsqueeze.inputs[0], layout.mapping, repeat.axis, repeat.reshape, like=old)
            old.replace_all_uses_with(new)
            for node in (repeat.reshape, repeat.expand, repeat.unsqueeze):
                if not any(list(out.uses()) for out in node.outputs):
                    model.graph.remove(node, safe=True)
            gathers += 1
    for gather in block.gathers:
        edit.set_input(gather.node, 1, np.asarray(layout.mapping, dtype=np.int64))
    broadcast = block.num_kv_heads == new_k == 1  # multi-query: the single kv head broadcasts over heads
    if block.joins and not (rep == 1 and new_h == new_k) and not broadcast:
        for join in block.joins:
            data = join.node.inputs[join.index]
            new = edit.gather(data, layout.mapping, join.axis, join.node, like=data)
            join.node.replace_input_with(join.index, new)
            gathers += 1
    return gathers


def _retarget_repeat(edit: _Editor, block: AttentionBlock, repeat, rep: int, new_h: int, new_k: int) -> None:
    """A uniform GQA repeat with new counts: ``new_k`` kv heads, each repeated ``rep`` times.

    The Expand target's kv-head entry changes only where it states the count (1 broadcasts).
    """
    target = shape_entries(repeat.expand.inputs[1])
    a = repeat.axis
    changes = {a + 1: rep}
    if target[a] == block.num_kv_heads and target[a] != 1:
        changes[a] = new_k
    edit.set_shape_entries(repeat.expand, 1, changes)
    if shape_entries(repeat.reshape.inputs[1])[a] != -1:
        edit.set_shape_entries(repeat.reshape, 1, {a: new_h})
    set_dim(repeat.unsqueeze.outputs[0], a, new_k)
    set_dim(repeat.expand.outputs[0], a, new_k)
    set_dim(repeat.expand.outputs[0], a + 1, rep)
