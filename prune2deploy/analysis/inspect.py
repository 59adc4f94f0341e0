"""What ``prune2deploy inspect`` reports: channel groups, layers, attention heads, parameters, of one graph.

A graph fused for ONNX Runtime (fuse-ort's ``com.microsoft`` kernels: SkipSimplifiedLayerNormalization,
RotaryEmbedding, MultiHeadAttention …) hides what the analyses read: the residual Adds are inside the skip
norms, the query projection's head split inside the attention kernel, and a channel group stops at an op
with no axis rule. The result says so (``fused``) and marks the counts the fused ops hide, rather than
showing them as the model's numbers: query heads come from the fused attention's ``num_heads``, layers whose
residual Adds are fused say so, and ``groups_at_fused_ops`` counts the groups cut at a fused op.
"""

from __future__ import annotations

import re
from typing import Any

import onnx_ir as ir

from prune2deploy.analysis.attention import analyze_attention
from prune2deploy.analysis.channels import analyze_channels
from prune2deploy.analysis.contrib_cost import fused_op_counts
from prune2deploy.analysis.cost import layer_of, param_count
from prune2deploy.analysis.summary import layer_summary

__all__ = ["inspect_model", "layer_sort_key"]

_SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
_ATTENTION = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedAttention")


def layer_sort_key(name: str | None) -> tuple:
    """Numeric order of layer names: ``model.layers.2`` before ``model.layers.10`` (text order puts 10 first)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name or ""))


def _fused_by_layer(model: ir.Model) -> dict[str, list[ir.Node]]:
    found: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if node.domain == "com.microsoft":
            found.setdefault(layer_of(node), []).append(node)
    return found


def _mark_layers(layers: list[dict], fused: dict[str, list[ir.Node]]) -> None:
    for row in layers:
        skips = sorted({n.op_type for n in fused.get(row["layer"], []) if n.op_type in _SKIP_NORMS})
        if skips and not row["sub_blocks"]:
            row["hidden_by_fused"] = skips
            row["blocked_by"] = (
                f"the residual Adds are inside fused {', '.join(skips)} kernels (not counted here); inspect the "
                "unfused graph (reference.onnx, or a compile with --portable)"
            )


def _mark_attention(blocks: list[dict], fused: dict[str, list[ir.Node]]) -> None:
    for block in blocks:
        kernels = [n for n in fused.get(block["layer"] or "", []) if n.op_type in _ATTENTION]
        if not kernels:
            continue
        heads = kernels[0].attributes.get("num_heads")
        block["hidden_by_fused"] = sorted({n.op_type for n in kernels})
        if heads is not None:
            block["heads"] = int(heads.value)
            block["heads_from"] = f"{kernels[0].op_type} num_heads"
        block["supported"] = False
        block["reasons"] = [
            f"attention is a fused {kernels[0].op_type} kernel: heads are read and removed on the unfused graph"
        ]


def inspect_model(model: ir.Model, *, name: str, sparsity_2_4: dict[str, Any]) -> dict[str, Any]:
    """The ``inspect`` result of ``model`` (``name``: how to call it); ``sparsity_2_4`` is the 2:4 check's record.

    Layers and attention blocks are in numeric layer order.
    """
    analysis = analyze_channels(model)
    total, _ = param_count(model)
    # Batch and sequence axes also meet contractions (attention's QKᵀ); they have no static width and are
    # not channels, so they are left out of what a person reads.
    groups = [g.summary() for g in analysis.groups if g.width > 0]
    layers = sorted(layer_summary(model), key=lambda r: layer_sort_key(r["layer"]))
    attention = sorted(analyze_attention(model).summary(), key=lambda b: layer_sort_key(b["layer"] or b["block"]))
    info: dict[str, Any] = {
        "model": name,
        "layers": layers,
        "attention": attention,
        "sparsity_2_4": sparsity_2_4,
        "params": total,
        "nodes": len(model.graph),
        "groups": groups,
        "prunable": sum(g["prunable"] for g in groups),
        "zero_channels": sum(g["zero_channels"] for g in groups if g["prunable"]),
        "zero_weight_nonzero_bias": sum(g.get("zero_weight_nonzero_bias", 0) for g in groups),
        "fused": None,
    }
    ops = fused_op_counts(model)
    if ops:
        by_layer = _fused_by_layer(model)
        _mark_layers(layers, by_layer)
        _mark_attention(attention, by_layer)
        fused_nodes = {n.name for nodes in by_layer.values() for n in nodes}
        cut = sum(any(b.get("node") in fused_nodes for b in g["blocked"]) for g in groups)
        info["groups_at_fused_ops"] = cut
        info["fused"] = {
            "ops": ops,
            "note": (
                "this graph is fused for ONNX Runtime (" + ", ".join(f"{k} ×{v}" for k, v in ops.items()) + "): "
                f"{cut} channel groups stop at a fused op, residual Adds and head splits inside fused kernels are "
                "not seen, so group, residual-block and head counts are those of the fused graph, marked where a "
                "fused op hides them; inspect the unfused graph (reference.onnx) for what compile prunes"
            ),
        }
    return info
