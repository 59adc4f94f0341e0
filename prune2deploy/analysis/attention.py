"""Attention blocks: where the heads are, how query heads read key/value heads, and which heads are zero.

The exporter leaves no "attention" op: a block is a q/k/v projection (MatMul against a constant with an
optional bias Add, or a GPT-2 style Gemm between flatten/unflatten Reshapes; optionally one fused projection
and a Split), a Reshape that splits the last axis into (heads, head_dim), per-head work (RoPE, scores,
softmax, the weighted sum of V), a Reshape that merges (heads, head_dim) back and the output projection.
This module finds the projections by module name scope and then *proves* the
head structure by following the head axis forward from the three split Reshapes through every op that
reads it. Each op either maps the axis (Transpose, elementwise ops whose other operands broadcast over
heads, batched MatMul, Slice/Concat/Split on other axes, the GQA repeat, the exporter's merge-batch-and-
heads transpose trick) or blocks the block with the op and the reason. A block that is not proven is
reported as unsupported and left alone: the passes built on this never guess.

Two head spaces exist per block: query heads (H) and key/value heads (K). They meet at a GQA repeat
(``Unsqueeze → Expand → Reshape``: query head ``h`` reads kv head ``h // (H / K)``), at a ``Gather`` over
the kv-head axis (an explicit map, what the head passes write for uneven groups) or, for MHA, directly at
the score and value MatMuls (identity map). Those meeting points are where a pass rewrites the
q-head → kv-head map; K and V must be mapped the same way.

When is a head's contribution zero? The block's output is ``Σ_h O_h · (P_h · V_{map(h)})`` where ``O_h``
are the output projection's rows of head ``h`` and ``P_h`` is the head's attention matrix. The term is
zero for every input when ``O_h = 0``, or when ``V_{map(h)} = 0`` (value weight columns *and* value bias
of that kv head are zero, and no past cache feeds V: a cache is a graph input, never provably zero).
Zero *query* (or key) columns do **not** remove a head: the scores become 0, softmax turns them into a
uniform average over the visible positions, and the head still outputs ``mean(V)``. A kv head can go
when every query head reading it is gone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.scopes import layer_of, module_of

__all__ = [
    "AttentionAnalysis",
    "AttentionBlock",
    "HeadGather",
    "HeadTensor",
    "Join",
    "Projection",
    "Repeat",
    "SplitReshape",
    "analyze_attention",
    "shape_entries",
]

log = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min

#: Module-name suffixes of the projections (Llama/Qwen/Mistral, BERT, GPT-NeoX/Phi/GPT-2 style fused).
_ROLE_PATTERNS = {
    "q": re.compile(r"(?:^|\.)(?:q_proj|query|q|wq|to_q|q_lin)$"),
    "k": re.compile(r"(?:^|\.)(?:k_proj|key|k|wk|to_k|k_lin)$"),
    "v": re.compile(r"(?:^|\.)(?:v_proj|value|v|wv|to_v|v_lin)$"),
    "qkv": re.compile(r"(?:^|\.)(?:qkv_proj|qkv|c_attn|query_key_value|Wqkv|in_proj)$"),
}

_UNARY = {
    "Neg", "Sqrt", "Exp", "Log", "Cast", "IsNaN", "IsInf", "Relu", "Tanh", "Sigmoid", "Erf", "Reciprocal",
    "Identity", "Abs", "Not", "Sin", "Cos", "Softplus", "Gelu", "Dropout",
}  # fmt: skip
_NARY = {
    "Add", "Sub", "Mul", "Div", "Where", "Pow", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "And", "Or", "Xor",
}  # fmt: skip
_SHAPE_ARITHMETIC = {"Slice", "Gather", "Concat", "Squeeze", "Unsqueeze", "Cast", "Identity"}
#: Ops between a V split and the value MatMul that keep zeros zero (for the zero-V criterion).
_ZERO_PRESERVING = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Gather"}


# -- small helpers ------------------------------------------------------------------------------------------


def _static(dim) -> int | None:
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    return value if isinstance(value, int) else None


def _same_dim(a, b) -> bool:
    sa, sb = _static(a), _static(b)
    if sa is not None or sb is not None:
        return sa == sb
    na, nb = getattr(a, "value", None), getattr(b, "value", None)
    return na is not None and na == nb


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _ints_attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def shape_entries(value: ir.Value | None) -> list[int | None] | None:
    """Entries of a shape vector: constants where known, ``None`` where computed at run time.

    Reads a constant or a ``Concat`` of pieces with static lengths (how the exporter builds
    ``[batch, seq, -1, head_dim]``). ``None`` when even the length is unknown.
    """
    array = _const(value)
    if array is not None:
        return [int(x) for x in array.reshape(-1)]
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for piece in producer.inputs:
        piece_array = _const(piece)
        if piece_array is not None:
            entries += [int(x) for x in piece_array.reshape(-1)]
            continue
        if piece is None or piece.shape is None or len(piece.shape) != 1 or _static(piece.shape[0]) is None:
            return None
        entries += [None] * _static(piece.shape[0])
    return entries


def _shape_slice_of(value: ir.Value | None) -> tuple[ir.Value, int, int] | None:
    """``(x, start, end)`` when ``value`` is ``Slice(Shape(x), start, end)`` (axis 0, step 1)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Slice":
        return None
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape":
        return None
    if _ints_attr(shape_node, "start", 0) != 0 or _ints_attr(shape_node, "end", None) is not None:
        return None
    starts, ends = _const(node.inputs[1]), _const(node.inputs[2])
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.zeros(1)
    steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if starts.size != 1 or ends.size != 1 or int(axes.reshape(-1)[0]) != 0 or int(steps.reshape(-1)[0]) != 1:
        return None
    return shape_node.inputs[0], int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


