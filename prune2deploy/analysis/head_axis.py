"""The head-axis proof: follows the head axis of one attention block from its three split Reshapes.

Each op that reads a head tensor either maps the axis (Transpose, elementwise ops whose other operands
broadcast over heads, batched MatMul, Slice/Concat/Split on other axes, the GQA repeat, the exporter's
merge-batch-and-heads transpose trick) or blocks the block with the op and the reason. Along the way the
tracer records where query heads meet kv heads (repeats, gathers, MHA joins), the head merge before the
output projection, the cache inputs and outputs and every tensor whose width changes with the head count.
See :mod:`prune2deploy.analysis.attention` for the whole picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.attention_types import AttentionBlock, HeadGather, HeadTensor, Join, Projection, Repeat
from prune2deploy.analysis.projections import gemm_weight
from prune2deploy.graph.attributes import int_attr, ints_attr
from prune2deploy.graph.constants import const_array
from prune2deploy.graph.dims import rank as _rank
from prune2deploy.graph.dims import same_dim, shape_entries, static_dim
from prune2deploy.graph.op_categories import ACTIVATIONS, ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, REDUCTIONS

__all__ = ["HeadAxisBlocked", "trace_heads"]

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min

# The head axis passes through a one-operand op unchanged. PRelu and CastLike are left out: their second
# operand (the slope, the type donor) may be the traced head tensor, which the unary rule does not check.
_UNARY = (ELEMENTWISE_UNARY | ACTIVATIONS | {"Identity"}) - {"PRelu", "CastLike"}
# Only the Reduce* ops: they share the axes input (or attribute) and keepdims that _reduce reads;
# ArgMax, CumSum, TopK and global pooling name their axes differently.
_REDUCE = frozenset(op for op in REDUCTIONS if op.startswith("Reduce"))
_NARY = ELEMENTWISE_BINARY


def _shape_slice_of(value: ir.Value | None) -> tuple[ir.Value, int, int] | None:
    """``(x, start, end)`` when ``value`` is ``Slice(Shape(x), start, end)`` (axis 0, step 1)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Slice":
        return None
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape":
        return None
    if int_attr(shape_node, "start", 0) != 0 or int_attr(shape_node, "end", None) is not None:
        return None
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.zeros(1)
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if starts.size != 1 or ends.size != 1 or int(axes.reshape(-1)[0]) != 0 or int(steps.reshape(-1)[0]) != 1:
        return None
    return shape_node.inputs[0], int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


class HeadAxisBlocked(Exception):
    """The head axis reaches an op the proof cannot follow (the message says where and why)."""


_Blocked = HeadAxisBlocked


@dataclass(frozen=True)
class _Axis:
    axis: int
    space: str
    sources: frozenset
    merged_from: ir.Value | None = None


