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

Where the parts live: the data model in ``attention_types``, the projection finder in ``projections``,
the head-axis proof in ``head_axis``; this module runs them per block and finds the zero heads.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.attention_types import (
    AttentionAnalysis,
    AttentionBlock,
    HeadGather,
    HeadTensor,
    Join,
    Projection,
    Repeat,
    SplitReshape,
)
from prune2deploy.analysis.head_axis import HeadAxisBlocked, trace_heads
from prune2deploy.analysis.projections import projection_behind, role_of, split_reshape
from prune2deploy.graph.dims import rank as _rank
from prune2deploy.graph.dims import shape_entries
from prune2deploy.graph.scopes import layer_of, module_of

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

#: Ops between a V split and the value MatMul that keep zeros zero (for the zero-V criterion).
_ZERO_PRESERVING = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Gather"}


def _block_key(node: ir.Node) -> str:
    return module_of(node) or layer_of(node) or "<graph>"


def analyze_attention(model: ir.Model) -> AttentionAnalysis:
    """Finds and proves every attention block of ``model`` (which must carry value shapes)."""
    candidates: dict[str, AttentionBlock] = {}
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        found = split_reshape(node)
        if found is None:
            continue
        projection, why = projection_behind(node.inputs[0])
        key = _block_key(node)
        block = candidates.setdefault(key, AttentionBlock(name=key, layer=layer_of(node)))
        if projection is None:
            block.reasons.append(f"{node.name} splits heads but {why}")
            continue
        role = role_of(projection.module)
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