# -- what the analysis reports ------------------------------------------------------------------------------


@dataclass
class Projection:
    """A MatMul against a constant weight (and an optional bias Add) that makes or reads one head space.

    For fused QKV, ``offset``/``width`` select this role's columns of the shared weight and ``split`` is
    the Split node that separates the roles.
    """

    role: str  # "q" | "k" | "v" | "o"
    matmul: ir.Node
    weight: ir.Value  # [in, out] for q/k/v (columns are heads), [H*d, out] for o (rows are heads)
    bias_add: ir.Node | None = None
    bias: ir.Value | None = None
    offset: int = 0
    width: int = 0
    split: ir.Node | None = None
    split_index: int = 0
    transposed: bool = False  # Gemm transB=1: the weight is stored [out, in]
    unflatten: ir.Node | None = None  # Gemm's [N, out] -> [.., out] Reshape (its target carries the width)

    @property
    def module(self) -> str:
        return module_of(self.matmul)

    def weight_array(self) -> np.ndarray:
        """The weight as ``[in, out]`` whatever its storage."""
        array = _const(self.weight)
        return array.T if self.transposed else array

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else _const(self.bias)


@dataclass
class SplitReshape:
    """The Reshape ``[.., n*d] → [.., n, d]`` of one role, and where its target carries ``n``."""

    role: str
    node: ir.Node
    head_entry: int  # index of the head count in the target shape (its value may be -1)


@dataclass
class Repeat:
    """GQA repeat ``Unsqueeze(x, [a+1]) → Expand([.., K, r, ..]) → Reshape([.., K*r, ..])`` of K or V."""

    unsqueeze: ir.Node
    expand: ir.Node
    reshape: ir.Node
    axis: int  # head axis of the repeated (kv-space) input
    n_rep: int


@dataclass
class HeadGather:
    """``Gather(kv, indices, axis=a)``: query head ``i`` reads kv head ``indices[i]`` (uneven groups)."""

    node: ir.Node
    axis: int
    indices: list[int]


@dataclass
class Join:
    """An MHA meeting point: a MatMul whose input ``index`` is in kv-head space, the other in q space."""

    node: ir.Node
    index: int
    axis: int


@dataclass
class HeadTensor:
    """A value that carries a head axis (its static width changes with the head count)."""

    value: ir.Value
    axis: int
    space: str  # "q" | "kv"
    merged: bool = False  # head axis folded into axis 0 (no static width to update)


