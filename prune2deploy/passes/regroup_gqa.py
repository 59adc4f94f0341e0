"""Regroup attention to fewer key/value heads (GQA, MQA) by pooling the key/value projections.

Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints": H query heads are split into G groups and each group's key and value heads are replaced by
their mean (the paper's "first" baseline keeps the group's first head). Starting from GQA with K kv heads,
each query head brings the kv head it reads, so the pool of a group is the mean over its query heads'
kv heads (as if the K heads were first repeated to H, then pooled: G = K with adjacent groups is exact).

Approximate: pooling changes K and V, so the pass reports a per-layer weight error and the pipeline
reports the output error (verify). With ``grouping="similarity"`` query heads are first clustered by the
key/value weights they read and permuted so that every cluster is contiguous; the permutation itself is
exact (query columns and the matching output-projection rows move together), only the pooling is not.
On a KV-cache graph the past/present cache tensors shrink to G heads: the cache is what decoding reads,
so this is where the pass saves memory traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.attention import AttentionBlock, analyze_attention
from prune2deploy.errors import ConfigError
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.head_layout import HeadLayout, apply_head_layout
from prune2deploy.passes.registry import PassOption, PassSpec, register_pass

__all__ = [
    "RegroupGQAPass",
    "group_members",
    "permutation_layout",
    "pool_groups",
    "regroup_layout",
    "similarity_groups",
]

log = logging.getLogger(__name__)

GROUPINGS = ("adjacent", "similarity")
METHODS = ("mean", "first")


def _per_query_kv(block: AttentionBlock, role: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``[H, in, d]`` weights and ``[H, d]`` biases of the kv head each query head reads."""
    projection = block.projections[role]
    d = block.head_dim
    weight = projection.role_weight()
    per_kv = weight.reshape(weight.shape[0], block.num_kv_heads, d).transpose(1, 0, 2)
    index = [block.kv_of(h) for h in range(block.num_heads)]
    per_kv_bias = projection.role_bias()
    per_kv_bias = None if per_kv_bias is None else per_kv_bias.reshape(block.num_kv_heads, d)[index]
    return per_kv[index], per_kv_bias


def similarity_groups(features: np.ndarray, groups: int) -> list[list[int]]:
    """Balanced greedy clustering of rows into ``groups`` groups of equal size.

    Deterministic: the lowest unassigned row seeds a group, which takes its nearest unassigned rows
    (Euclidean). Query heads that already share a kv head have identical features and stay together.
    """
    count = features.shape[0]
    size = count // groups
    distances = np.linalg.norm(features[:, None, :] - features[None, :, :], axis=-1)
    free = list(range(count))
    result = []
    for _ in range(groups):
        seed = free[0]
        nearest = sorted(free, key=lambda j: (distances[seed, j], j))[:size]
        result.append(sorted(nearest))
        free = [j for j in free if j not in nearest]
    return result


def group_members(order: list[int], groups: int) -> list[list[int]]:
    """The query heads of each of ``groups`` groups: consecutive runs of ``order`` (a permutation of heads)."""
    size = len(order) // groups
    return [list(order[g * size : (g + 1) * size]) for g in range(groups)]


def pool_groups(per_query: np.ndarray, members: list[list[int]], method: str) -> np.ndarray:
    """``[H, ...]`` per-query-head tensors → ``[G, ...]``: each group's float64 mean (or its first head).

    The one pooling rule: the pass and the LM outputs' repeat of it on the torch module
    (:mod:`prune2deploy.outputs.regroup`) both call it, so they compute the same bits.
    """
    if method == "first":
        return np.stack([per_query[m[0]] for m in members])
    return np.stack([per_query[m].astype(np.float64).mean(axis=0).astype(per_query.dtype) for m in members])


