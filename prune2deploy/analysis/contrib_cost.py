"""FLOPs of ONNX Runtime's fused (``com.microsoft``) ops: what the unfused subgraph they replace computes.

``fuse-ort`` rewrites a norm, a rotary embedding or an attention block into one contrib op. Costed as an
unknown op (bytes only, 0 FLOPs) a fused model looks cheaper than the same model unfused, and a compiled
model fused after pruning would be credited with a "pruning" speedup that fusion gave. Each rule here
counts, with :mod:`prune2deploy.analysis.cost`'s conventions (one FLOP per multiply or add), the
arithmetic of the subgraph the exporter writes and the fusion replaces, so that the FLOPs of a fused
model equal the unfused one's (tested on a tiny Llama: within 0.1%):

- ``RotaryEmbedding``: ``x·cos + rotate_half(x)·sin`` = 3.5 FLOPs per rotated element (two Mul, one Add,
  a Neg on half of them); the Slice/Concat of ``rotate_half`` move data only. Pointwise kind.
- ``MultiHeadAttention`` / ``GroupQueryAttention`` / ``Attention``: ``2·B·H·S·T·d`` for QKᵀ and as much for
  the weighted sum, 8 per score (mask add, softmax's 5, the exporter's NaN guard: IsNaN and Where), and one
  per element of the scaled Q and K (the exporter scales both by d^-¼). ``Attention`` adds its QKV
  projection (``2·B·S·hidden·3·hidden``).
- ``FusedMatMul``: a MatMul with transposed operands (``2·prod(Y)·K``); GEMM kind.
- ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization`` / ``SimplifiedLayerNormalization``
  are standard normalizations in the cost table (the skip variants count the residual Add: 5 and 9 per
  element); ``BiasGelu`` counts its bias Add (2 per element), ``FastGelu`` 1 (+1 with a bias).

Bytes are the fused node's own inputs, weights and outputs: the traffic at the subgraph's boundary, which
is what the cost model's engine profiles price for the fused kernel (the intermediates stay on chip).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir

__all__ = ["CONTRIB_FLOPS", "CONTRIB_KINDS", "FUSED_OP_TYPES", "contrib_flops", "fused_op_counts"]

Shape = tuple[int, ...]
ShapeOf = Callable[[ir.Value | None], Shape | None]

#: The cost kind of contrib ops whose kind the op-type tables do not give (see ``cost._kind``).
CONTRIB_KINDS: dict[str, str] = {"RotaryEmbedding": "elementwise", "FusedMatMul": "matmul"}

#: Op types fuse-ort writes in place of standard subgraphs (norms, rotary, attention, GELU, transposed MatMul).
FUSED_OP_TYPES = frozenset(
    {
        "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
        "RotaryEmbedding", "MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedAttention",
        "FusedMatMul", "BiasGelu", "FastGelu", "QuickGelu", "GemmFastGelu",
    }
)  # fmt: skip

#: Per attention score: the mask Add, Softmax's 5, and the exporter's NaN guard (IsNaN, Where).
_PER_SCORE = 8


def fused_op_counts(model: ir.Model) -> dict[str, int]:
    """How many of each fused op type the graph holds (com.microsoft ops, and the ORT-only standard-domain
    SimplifiedLayerNormalization that fuse-ort writes); empty for an unfused graph."""
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in FUSED_OP_TYPES and (node.domain == "com.microsoft" or node.op_type.startswith("Simplified")):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def _rotary(node: ir.Node, shape_of: ShapeOf, out: Shape) -> int | None:
    elements = math.prod(out)
    rotary_dim = _attr(node, "rotary_embedding_dim")
    heads = _attr(node, "num_heads")
    head_size = out[-1] if len(out) == 4 else (out[-1] // heads if heads else 0)
    if rotary_dim and head_size:  # partial rotary: the rest of each head passes through
        elements = elements * rotary_dim // head_size
    return math.ceil(3.5 * elements)


def _attention_dims(node: ir.Node, shape_of: ShapeOf) -> tuple[int, int, int, int, int] | None:
    """(batch, heads, query length, key length, head size) of a fused attention, or None."""
    query = shape_of(node.inputs[0]) if node.inputs else None
    heads = _attr(node, "num_heads")
    if query is None or not heads:
        return None
    if len(query) == 4:  # BNSH
        batch, heads, seq, head = query
    elif node.op_type == "GroupQueryAttention" and len(node.inputs) > 1 and node.inputs[1] is None:
        batch, seq = query[:2]  # packed QKV: (H + 2·Hkv)·d
        kv_heads = _attr(node, "kv_num_heads") or heads
        head = query[2] // (heads + 2 * kv_heads)
    else:
        batch, seq = query[:2]
        head = query[2] // heads
    key = shape_of(node.inputs[1]) if len(node.inputs) > 1 else None
    total = seq if key is None or len(key) < 3 else (key[-2] if len(key) == 4 else key[1])  # BNSH or BSD keys
    if node.op_type == "GroupQueryAttention" and len(node.inputs) > 3:
        past = shape_of(node.inputs[3])
        if past is not None and len(past) == 4:
            total = past[2] + seq
    return batch, heads, seq, total, head


def _attention(node: ir.Node, shape_of: ShapeOf, out: Shape) -> int | None:
    dims = _attention_dims(node, shape_of)
    if node.op_type == "Attention":  # [B, S, hidden] with the packed QKV weight
        x, w = (shape_of(node.inputs[i]) if len(node.inputs) > i else None for i in (0, 1))
        heads = _attr(node, "num_heads")
        if x is None or w is None or not heads:
            return None
        batch, seq, hidden = x
        head = w[1] // 3 // heads
        projection = 2 * batch * seq * hidden * w[1]
        dims = batch, heads, seq, seq, head
    else:
        projection = 0
    if dims is None:
        return None
    batch, heads, seq, total, head = dims
    scores = batch * heads * seq * total
    scaling = batch * heads * (seq + total) * head
    return projection + 4 * scores * head + _PER_SCORE * scores + scaling


def _fused_matmul(node: ir.Node, shape_of: ShapeOf, out: Shape) -> int | None:
    a = shape_of(node.inputs[0])
    if a is None:
        return None
    k = a[-2] if _attr(node, "transA") else a[-1]
    return 2 * math.prod(out) * k


def _gelu(node: ir.Node, shape_of: ShapeOf, out: Shape) -> int | None:
    has_bias = node.op_type == "BiasGelu" or (len(node.inputs) > 1 and node.inputs[1] is not None)
    return math.prod(out) * (2 if has_bias else 1)


_RULES: dict[str, Callable[[ir.Node, ShapeOf, Shape], int | None]] = {
    "RotaryEmbedding": _rotary,
    "MultiHeadAttention": _attention,
    "GroupQueryAttention": _attention,
    "Attention": _attention,
    "FusedMatMul": _fused_matmul,
    "BiasGelu": _gelu,
    "FastGelu": _gelu,
}

#: The contrib op types with a FLOP rule here.
CONTRIB_FLOPS = frozenset(_RULES)


def contrib_flops(node: ir.Node, shape_of: ShapeOf, out_shape: Shape | None) -> int | None:
    """FLOPs of a com.microsoft op with a rule here; ``None`` for other ops or when a shape is unknown.

    Call only for ``node.domain == "com.microsoft"`` (an op type of the standard domain is costed as such).
    """
    rule = _RULES.get(node.op_type)
    return None if rule is None or out_shape is None else rule(node, shape_of, out_shape)