@dataclass
class AttentionBlock:
    """One attention block, proven or not; ``reasons`` says why an unsupported block is left alone."""

    name: str
    layer: str
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    projections: dict[str, Projection] = field(default_factory=dict)
    splits: dict[str, SplitReshape] = field(default_factory=dict)
    repeats: list[Repeat] = field(default_factory=list)
    gathers: list[HeadGather] = field(default_factory=list)
    joins: list[Join] = field(default_factory=list)
    kv_map: list[int] = field(default_factory=list)  # query head -> kv head it reads
    merge: ir.Node | None = None
    merge_entry: int = -1
    tensors: list[HeadTensor] = field(default_factory=list)
    cache_inputs: dict[str, ir.Value] = field(default_factory=dict)  # "k"/"v" -> past graph input
    cache_outputs: dict[str, ir.Value] = field(default_factory=dict)  # "k"/"v" -> present graph output
    reasons: list[str] = field(default_factory=list)
    zero_heads: dict[int, str] = field(default_factory=dict)  # query head -> why its contribution is zero
    v_zero_blocked: str = ""

    @property
    def supported(self) -> bool:
        return not self.reasons

    def kv_of(self, head: int) -> int:
        """The kv head that query head ``head`` reads."""
        return self.kv_map[head]

    def summary(self) -> dict:
        """JSON-friendly description for ``inspect`` and reports."""
        return {
            "block": self.name,
            "layer": self.layer,
            "supported": self.supported,
            "reasons": self.reasons,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "gqa": "repeat" if self.repeats else "gather" if self.gathers else "mha" if self.joins else "",
            "kv_map": self.kv_map,
            "fused_qkv": any(p.split is not None for p in self.projections.values()),
            "biases": sorted(r for r, p in self.projections.items() if p.bias is not None),
            "kv_cache": bool(self.cache_inputs),
            "zero_heads": {str(h): why for h, why in sorted(self.zero_heads.items())},
            "zero_v_criterion": self.v_zero_blocked or "used",
        }


@dataclass
class AttentionAnalysis:
    blocks: list[AttentionBlock]

    @property
    def supported(self) -> list[AttentionBlock]:
        return [b for b in self.blocks if b.supported]

    def summary(self) -> list[dict]:
        return [b.summary() for b in self.blocks]


# -- finding the projections --------------------------------------------------------------------------------


def _role_of(module: str) -> str | None:
    for role, pattern in _ROLE_PATTERNS.items():
        if pattern.search(module):
            return role
    return None


def _gemm_weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """``(weight, transposed)`` of a plain ``Gemm(x, W[, c])`` (alpha = beta = 1, no transA), else None."""
    alpha, beta = _ints_attr(node, "alpha", 1.0), _ints_attr(node, "beta", 1.0)
    if alpha != 1.0 or beta != 1.0 or _ints_attr(node, "transA", 0):
        return None
    weight = node.inputs[1]
    if _const(weight) is None or _rank(weight) != 2:
        return None
    return weight, bool(_ints_attr(node, "transB", 0))


