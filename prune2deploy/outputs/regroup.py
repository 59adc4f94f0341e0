"""The ``regroup-gqa`` pass on the sliced torch model, so that genai/ and hf/ are the model in ``model.onnx``.

``regroup-gqa`` is approximate: it changes what the model computes (pooled K/V), so the LM outputs, which
are built from the torch module rather than from the graph, would be another model unless the module is
regrouped the same way. That is the whole point of regrouping for serving: the decode speed-up is in
genai/'s GroupQueryAttention, which reads the smaller cache. This module pools each layer's key/value
projections exactly as :func:`prune2deploy.passes.regroup_gqa.regroup_layout` does for adjacent grouping
(each query head brings the kv head it reads; a group's pool is the float64 mean, or the first, over its
query heads), and the caller checks the written decoder against ``model.onnx`` itself.

Similarity grouping (a permutation of query heads chosen from the graph's weights) and layers whose slicing
kept zero heads to even out the kv groups (the graph removes them with a Gather instead, so head indices
differ) are refused with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.slice import LayerWidths, SliceResult

__all__ = ["regroup_sliced"]

log = logging.getLogger(__name__)


def _pool(per_query: np.ndarray, groups: int, method: str) -> np.ndarray:
    """[H, ...] per-query-head tensors → [G, ...]: adjacent groups of H/G, mean (float64) or first."""
    members = per_query.reshape(groups, per_query.shape[0] // groups, *per_query.shape[1:])
    if method == "first":
        return members[:, 0]
    return members.astype(np.float64).mean(axis=1).astype(per_query.dtype)


def _groups_of(kv_heads: int | Mapping[Any, int], layer: int) -> int | None:
    if isinstance(kv_heads, int):
        return kv_heads
    for key in (layer, str(layer), f"model.layers.{layer}", f"model.layers.{layer}.self_attn"):
        if key in kv_heads:
            return int(kv_heads[key])
    return None


def regroup_sliced(
    sliced: SliceResult, kv_heads: int | Mapping[Any, int], *, grouping: str = "adjacent", method: str = "mean"
) -> dict[str, Any]:
    """Pools the sliced module's K/V heads in place; returns the per-layer kv heads before and after.

    Raises:
        UnsupportedModelError: similarity grouping, or a layer where slicing kept zero heads (``padded``).
    """
    import torch

    if grouping != "adjacent":
        raise UnsupportedModelError(
            f"regroup-gqa with {grouping} grouping permutes query heads by the graph's weights; genai/ and hf/ "
            "follow adjacent grouping only (use --gqa-grouping adjacent, or --no-genai)"
        )
    uneven = [where for where in sliced.padded if ".kv" in where]
    if uneven:
        raise UnsupportedModelError(
            f"slicing kept zero query heads to even out kv groups ({', '.join(uneven[:3])}), where model.onnx "
            "gathers kv heads instead: the head indices differ, so the regrouping cannot be repeated in torch"
        )
    d = sliced.head_dim
    layers = sliced.module.model.layers
    changed: dict[str, list[int]] = {}
    with torch.no_grad():
        for i, (layer, widths) in enumerate(zip(layers, sliced.layers, strict=True)):
            groups = _groups_of(kv_heads, i)
            heads, kv = widths.num_heads, widths.kv_heads
            if groups is None or groups == kv or heads % groups:
                continue  # as the pass: not named, already grouped so, or G does not divide the query heads
            attn = layer.self_attn
            kv_of = [h // (heads // kv) for h in range(heads)]
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name)
                weight = old.weight.detach().float().numpy().reshape(kv, d, -1)[kv_of]  # [H, d, in]
                pooled = _pool(weight, groups, method).reshape(groups * d, -1)
                new = torch.nn.Linear(
                    pooled.shape[1], pooled.shape[0], bias=old.bias is not None, dtype=old.weight.dtype
                )
                new.weight.copy_(torch.from_numpy(np.ascontiguousarray(pooled)))
                if old.bias is not None:
                    bias = old.bias.detach().float().numpy().reshape(kv, d)[kv_of]
                    new.bias.copy_(torch.from_numpy(np.ascontiguousarray(_pool(bias, groups, method).reshape(-1))))
                setattr(attn, name, new)
            attn.num_key_value_groups = heads // groups
            if hasattr(attn, "num_key_value_heads"):
                attn.num_key_value_heads = groups
            sliced.layers[i] = LayerWidths(widths.index, heads, groups, widths.intermediate)
            changed[f"model.layers.{i}"] = [kv, groups]
    if sliced.uniform:
        config = sliced.module.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        for cfg in {id(config): config, id(text): text}.values():
            cfg.num_key_value_heads = sliced.layers[0].kv_heads
    log.info("regrouped %d layers for genai/ and hf/: %s", len(changed), changed)
    return {"grouping": grouping, "method": method, "layers": changed}