def permutation_layout(block: AttentionBlock, order: list[int]) -> HeadLayout:
    """Query heads in ``order`` (a permutation), same kv heads: exact, with a Gather where groups break."""
    k, v = block.projections["k"], block.projections["v"]

    def full(projection):
        return projection.role_weight(), projection.role_bias()

    (k_weight, k_bias), (v_weight, v_bias) = full(k), full(v)
    mapping = [block.kv_of(h) for h in order]
    return HeadLayout(list(order), k_weight, v_weight, k_bias, v_bias, mapping, block.head_dim)


def regroup_layout(
    block: AttentionBlock, groups: int, *, grouping: str = "adjacent", method: str = "mean"
) -> tuple[HeadLayout, dict]:
    """The pooled layout with ``groups`` kv heads, and its per-layer weight error."""
    heads, d = block.num_heads, block.head_dim
    size = heads // groups
    k_per_q, k_bias = _per_query_kv(block, "k")
    v_per_q, v_bias = _per_query_kv(block, "v")
    if grouping == "similarity":
        parts = [k_per_q.reshape(heads, -1), v_per_q.reshape(heads, -1)]
        parts += [b for b in (k_bias, v_bias) if b is not None]
        features = np.concatenate(parts, axis=1).astype(np.float64)
        order = [h for group in similarity_groups(features, groups) for h in group]
    else:
        order = list(range(heads))
    members = group_members(order, groups)

    def pool(per_q: np.ndarray | None) -> np.ndarray | None:
        return None if per_q is None else pool_groups(per_q, members, method)

    k_new, v_new = pool(k_per_q), pool(v_per_q)  # [G, in, d]
    kb_new, vb_new = pool(k_bias), pool(v_bias)  # [G, d]
    mapping = [i // size for i in range(heads)]

    def error(per_q: np.ndarray, pooled: np.ndarray) -> float:
        rebuilt = pooled[[mapping[order.index(h)] for h in range(heads)]]
        return float(np.linalg.norm(rebuilt - per_q) / max(np.linalg.norm(per_q), 1e-12))

    layout = HeadLayout(
        q_heads=order,
        k_weight=k_new.transpose(1, 0, 2).reshape(k_new.shape[1], groups * d),
        v_weight=v_new.transpose(1, 0, 2).reshape(v_new.shape[1], groups * d),
        k_bias=None if kb_new is None else kb_new.reshape(-1),
        v_bias=None if vb_new is None else vb_new.reshape(-1),
        mapping=mapping,
        head_dim=d,
    )
    stats = {
        "k_weight_rel_error": error(k_per_q, k_new),
        "v_weight_rel_error": error(v_per_q, v_new),
        "permuted": order != list(range(heads)),
        "order": order,
    }
    return layout, stats


class RegroupGQAPass(P2DPass):
    """Pools key/value heads so that each block reads ``groups`` kv heads.

    Args:
        groups: kv heads after the pass: one number for every block, or a mapping from block name (the
            attention module, e.g. ``model.layers.3.self_attn``) or layer name to a number. Blocks not
            named keep their kv heads. G must divide the block's query heads; 1 is multi-query attention.
        grouping: ``"adjacent"`` (the paper: consecutive query heads) or ``"similarity"`` (cluster query
            heads by the kv weights they read, then permute them so clusters are contiguous).
        method: ``"mean"`` (the paper) or ``"first"`` (the paper's baseline: keep each group's first head).
    """

    name = "regroup-gqa"

    def __init__(self, groups: int | Mapping[str, int], *, grouping: str = "adjacent", method: str = "mean") -> None:
        super().__init__()
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if isinstance(groups, int) and groups < 1:
            raise ValueError("groups must be ≥ 1")
        self.groups = groups
        self.grouping = grouping
        self.method = method

    def __repr__(self) -> str:
        return f"RegroupGQAPass(groups={self.groups!r}, grouping={self.grouping!r}, method={self.method!r})"

    def _groups_for(self, block: AttentionBlock) -> int | None:
        if isinstance(self.groups, int):
            return self.groups
        return self.groups.get(block.name, self.groups.get(block.layer))

    def call(self, model: ir.Model) -> P2DResult:
        analysis = analyze_attention(model)
        per_block, skipped = {}, {}
        for block in analysis.blocks:
            groups = self._groups_for(block)
            if groups is None:
                continue
            if not block.supported:
                skipped[block.name] = "; ".join(block.reasons)
                continue
            if block.route is not None:
                skipped[block.name] = (
                    "q, k and v share one per-head fused layout (one head split for all roles): regrouping would"
                    " change the kv head count inside it; only remove-heads rewrites such blocks"
                )
                continue
            if any(space == "kv" for *_, space in block.head_constants):
                skipped[block.name] = "a constant with one entry per kv head cannot be pooled with the kv heads"
                continue
            if block.num_heads % groups:
                skipped[block.name] = f"{groups} kv heads do not divide {block.num_heads} query heads"
                continue
            if groups == block.num_kv_heads and self.grouping == "adjacent":
                continue  # already grouped this way: nothing to pool
            layout, stats = regroup_layout(block, groups, grouping=self.grouping, method=self.method)
            changes = apply_head_layout(model, block, layout, tag="gqa")
            changes.update(stats)
            per_block[block.name] = changes
            log.info(
                "%s: %d → %d kv heads (K error %.3g, V error %.3g)",
                block.name,
                block.num_kv_heads,
                groups,
                stats["k_weight_rel_error"],
                stats["v_weight_rel_error"],
            )
        return self.result(
            model,
            modified=bool(per_block),
            # Pooling K/V heads is approximate; verification measures by how much.
            exact=False,
            refused=skipped,
            blocks_total=len(analysis.blocks),
            blocks_changed=len(per_block),
            grouping=self.grouping,
            method=self.method,
            kv_heads_before=sum(c["kv_heads_before"] for c in per_block.values()),
            kv_heads_after=sum(c["kv_heads_after"] for c in per_block.values()),
            per_block=per_block,
        )


def _torch_plan(options: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """The writers pool K/V on the sliced torch module the same way (``pool_groups``); similarity grouping's
    query-head permutations come from this run's record, since they depend on the weights."""
    regroup: dict[str, Any] = {
        "kv_heads": options.kv_heads,
        "grouping": options.gqa_grouping,
        "method": options.gqa_method,
    }
    if options.gqa_grouping == "similarity":
        regroup["orders"] = {name: block["order"] for name, block in record.get("per_block", {}).items()}
    return {"regroup": regroup}


def _check(options: Any) -> None:
    if options.kv_heads is None:
        raise ConfigError("the regroup-gqa pass needs kv_heads (--regroup-gqa N): kv heads per layer after regrouping")


register_pass(
    PassSpec(
        name="regroup-gqa",
        order=50,
        exactness="no (error reported)",
        summary="MHA/GQA → G kv heads (--regroup-gqa G, G = 1 is MQA) by mean-pooling K/V per group "
        "(Ainslie et al. 2023), adjacent or similarity grouping",
        options={
            "kv_heads": PassOption(
                int | None,
                None,
                "regroup attention to N kv heads per layer (1 = MQA)",
                flag="--regroup-gqa",
                metavar="KV_HEADS",
                enables=True,
                constraints={"ge": 1},
            ),
            "gqa_grouping": PassOption(
                Literal["adjacent", "similarity"], "adjacent", "how query heads are grouped", flag="--gqa-grouping"
            ),
            "gqa_method": PassOption(
                Literal["mean", "first"],
                "mean",
                "mean-pool a group's K/V heads, or keep the first",
                flag="--gqa-method",
            ),
        },
        build=lambda o: RegroupGQAPass(o.kv_heads, grouping=o.gqa_grouping, method=o.gqa_method),
        check=_check,
        in_torch="repeat",
        torch_plan=_torch_plan,
    )
)