def _single_reader(value: ir.Value) -> bool:
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _projection_behind(value: ir.Value) -> tuple[Projection | None, str]:
    """Walks back from a split Reshape's input to the projection.

    Recognised: ``MatMul(x, W) [+ b]`` and ``Reshape(Gemm(x2d, W[, b]), [.., out])`` (GPT-2 style), each
    optionally followed by a Split of fused q/k/v along the last axis.
    """
    node = value.producer()
    split, split_index = None, 0
    if node is not None and node.op_type == "Split":
        split, split_index = node, list(node.outputs).index(value)
        value = node.inputs[0]
        node = value.producer()
    unflatten = None
    if node is not None and node.op_type == "Reshape" and _rank(node.inputs[0]) == 2:
        entries, out = shape_entries(node.inputs[1]), node.outputs[0]
        width = _static(node.inputs[0].shape[-1])
        if entries is None or width is None or entries[-1] != width or _static(out.shape[-1]) != width:
            return None, f"{node.name}: the [N, out] -> [.., out] Reshape does not keep the last axis"
        if not _single_reader(node.inputs[0]):
            return None, f"{node.name}: the projection output has other readers"
        unflatten, value = node, node.inputs[0]
        node = value.producer()
    bias_add = bias = None
    transposed = False
    if node is not None and node.op_type == "Gemm" and unflatten is not None:
        found = _gemm_weight(node)
        if found is None:
            return None, f"{node.name}: Gemm with alpha/beta/transA, or a non-constant weight"
        weight, transposed = found
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias_add, bias = node, node.inputs[2]
            if _const(bias) is None or _rank(bias) != 1:
                return None, f"{node.name}: the Gemm bias is not a constant vector"
    else:
        if node is not None and node.op_type == "Add":
            consts = [i for i, v in enumerate(node.inputs) if _const(v) is not None]
            if len(consts) == 1 and _rank(node.inputs[consts[0]]) == 1:
                bias_add, bias = node, node.inputs[consts[0]]
                if not _single_reader(bias_add.outputs[0]):
                    return None, f"{bias_add.name}: the biased projection output has other readers"
                node = node.inputs[1 - consts[0]].producer()
        if node is None or node.op_type != "MatMul":
            return None, "the projection is not MatMul(x, constant weight) [+ bias] or Gemm"
        weight = node.inputs[1]
        if _const(weight) is None or _rank(weight) != 2:
            return None, f"{node.name}: the projection weight is not a constant matrix"
    # The projection output must feed only the head split (it changes width with the heads).
    if not _single_reader(node.outputs[0]):
        return None, f"{node.name}: the projection output has other readers"
    projection = Projection(
        role="", matmul=node, weight=weight, bias_add=bias_add, bias=bias, transposed=transposed, unflatten=unflatten
    )
    if split is not None:
        sizes = _split_sizes(split)
        if sizes is None:
            return None, f"{split.name}: Split sizes are not static"
        projection.split, projection.split_index = split, split_index
        projection.offset, projection.width = sum(sizes[:split_index]), sizes[split_index]
    else:
        projection.width = int(projection.weight_array().shape[1])
    return projection, ""


