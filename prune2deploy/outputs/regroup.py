"""The ``regroup-gqa`` pass on the sliced torch model, so that genai/ and hf/ are the model in ``model.onnx``.

``regroup-gqa`` is approximate: it changes what the model computes (pooled K/V), so the LM outputs, which
are built from the torch module rather than from the graph, would be another model unless the module is
regrouped the same way. That is the whole point of regrouping for serving: the decode speed-up is in
genai/'s GroupQueryAttention, which reads the smaller cache. This module pools each layer's key/value
projections with the pass's own pooling (:func:`prune2deploy.passes.regroup_gqa.pool_groups`: each query
head brings the kv head it reads; a group's pool is the float64 mean, or the first, over its query heads),
and the caller checks the written decoder against ``model.onnx`` itself.

Similarity grouping permutes each layer's query heads so that every cluster is contiguous. The clusters are
not recomputed here (a tie broken differently by float noise would give another model): the pass's record
carries each block's permutation (``order``), and this module applies exactly that one — q_proj's output
rows (and bias) and o_proj's input columns move together, which is exact — before pooling adjacent groups.
Layers whose slicing kept zero heads to even out the kv groups (the graph removes them with a Gather
instead, so head indices differ) are refused with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.slice import LayerWidths, SliceResult, restricted_linear, text_config
from prune2deploy.passes.regroup_gqa import group_members, pool_groups

__all__ = ["regroup_sliced"]

log = logging.getLogger(__name__)


def _groups_of(kv_heads: int | Mapping[Any, int], layer: int) -> int | None:
    if isinstance(kv_heads, int):
        return kv_heads
    for key in (layer, str(layer), f"model.layers.{layer}", f"model.layers.{layer}.self_attn"):
        if key in kv_heads:
            return int(kv_heads[key])
    return None


def _order_of(orders: Mapping[str, list[int]], layer: int) -> list[int] | None:
    for key in (f"model.layers.{layer}.self_attn", f"model.layers.{layer}"):
        if key in orders:
            return [int(h) for h in orders[key]]
    return None


def _permute_query_heads(attn: Any, order: list[int], head_dim: int) -> None:
    """Query heads in ``order``: q_proj's rows (and bias) and o_proj's columns move together (exact)."""
    import torch

    index = torch.tensor([h * head_dim + j for h in order for j in range(head_dim)], dtype=torch.long)
    attn.q_proj = restricted_linear(attn.q_proj, rows=index)
    attn.o_proj = restricted_linear(attn.o_proj, cols=index)


def regroup_sliced(
    sliced: SliceResult,
    kv_heads: int | Mapping[Any, int],
    *,
    grouping: str = "adjacent",
    method: str = "mean",
    orders: Mapping[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Pools the sliced module's K/V heads in place; returns the per-layer kv heads before and after.

    ``orders`` (block or layer name → query-head permutation, from the pass's record) is required for
    similarity grouping: exactly the layers it names are regrouped, with its permutation.

    Raises:
        UnsupportedModelError: similarity grouping without the pass's permutations, a permutation that does
            not fit the sliced layer, or a layer where slicing kept zero heads (``padded``).
    """
    import torch

    _check_repeatable(sliced, grouping, orders)
    d = sliced.head_dim
    layers = sliced.module.model.layers
    changed: dict[str, list[int]] = {}
    with torch.no_grad():
        for position, (layer, widths) in enumerate(zip(layers, sliced.layers, strict=True)):
            i = widths.index  # the layer's original index (the pass's names), also after a depth plan
            groups = _groups_of(kv_heads, i)
            heads, kv = widths.num_heads, widths.kv_heads
            order = None
            if grouping == "similarity":
                order = _order_of(orders or {}, i)
                if order is None or groups is None:
                    continue  # the pass did not regroup this block
                if sorted(order) != list(range(heads)) or heads % groups:
                    raise UnsupportedModelError(
                        f"model.layers.{i}: the pass's query-head permutation ({len(order)} heads) does not fit "
                        f"the sliced layer's {heads} query heads in {groups} groups"
                    )
            elif groups is None or groups == kv or heads % groups:
                continue  # as the pass: not named, already grouped so, or G does not divide the query heads
            _regroup_layer(layer.self_attn, heads, kv, groups, order, d, method)
            sliced.layers[position] = LayerWidths(i, heads, groups, widths.intermediate)
            changed[f"model.layers.{i}"] = [kv, groups]
    if sliced.uniform:
        config = sliced.module.config
        text = text_config(config)
        for cfg in {id(config): config, id(text): text}.values():
            cfg.num_key_value_heads = sliced.layers[0].kv_heads
    log.info("regrouped %d layers for genai/ and hf/: %s", len(changed), changed)
    return {"grouping": grouping, "method": method, "layers": changed}


def _check_repeatable(sliced: SliceResult, grouping: str, orders: Mapping[str, list[int]] | None) -> None:
    if grouping not in ("adjacent", "similarity"):
        raise UnsupportedModelError(f"regroup-gqa grouping {grouping!r} cannot be repeated on the torch module")
    if grouping == "similarity" and orders is None:
        raise UnsupportedModelError(
            "regroup-gqa with similarity grouping permutes query heads by the graph's weights, and the pass's "
            "permutations were not given: genai/ and hf/ cannot repeat it (use --gqa-grouping adjacent, or --no-genai)"
        )
    uneven = [where for where in sliced.padded if ".kv" in where]
    if uneven:
        raise UnsupportedModelError(
            f"slicing kept zero query heads to even out kv groups ({', '.join(uneven[:3])}), where model.onnx "
            "gathers kv heads instead: the head indices differ, so the regrouping cannot be repeated in torch"
        )


def _regroup_layer(attn: Any, heads: int, kv: int, groups: int, order: list[int] | None, d: int, method: str) -> None:
    """One layer's K/V pooled into ``groups`` heads, its query heads first permuted into ``order``."""
    import torch

    kv_of = [h // (heads // kv) for h in range(heads)]
    members = group_members(order if order is not None else list(range(heads)), groups)
    if order is not None:  # query head at new position p is old head order[p]: groups become adjacent
        _permute_query_heads(attn, order, d)
    for name in ("k_proj", "v_proj"):
        old = getattr(attn, name)
        weight = old.weight.detach().float().numpy().reshape(kv, d, -1)[kv_of]  # [H, d, in]
        pooled = pool_groups(weight, members, method).reshape(groups * d, -1)
        new = torch.nn.Linear(pooled.shape[1], pooled.shape[0], bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.copy_(torch.from_numpy(np.ascontiguousarray(pooled)))
        if old.bias is not None:
            bias = old.bias.detach().float().numpy().reshape(kv, d)[kv_of]
            pooled_bias = pool_groups(bias, members, method).reshape(-1)
            new.bias.copy_(torch.from_numpy(np.ascontiguousarray(pooled_bias)))
        setattr(attn, name, new)
    attn.num_key_value_groups = heads // groups
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = groups