class _Tracer:
    """Follows the head axis from the three split Reshapes of one block through the graph."""

    def __init__(self, model: ir.Model, block: AttentionBlock) -> None:
        self.model = model
        self.block = block
        self.heads: dict[ir.Value, _Axis] = {}
        self.handled: set[ir.Node] = set()  # nodes consumed by a pattern (repeat, merge)
        self.shape_targets: set[ir.Node] = set()  # Reshape/Expand whose run-time target is proven
        self.width = {"q": block.num_heads, "kv": block.num_kv_heads}

    def run(self) -> None:
        block = self.block
        for role, split in block.splits.items():
            space = "q" if role == "q" else "kv"
            self._mark(split.head_value, _Axis(split.head_entry, space, frozenset(role)))
            self.handled.add(split.node)
        for node in self.model.graph:
            if node in self.handled:
                continue
            traced = [i for i, v in enumerate(node.inputs) if v is not None and v in self.heads]
            if not traced:
                continue
            where = node.name or node.op_type
            try:
                self._visit(node, traced)
            except _Blocked as exc:
                raise _Blocked(f"{where} ({node.op_type}): {exc}") from None
        if block.merge is None:
            raise _Blocked("the query heads never reach an output projection")
        maps = [[h // r.n_rep for h in range(block.num_heads)] for r in block.repeats]
        maps += [g.indices for g in block.gathers]
        if block.joins:
            if block.num_kv_heads == 1:  # multi-query: the one kv head broadcasts over the query heads
                maps.append([0] * block.num_heads)
            elif block.num_heads != block.num_kv_heads:
                raise _Blocked("query and kv heads meet without a repeat but their counts differ")
            else:
                maps.append(list(range(block.num_heads)))
        if not maps:
            raise _Blocked("query heads never meet key/value heads")
        if any(m != maps[0] for m in maps):
            raise _Blocked(f"key and value heads are mapped to query heads differently: {maps}")
        if len(block.repeats) + len(block.gathers) + len(block.joins) != 2:
            raise _Blocked("expected one query/kv meeting for K and one for V")
        block.kv_map = maps[0]
        self._check_shape_readers()
        for value, info in self.heads.items():
            if value.is_graph_output():
                if info.space != "kv" or info.merged_from is not None:
                    raise _Blocked(f"'{value.name}' (a graph output) carries query heads")
                role = "k" if info.sources == frozenset("k") else "v" if info.sources == frozenset("v") else ""
                if not role:
                    raise _Blocked(f"graph output '{value.name}' mixes key and value heads")
                block.cache_outputs[role] = value
            block.tensors.append(HeadTensor(value, info.axis, info.space, merged=info.merged_from is not None))

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _mark(self, value: ir.Value, info: _Axis) -> None:
        if value in self.heads and self.heads[value] != info:
            raise _Blocked(f"'{value.name}' reached twice with different head axes")
        if info.merged_from is None:
            rank = _rank(value)
            if rank is None:
                raise _Blocked(f"'{value.name}' has no shape")
            width = static_dim(value.shape[info.axis])
            if width is not None and width != self.width[info.space]:
                raise _Blocked(f"'{value.name}' axis {info.axis} is {width}, expected {self.width[info.space]} heads")
        self.heads[value] = info

    def _visit(self, node: ir.Node, traced: list[int]) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Blocked("custom-domain op")
        infos = [self.heads[node.inputs[i]] for i in traced]
        first = infos[0]
        if op == "Shape":
            return  # checked in _check_shape_readers
        if any(info.merged_from is not None for info in infos):
            return self._visit_merged(node, first)
        if op == "Transpose":
            perm = list(ints_attr(node, "perm", range(_rank(node.inputs[0]))[::-1]))
            self._mark(node.outputs[0], _Axis(perm.index(first.axis), first.space, first.sources))
        elif op in _UNARY or op in ("Softmax", "LogSoftmax"):
            if op in ("Softmax", "LogSoftmax"):
                rank = _rank(node.inputs[0])
                if int_attr(node, "axis", -1) % rank == first.axis:
                    raise _Blocked("normalises over the head axis")
            self._mark(node.outputs[0], first)
        elif op in _NARY:
            self._elementwise(node, traced)
        elif op == "MatMul":
            self._matmul(node, traced)
        elif op == "Slice":
            self._slice(node, traced, first)
        elif op == "Concat":
            self._concat(node, first)
        elif op == "Split":
            axis = int_attr(node, "axis", 0) % _rank(node.inputs[0])
            if traced != [0] or axis == first.axis:
                raise _Blocked("splits the head axis")
            for out in node.outputs:
                self._mark(out, first)
        elif op == "Unsqueeze":
            self._unsqueeze(node, first)
        elif op == "Squeeze":
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            rank = _rank(node.inputs[0])
            if axes is None or traced != [0]:
                raise _Blocked("Squeeze axes are not constant")
            axes = sorted(int(a) % rank for a in axes.reshape(-1))
            if first.axis in axes:
                raise _Blocked("squeezes the head axis")
            self._mark(
                node.outputs[0], _Axis(first.axis - sum(a < first.axis for a in axes), first.space, first.sources)
            )
        elif op == "Reshape":
            self._reshape(node, traced, first)
        elif op == "Gather":
            self._gather(node, traced, first)
        elif op in _REDUCE:
            self._reduce(node, traced, first)
        else:
            raise _Blocked("no head-axis rule for this op")

    def _reduce(self, node: ir.Node, traced: list[int], first: _Axis) -> None:
        """A per-head reduction (q/k RMSNorm over head_dim): each head's statistic reads that head only, so
        the head axis passes through; one over the head axis mixes heads (a norm over all heads) and blocks."""
        rank = _rank(node.inputs[0])
        if traced != [0] or rank is None:
            raise _Blocked("reduction of a head tensor with unknown rank or computed axes")
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = const_array(node.inputs[1])
        else:
            axes = ints_attr(node, "axes", None)
        if axes is None:
            raise _Blocked("reduces over all axes, the head axis included: a statistic over all heads")
        axes = sorted({int(a) % rank for a in np.asarray(axes).reshape(-1)})
        if first.axis in axes:
            raise _Blocked("reduces over the head axis: a statistic over all heads cannot lose a head exactly")
        keep = int_attr(node, "keepdims", 1)
        axis = first.axis if keep else first.axis - sum(a < first.axis for a in axes)
        self._mark(node.outputs[0], _Axis(axis, first.space, first.sources))

    def _elementwise(self, node: ir.Node, traced: list[int]) -> None:
        out_rank = _rank(node.outputs[0])
        if out_rank is None:
            raise _Blocked("output has no shape")
        aligned, spaces, sources = set(), set(), frozenset()
        for i in traced:
            info = self.heads[node.inputs[i]]
            aligned.add(out_rank - _rank(node.inputs[i]) + info.axis)
            spaces.add(info.space)
            sources |= info.sources
        if len(aligned) != 1 or len(spaces) != 1:
            raise _Blocked("operands carry heads on different axes or from different head spaces")
        out_axis, space = aligned.pop(), spaces.pop()
        for i, value in enumerate(node.inputs):
            if i in traced or value is None:
                continue
            if not self._per_head_constant(node, i, out_rank, out_axis, space):
                self._broadcasts(value, out_rank, out_axis)
        self._mark(node.outputs[0], _Axis(out_axis, space, sources))

    def _per_head_constant(self, node: ir.Node, index: int, out_rank: int, out_axis: int, space: str) -> bool:
        """An operand without heads of its own but one entry per head on the head axis: per-head slopes,
        temperatures, biases, or a computed per-head tensor such as MPT's ALiBi bias sliced to the sequence
        length. Elementwise broadcasting makes head ``h`` of the output read only entry ``h``, whatever
        computed the operand, so the rewrite takes the kept heads' entries: a constant is sliced, a computed
        operand gets a Gather of the kept heads in front of this node."""
        value = node.inputs[index]
        array = const_array(value)
        rank = array.ndim if array is not None else _rank(value)
        if rank is None or self.width[space] == 1:
            return False
        local = out_axis - (out_rank - rank)
        if local < 0:
            return False
        width = array.shape[local] if array is not None else static_dim(value.shape[local])
        if width != self.width[space]:
            return False
        self.block.head_constants.append((node, index, local, space))
        return True

    @staticmethod
    def _broadcasts(value: ir.Value, out_rank: int, out_axis: int) -> None:
        rank = _rank(value)
        if rank is None:
            raise _Blocked(f"'{value.name}' has no shape")
        local = out_axis - (out_rank - rank)
        if local >= 0 and static_dim(value.shape[local]) != 1:
            raise _Blocked(f"'{value.name}' does not broadcast over the head axis")

    def _matmul(self, node: ir.Node, traced: list[int]) -> None:
        out_rank = _rank(node.outputs[0])
        if out_rank is None:
            raise _Blocked("output has no shape")
        placed = {}
        for i in traced:
            value, info = node.inputs[i], self.heads[node.inputs[i]]
            rank = _rank(value)
            if info.axis >= rank - 2:
                raise _Blocked("the head axis is a matrix axis of the MatMul")
            placed[i] = (out_rank - rank + info.axis, info)
        if len(traced) == 1:
            (i,) = traced
            out_axis, info = placed[i]
            self._broadcasts(node.inputs[1 - i], out_rank, out_axis)
            self._mark(node.outputs[0], _Axis(out_axis, info.space, info.sources))
            return
        (a0, i0), (a1, i1) = placed[0], placed[1]
        if a0 != a1:
            raise _Blocked("operands carry heads on different axes")
        self._check_roles(node, i0.sources, i1.sources)
        if i0.space == i1.space:
            self._mark(node.outputs[0], _Axis(a0, i0.space, i0.sources | i1.sources))
            return
        kv_index = 0 if i0.space == "kv" else 1
        self.block.joins.append(Join(node, kv_index, self.heads[node.inputs[kv_index]].axis))
        self._mark(node.outputs[0], _Axis(a0, "q", i0.sources | i1.sources))

    @staticmethod
    def _check_roles(node: ir.Node, left: frozenset, right: frozenset) -> None:
        if left == frozenset("q") and right == frozenset("k"):
            return  # scores
        if left == frozenset("qk") and right == frozenset("v"):
            return  # weighted sum of values
        raise _Blocked(f"MatMul of {''.join(sorted(left))} by {''.join(sorted(right))} is not q·kᵀ or p·v")

    def _slice(self, node: ir.Node, traced: list[int], first: _Axis) -> None:
        if traced != [0]:
            raise _Blocked("slice bounds depend on heads")
        rank = _rank(node.inputs[0])
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = const_array(node.inputs[3])
            if axes is None:
                raise _Blocked("Slice axes are not constant")
            axes = [int(a) % rank for a in axes.reshape(-1)]
        else:
            starts = const_array(node.inputs[1])
            axes = list(range(len(starts.reshape(-1)))) if starts is not None else None
        if axes is None or first.axis in axes:
            raise _Blocked("slices the head axis")
        self._mark(node.outputs[0], first)

    def _concat(self, node: ir.Node, first: _Axis) -> None:
        rank = _rank(node.outputs[0])
        axis = int_attr(node, "axis", 0) % rank
        if axis == first.axis:
            raise _Blocked("concatenates along the head axis")
        for value in node.inputs:
            if value in self.heads:
                info = self.heads[value]
                if info.axis != first.axis or info.space != first.space:
                    raise _Blocked("inputs carry heads differently")
                continue
            if value.is_graph_input() and first.space == "kv" and _rank(value) == rank:
                role = "k" if first.sources == frozenset("k") else "v" if first.sources == frozenset("v") else ""
                if not role or role in self.block.cache_inputs:
                    raise _Blocked(f"cache input '{value.name}' cannot be attributed to K or V")
                self._mark(value, _Axis(first.axis, "kv", first.sources))
                self.block.cache_inputs[role] = value
                continue
            raise _Blocked(f"'{value.name}' joins the head tensor without heads of its own")
        self._mark(node.outputs[0], first)

    def _unsqueeze(self, node: ir.Node, first: _Axis) -> None:
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            raise _Blocked("Unsqueeze axes are not constant")
        out_rank = _rank(node.outputs[0])
        axes = sorted(int(a) % out_rank for a in axes.reshape(-1))
        if axes == [first.axis + 1] and first.space == "kv" and self._repeat(node, first):
            return
        positions = [p for p in range(out_rank) if p not in axes]
        self._mark(node.outputs[0], _Axis(positions[first.axis], first.space, first.sources))

    def _repeat(self, unsqueeze: ir.Node, first: _Axis) -> bool:
        """Matches the GQA repeat; returns False if this Unsqueeze is something else."""
        uses = list(unsqueeze.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != "Expand" or uses[0].idx != 0:
            return False
        expand = uses[0].node
        uses = list(expand.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
            return False
        reshape = uses[0].node
        a = first.axis
        target = shape_entries(expand.inputs[1])
        out = reshape.outputs[0]
        if target is None or len(target) != _rank(unsqueeze.outputs[0]):
            raise _Blocked(f"{expand.name}: GQA repeat target is not readable")
        kv, rep = target[a], target[a + 1]
        if kv not in (self.block.num_kv_heads, -1, 1) or rep is None or rep < 1:
            raise _Blocked(f"{expand.name}: GQA repeat target {target} does not carry the kv heads / group size")
        if rep * self.block.num_kv_heads != self.block.num_heads:
            raise _Blocked(f"{expand.name}: repeat {rep} × {self.block.num_kv_heads} kv heads ≠ {self.block.num_heads}")
        entries = shape_entries(reshape.inputs[1])
        if entries is None or _rank(out) != _rank(unsqueeze.inputs[0]) or entries[a] not in (self.block.num_heads, -1):
            raise _Blocked(f"{reshape.name}: GQA merge target is not [.., heads, ..]")
        if _rank(out) is None or static_dim(out.shape[a]) != self.block.num_heads:
            raise _Blocked(f"{reshape.name}: GQA merge output does not have {self.block.num_heads} heads")
        self.handled.update((expand, reshape))
        self.shape_targets.update((expand, reshape))
        self.block.repeats.append(Repeat(unsqueeze, expand, reshape, a, rep))
        self._mark(out, _Axis(a, "q", first.sources))
        return True

    def _gather(self, node: ir.Node, traced: list[int], first: _Axis) -> None:
        """A Gather over the kv-head axis with constant indices is an explicit query → kv map."""
        indices = const_array(node.inputs[1])
        axis = int_attr(node, "axis", 0) % _rank(node.inputs[0])
        if traced != [0] or indices is None or indices.ndim != 1:
            raise _Blocked("Gather with run-time indices")
        if axis != first.axis:
            raise _Blocked("Gather along a non-head axis of a head tensor")
        if first.space != "kv" or len(indices) != self.block.num_heads:
            raise _Blocked("Gather over heads that is not a query → kv map")
        mapping = [int(i) % self.block.num_kv_heads for i in indices]
        self.block.gathers.append(HeadGather(node, axis, mapping))
        self._mark(node.outputs[0], _Axis(axis, "q", first.sources))

    def _reshape(self, node: ir.Node, traced: list[int], first: _Axis) -> None:
        if traced != [0]:
            raise _Blocked("the reshape target depends on head tensors")
        data, out = node.inputs[0], node.outputs[0]
        rank, out_rank = _rank(data), _rank(out)
        entries = shape_entries(node.inputs[1])
        # (1) merge (heads, head_dim) before the output projection
        if first.space == "q" and out_rank is not None and 2 <= out_rank < rank and first.axis == rank - 2 and entries:
            return self._merge(node, first, entries)
        # (2) the exporter's transpose trick: [b, h, s, d] -> [-1, s, d] (batch and heads folded into axis 0)
        pieces = self._concat_pieces(node.inputs[1])
        if out_rank == 3 and rank == 4 and first.axis < rank - 2 and pieces is not None and len(pieces) == 3:
            lead = const_array(pieces[0])
            tail = [_shape_slice_of(p) for p in pieces[1:]]
            if (
                lead is not None
                and lead.reshape(-1).tolist() == [-1]
                and all(t is not None and t[0] is data for t in tail)
                and [(t[1], t[2]) for t in tail] in ([(-2, -1), (-1, _INT64_MAX)], [(2, 3), (3, 4)])
            ):
                self.shape_targets.add(node)
                self._mark(out, _Axis(0, first.space, first.sources, merged_from=data))
                return
        # (3) a Reshape that keeps every axis (the exporter's ``view`` after p·v): the head axis stays put
        if self._keeps_axes(data, out, entries, first):
            if entries[first.axis] != -1:
                self.block.head_reshapes.append((node, first.axis, first.space))
            self.shape_targets.add(node)
            self._mark(out, first)
            return
        if out_rank == rank - 1 and first.axis < rank - 2:
            raise _Blocked(
                "folds the head axis into the batch axis with a target other than the exporter's"
                " [-1, seq, head_dim] from Shape (e.g. BLOOM's baddbmm layout, where ALiBi is added per folded"
                " row): that layout is not followed yet, so this block's heads stay"
            )
        raise _Blocked("a Reshape of a head tensor that is neither the head merge nor a recognised transpose")

    def _keeps_axes(self, data: ir.Value, out: ir.Value, entries: list | None, first: _Axis) -> bool:
        """Whether ``Reshape(data) -> out`` is the identity on every axis, its head entry ``-1`` or the head
        count (which the rewrite then changes)."""
        rank = _rank(data)
        if entries is None or rank is None or _rank(out) != rank or len(entries) != rank:
            return False
        if entries[first.axis] not in (-1, self.width[first.space]):
            return False
        return all(same_dim(data.shape[i], out.shape[i]) for i in range(rank))

    def _visit_merged(self, node: ir.Node, first: _Axis) -> None:
        """Batch and heads folded into axis 0: only a Transpose keeping axis 0, then the restoring Reshape."""
        if node.op_type == "Transpose":
            perm = list(ints_attr(node, "perm", []))
            if not perm or perm[0] != 0:
                raise _Blocked("moves the folded batch×heads axis")
            self._mark(node.outputs[0], first)
            return
        if node.op_type == "Reshape" and node.inputs[0] in self.heads:
            origin = first.merged_from
            pieces = self._concat_pieces(node.inputs[1])
            lead = _shape_slice_of(pieces[0]) if pieces else None
            restores = lead is not None and lead[0] is origin and lead[1] in (0, _INT64_MIN) and lead[2] in (-2, 2)
            if restores and _rank(node.outputs[0]) == _rank(origin):
                info = self.heads[origin]
                self.shape_targets.add(node)
                self._mark(node.outputs[0], _Axis(info.axis, info.space, info.sources))
                return
        raise _Blocked("reads the folded batch×heads axis")

    @staticmethod
    def _concat_pieces(target: ir.Value) -> list[ir.Value] | None:
        producer = target.producer()
        if producer is None or producer.op_type != "Concat":
            return None
        return list(producer.inputs)

    def _merge(self, node: ir.Node, first: _Axis, entries: list) -> None:
        """The Reshape that merges (heads, head_dim) into the last axis before the output projection.

        Either the leading axes stay as they are (``[b, s, H, d] -> [b, s, H*d or -1]``) or the last entry
        is the constant ``H*d``, which makes each output row one (leading index)'s full (H, d) block in
        row-major order whatever the leading entries are (``[b, s, H, d] -> [-1, H*d]`` before a Gemm).
        """
        data, out = node.inputs[0], node.outputs[0]
        block = self.block
        rank, out_rank = _rank(data), _rank(out)
        if first.sources != frozenset("qkv"):
            raise _Blocked("the merged heads are not the attention output (q, k and v)")
        width = block.num_heads * block.head_dim
        same_leading = out_rank == rank - 1 and all(same_dim(data.shape[i], out.shape[i]) for i in range(rank - 2))
        if static_dim(out.shape[-1]) != width or not (entries[-1] == width or (same_leading and entries[-1] == -1)):
            raise _Blocked(f"the head merge target {entries} is not [.., heads × head_dim]")
        uses = list(out.uses())
        if len(uses) != 1 or uses[0].idx != 0 or out.is_graph_output():
            raise _Blocked("the merged heads feed something other than one output projection")
        matmul = uses[0].node
        transposed = False
        if matmul.op_type == "Gemm" and out_rank == 2:
            found = gemm_weight(matmul)
            if found is None:
                raise _Blocked(f"{matmul.name}: Gemm with alpha/beta/transA, or a non-constant weight")
            weight, transposed = found
        elif matmul.op_type == "MatMul":
            weight = matmul.inputs[1]
        else:
            raise _Blocked(f"{matmul.name}: the output projection is a {matmul.op_type}, not MatMul or Gemm")
        projection = Projection("o", matmul, weight, width=width, transposed=transposed)
        array = const_array(weight)
        if array is None or array.ndim != 2 or projection.weight_array().shape[0] != width:
            raise _Blocked(f"{matmul.name}: the output projection weight is not a constant [{width}, out] matrix")
        if block.merge is not None:
            raise _Blocked("two head merges")
        block.merge, block.merge_entry = node, len(entries) - 1
        block.projections["o"] = projection
        self.handled.add(node)

    def _check_shape_readers(self) -> None:
        """Every run-time read of a head count must end in a target this proof understood.

        ``Shape(x)`` of a head tensor is followed entry by entry: reading the sequence length of a KV cache
        (``Gather(Shape(past), 2)``) does not depend on the head count and ends the search; an entry that
        does must reach a Reshape/Expand target that the proof matched.
        """
        for value, info in list(self.heads.items()):
            for use in value.uses():
                if use.node.op_type != "Shape":
                    continue
                if info.merged_from is not None:
                    raise _Blocked(f"{use.node.name}: reads the shape of a folded batch×heads tensor")
                rank = _rank(value)
                start = int_attr(use.node, "start", 0)
                end = int_attr(use.node, "end", rank)
                picked = list(range(rank))[slice(start, end)]
                dependent = {i for i, p in enumerate(picked) if p == info.axis}
                frontier = [(use.node.outputs[0], dependent)] if dependent else []
                while frontier:
                    current, dependent = frontier.pop()
                    for reader in current.uses():
                        outputs = self._shape_flow(reader.node, reader.idx, current, dependent)
                        frontier.extend((out, dep) for out, dep in outputs if dep)

    def _shape_flow(self, node: ir.Node, index: int, value: ir.Value, dependent: set[int]):
        """Which entries of ``node``'s outputs depend on the head count, given those of input ``index``."""
        op = node.op_type
        if op in ("Reshape", "Expand") and index == 1:
            if node not in self.shape_targets:
                raise _Blocked(f"{node.name}: reads a head count for a target this proof did not match")
            return []
        length = static_dim(value.shape[0]) if value.shape is not None and len(value.shape) == 1 else None
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze") and index == 0:
            return [(node.outputs[0], dependent)]
        if op == "Slice" and index == 0 and length is not None:
            bounds = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
            if (
                bounds[0] is not None
                and bounds[1] is not None
                and all(b is None or b.reshape(-1).tolist() in ([0], [1]) for b in bounds[2:3])
            ):
                step = 1 if len(bounds) < 4 or bounds[3] is None else int(bounds[3].reshape(-1)[0])
                picked = list(range(length))[slice(int(bounds[0][0]), int(bounds[1][0]), step)]
                return [(node.outputs[0], {i for i, p in enumerate(picked) if p in dependent})]
        if op == "Gather" and index == 0 and length is not None:
            indices = const_array(node.inputs[1])
            if indices is not None:
                picked = [int(i) % length for i in indices.reshape(-1)]
                return [(node.outputs[0], {i for i, p in enumerate(picked) if p in dependent})]
        if op == "Concat" and length is not None:
            offset = 0
            for piece in node.inputs[:index]:
                size = static_dim(piece.shape[0]) if piece.shape is not None and len(piece.shape) == 1 else None
                if size is None:
                    raise _Blocked(f"{node.name}: shape piece of unknown length")
                offset += size
            return [(node.outputs[0], {offset + i for i in dependent})]
        raise _Blocked(f"{node.name} ({op}) computes with a head count read at run time")


def trace_heads(model: ir.Model, block: AttentionBlock) -> None:
    """Proves ``block``'s head structure and fills in its maps, merge, caches and head tensors.

    Raises:
        HeadAxisBlocked: An op the proof cannot follow; the message names it and says why.
    """
    _Tracer(model, block).run()