def _split_sizes(node: ir.Node) -> list[int] | None:
    axis = _ints_attr(node, "axis", 0)
    data = node.inputs[0]
    rank = _rank(data)
    if rank is None or axis % rank != rank - 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = _const(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    sizes = [_static(out.shape[-1]) if out.shape is not None else None for out in node.outputs]
    return None if any(s is None for s in sizes) else sizes


def _split_reshape(node: ir.Node) -> tuple[int, int, int] | None:
    """``(n, d, head_entry)`` when ``node`` reshapes ``[.., n*d]`` into ``[.., n, d]``, else ``None``."""
    data, target, out = node.inputs[0], node.inputs[1], node.outputs[0]
    r_in, r_out = _rank(data), _rank(out)
    if r_in is None or r_out != r_in + 1 or r_in < 2:
        return None
    n, d, width = _static(out.shape[-2]), _static(out.shape[-1]), _static(data.shape[-1])
    if n is None or d is None or width is None or n * d != width:
        return None
    if not all(_same_dim(data.shape[i], out.shape[i]) for i in range(r_in - 1)):
        return None
    entries = shape_entries(target)
    if entries is None or len(entries) != r_out or entries[-1] != d or entries[-2] not in (-1, n):
        return None
    return n, d, r_out - 2


# -- the head-axis proof ----------------------------------------------------------------------------------


class _Blocked(Exception):
    pass


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
            self._mark(split.node.outputs[0], _Axis(split.head_entry, space, frozenset(role)))
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
            if block.num_heads != block.num_kv_heads:
                raise _Blocked("query and kv heads meet without a repeat but their counts differ")
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
            width = _static(value.shape[info.axis])
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
            perm = list(_ints_attr(node, "perm", range(_rank(node.inputs[0]))[::-1]))
            self._mark(node.outputs[0], _Axis(perm.index(first.axis), first.space, first.sources))
        elif op in _UNARY or op in ("Softmax", "LogSoftmax"):
            if op in ("Softmax", "LogSoftmax"):
                rank = _rank(node.inputs[0])
                if _ints_attr(node, "axis", -1) % rank == first.axis:
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
            axis = _ints_attr(node, "axis", 0) % _rank(node.inputs[0])
            if traced != [0] or axis == first.axis:
                raise _Blocked("splits the head axis")
            for out in node.outputs:
                self._mark(out, first)
        elif op == "Unsqueeze":
            self._unsqueeze(node, first)
        elif op == "Squeeze":
            axes = _const(node.inputs[1]) if len(node.inputs) > 1 else None
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
        else:
            raise _Blocked("no head-axis rule for this op")

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
        out_axis = aligned.pop()
        for i, value in enumerate(node.inputs):
            if i in traced or value is None:
                continue
            self._broadcasts(value, out_rank, out_axis)
        self._mark(node.outputs[0], _Axis(out_axis, spaces.pop(), sources))

    @staticmethod
    def _broadcasts(value: ir.Value, out_rank: int, out_axis: int) -> None:
        rank = _rank(value)
        if rank is None:
            raise _Blocked(f"'{value.name}' has no shape")
        local = out_axis - (out_rank - rank)
        if local >= 0 and _static(value.shape[local]) != 1:
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
            axes = _const(node.inputs[3])
            if axes is None:
                raise _Blocked("Slice axes are not constant")
            axes = [int(a) % rank for a in axes.reshape(-1)]
        else:
            axes = list(range(len(_const(node.inputs[1]).reshape(-1)))) if _const(node.inputs[1]) is not None else None
        if axes is None or first.axis in axes:
            raise _Blocked("slices the head axis")
        self._mark(node.outputs[0], first)

    def _concat(self, node: ir.Node, first: _Axis) -> None:
        rank = _rank(node.outputs[0])
        axis = _ints_attr(node, "axis", 0) % rank
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
        axes = _const(node.inputs[1]) if len(node.inputs) > 1 else None
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
        if _rank(out) is None or _static(out.shape[a]) != self.block.num_heads:
            raise _Blocked(f"{reshape.name}: GQA merge output does not have {self.block.num_heads} heads")
        self.handled.update((expand, reshape))
        self.shape_targets.update((expand, reshape))
        self.block.repeats.append(Repeat(unsqueeze, expand, reshape, a, rep))
        self._mark(out, _Axis(a, "q", first.sources))
        return True

    def _gather(self, node: ir.Node, traced: list[int], first: _Axis) -> None:
        """A Gather over the kv-head axis with constant indices is an explicit query → kv map."""
        indices = _const(node.inputs[1])
        axis = _ints_attr(node, "axis", 0) % _rank(node.inputs[0])
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
            lead = _const(pieces[0])
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
        raise _Blocked("a Reshape of a head tensor that is neither the head merge nor a recognised transpose")

    def _visit_merged(self, node: ir.Node, first: _Axis) -> None:
        """Batch and heads folded into axis 0: only a Transpose keeping axis 0, then the restoring Reshape."""
        if node.op_type == "Transpose":
            perm = list(_ints_attr(node, "perm", []))
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
        same_leading = out_rank == rank - 1 and all(_same_dim(data.shape[i], out.shape[i]) for i in range(rank - 2))
        if _static(out.shape[-1]) != width or not (entries[-1] == width or (same_leading and entries[-1] == -1)):
            raise _Blocked(f"the head merge target {entries} is not [.., heads × head_dim]")
        uses = list(out.uses())
        if len(uses) != 1 or uses[0].idx != 0 or out.is_graph_output():
            raise _Blocked("the merged heads feed something other than one output projection")
        matmul = uses[0].node
        transposed = False
        if matmul.op_type == "Gemm" and out_rank == 2:
            found = _gemm_weight(matmul)
            if found is None:
                raise _Blocked(f"{matmul.name}: Gemm with alpha/beta/transA, or a non-constant weight")
            weight, transposed = found
        elif matmul.op_type == "MatMul":
            weight = matmul.inputs[1]
        else:
            raise _Blocked(f"{matmul.name}: the output projection is a {matmul.op_type}, not MatMul or Gemm")
        projection = Projection("o", matmul, weight, width=width, transposed=transposed)
        array = _const(weight)
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
                start = _ints_attr(use.node, "start", 0)
                end = _ints_attr(use.node, "end", rank)
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
        length = _static(value.shape[0]) if value.shape is not None and len(value.shape) == 1 else None
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze") and index == 0:
            return [(node.outputs[0], dependent)]
        if op == "Slice" and index == 0 and length is not None:
            bounds = [_const(v) if v is not None else None for v in node.inputs[1:5]]
            if (
                bounds[0] is not None
                and bounds[1] is not None
                and all(b is None or b.reshape(-1).tolist() in ([0], [1]) for b in bounds[2:3])
            ):
                step = 1 if len(bounds) < 4 or bounds[3] is None else int(bounds[3].reshape(-1)[0])
                picked = list(range(length))[slice(int(bounds[0][0]), int(bounds[1][0]), step)]
                return [(node.outputs[0], {i for i, p in enumerate(picked) if p in dependent})]
        if op == "Gather" and index == 0 and length is not None:
            indices = _const(node.inputs[1])
            if indices is not None:
                picked = [int(i) % length for i in indices.reshape(-1)]
                return [(node.outputs[0], {i for i, p in enumerate(picked) if p in dependent})]
        if op == "Concat" and length is not None:
            offset = 0
            for piece in node.inputs[:index]:
                size = _static(piece.shape[0]) if piece.shape is not None and len(piece.shape) == 1 else None
                if size is None:
                    raise _Blocked(f"{node.name}: shape piece of unknown length")
                offset += size
            return [(node.outputs[0], {offset + i for i in dependent})]
        raise _Blocked(f"{node.name} ({op}) computes with a head count read at run time")


# -- blocks -------------------------------------------------------------------------------------------------


def _block_key(node: ir.Node) -> str:
    return module_of(node) or layer_of(node) or "<graph>"


def analyze_attention(model: ir.Model) -> AttentionAnalysis:
    """Finds and proves every attention block of ``model`` (which must carry value shapes)."""
    candidates: dict[str, AttentionBlock] = {}
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        found = _split_reshape(node)
        if found is None:
            continue
        projection, why = _projection_behind(node.inputs[0])
        key = _block_key(node)
        block = candidates.setdefault(key, AttentionBlock(name=key, layer=layer_of(node)))
        if projection is None:
            block.reasons.append(f"{node.name} splits heads but {why}")
            continue
        role = _role_of(projection.module)
        if role == "qkv":
            role = (
                "qkv"[projection.split_index] if projection.split is not None and projection.split_index < 3 else None
            )
        if role is None:
            block.reasons.append(f"{node.name}: projection module '{projection.module}' is not q, k or v by name")
            continue
        if role in block.splits:
            block.reasons.append(
                f"two {role} projections ({block.projections[role].matmul.name}, {projection.matmul.name})"
            )
            continue
        n, d, entry = found
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
            block.reasons.append(f"no {'/'.join(missing)} projection found")
        elif block.splits["k"].node.outputs[0].shape[-2] != block.splits["v"].node.outputs[0].shape[-2]:
            block.reasons.append("key and value have different head counts")
        if block.supported:
            try:
                _Tracer(model, block).run()
            except _Blocked as exc:
                block.reasons.append(str(exc))
        if block.supported:
            _find_zero_heads(block)
        else:
            log.info("attention block %s not supported: %s", block.name, "; ".join(block.reasons))
        blocks.append(block)
    blocks += _unmatched_softmax(model, blocks)
    return AttentionAnalysis(blocks)


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
    weight = v.weight_array()[:, v.offset : v.offset + v.width].reshape(-1, block.num_kv_heads, d)
    zero = ~np.any(weight != 0, axis=(0, 2))
    bias = v.bias_array()
    if bias is not None:
        zero &= ~np.any(bias[v.offset : v.offset + v.width].reshape(block.num_kv_heads, d) != 0, axis=1)
    for h in range(heads):
        if zero[block.kv_of(h)] and h not in block.zero_heads:
            block.zero_heads[h] = "value heads are zero"


def _v_path_blocker(block: AttentionBlock) -> str:
    """Why zero V columns would not prove a zero head ('' when they do)."""
    if "v" in block.cache_inputs:
        return "V is concatenated with a past cache (a graph input, not provably zero)"
    values = [block.splits["v"].node.outputs[0]]
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
