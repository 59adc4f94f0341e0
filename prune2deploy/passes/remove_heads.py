"""Physically remove attention heads whose contribution is provably zero.

Exact: a head goes only when its output-projection rows are zero or the value head it reads is zero
(weights and bias, no past cache), so its term ``O_h · softmax(..) · V`` is zero for every input
(analysis/attention.py explains why zero *query* columns are not enough). Its query columns and output
rows are sliced away; a kv head goes when every query head reading it is gone. Uneven removal inside GQA
groups keeps the exact query → kv map with a Gather over the kv-head axis. Each layer ends with its own
head count; RoPE, scaling and masks act per head and are untouched.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from prune2deploy.analysis.attention import AttentionBlock, analyze_attention
from prune2deploy.analysis.head_routes import RouteBlocked
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.head_layout import HeadLayout, apply_head_layout, head_columns
from prune2deploy.passes.registry import PassOption, PassSpec, register_pass

__all__ = ["RemoveHeadsPass", "removal_layout"]

log = logging.getLogger(__name__)


def removal_layout(block: AttentionBlock, keep: list[int]) -> HeadLayout:
    """The layout that keeps query heads ``keep`` (sorted) and exactly the kv heads they read."""
    keep = sorted(keep)
    kv_keep = sorted({block.kv_of(h) for h in keep})
    d = block.head_dim
    k, v = block.projections["k"], block.projections["v"]
    cols = head_columns(kv_keep, d)

    def take(projection):
        bias = projection.role_bias()
        return projection.role_weight()[:, cols], None if bias is None else bias[cols]

    (k_weight, k_bias), (v_weight, v_bias) = take(k), take(v)
    mapping = [kv_keep.index(block.kv_of(h)) for h in keep]
    return HeadLayout(keep, k_weight, v_weight, k_bias, v_bias, mapping, d, kv_heads=kv_keep)


class RemoveHeadsPass(P2DPass):
    """Slices zero heads out of every attention block the analysis proves.

    Args:
        min_heads: each block keeps at least this many query heads, even if all are zero (removing a
            whole attention block is depth pruning, a different pass).
        allow_cache_change: in a KV-cache graph, removing a kv head shrinks the ``past_key_values`` inputs
            and ``present`` outputs of that layer; set False to keep the cache interface (kv heads stay,
            query heads still go).
    """

    name = "remove-heads"

    def __init__(self, *, min_heads: int = 1, allow_cache_change: bool = True) -> None:
        super().__init__()
        self.min_heads = max(1, min_heads)
        self.allow_cache_change = allow_cache_change

    def __repr__(self) -> str:
        return f"RemoveHeadsPass(min_heads={self.min_heads}, allow_cache_change={self.allow_cache_change})"

    def call(self, model: ir.Model) -> P2DResult:
        analysis = analyze_attention(model)
        per_block, unsupported = {}, {}
        for block in analysis.blocks:
            if not block.supported:
                unsupported[block.name] = "; ".join(block.reasons)
                continue
            if not block.zero_heads:
                continue
            keep = [h for h in range(block.num_heads) if h not in block.zero_heads]
            for h in sorted(block.zero_heads):  # keep zero heads (still exact) up to min_heads
                if len(keep) >= self.min_heads:
                    break
                keep.append(h)
            keep.sort()
            if len(keep) == block.num_heads:
                continue
            layout = removal_layout(block, keep)
            if block.cache_inputs and not self.allow_cache_change and layout.num_kv_heads != block.num_kv_heads:
                layout = self._keep_all_kv(block, keep)
            try:
                changes = apply_head_layout(model, block, layout, tag="rh")
            except RouteBlocked as exc:  # raised before any change: the block stays as it was
                unsupported[block.name] = f"{exc}; its zero heads {sorted(block.zero_heads)} stay"
                continue
            changes["removed_heads"] = sorted(set(range(block.num_heads)) - set(keep))
            changes["why"] = {str(h): block.zero_heads[h] for h in changes["removed_heads"]}
            changes["kept_zero_heads"] = sorted(set(keep) & set(block.zero_heads))  # min_heads
            per_block[block.name] = changes
            log.info(
                "%s: %d → %d heads, %d → %d kv heads",
                block.name,
                block.num_heads,
                len(keep),
                block.num_kv_heads,
                layout.num_kv_heads,
            )
        return self.result(
            model,
            modified=bool(per_block),
            refused=unsupported,
            blocks_total=len(analysis.blocks),
            blocks_supported=len(analysis.supported),
            blocks_changed=len(per_block),
            heads_removed=sum(len(c["removed_heads"]) for c in per_block.values()),
            kv_heads_removed=sum(c["kv_heads_before"] - c["kv_heads_after"] for c in per_block.values()),
            per_block=per_block,
        )

    @staticmethod
    def _keep_all_kv(block: AttentionBlock, keep: list[int]) -> HeadLayout:
        full = removal_layout(block, list(range(block.num_heads)))
        mapping = [block.kv_of(h) for h in keep]
        kv = list(range(block.num_kv_heads))
        return HeadLayout(keep, full.k_weight, full.v_weight, full.k_bias, full.v_bias, mapping, block.head_dim, kv)


register_pass(
    PassSpec(
        name="remove-heads",
        order=30,
        exactness="yes",
        summary="attention heads whose o_proj rows (or V) are zero; kv heads whose whole group is gone",
        default=True,
        options={
            "min_heads": PassOption(
                int,
                1,
                "remove-heads keeps at least this many query heads per layer",
                flag="--min-heads",
                constraints={"ge": 1},
            )
        },
        build=lambda o: RemoveHeadsPass(min_heads=o.min_heads),
        in_torch="carried",
    )
)
