"""Choosing units from scores: ratios, global or per-layer ranking, rounding, and GQA-consistent heads.

Kept widths are rounded to a multiple (8/16/64) because GEMM kernels tile in such multiples: a width of
1000 runs no faster than 1024. Heads respect grouped-query attention: a kv head is removed only when
every query head of its group is removed, and ``uniform`` keeps the same number of query heads per group
so that the compiled model stays a regular GQA model (one ``repeat_kv`` factor).
"""

from __future__ import annotations

import math

import torch

from prune2deploy.errors import ConfigError

__all__ = ["global_keep_counts", "kept_count", "round_half_up", "round_width", "select_heads", "top_units"]


def round_half_up(value: float) -> int:
    """Nearest integer with ties up (Python's ``round`` sends 4.5 to 4, which would prune more than asked)."""
    return math.floor(value + 0.5)


def round_width(keep: int, width: int, round_to: int | None, minimum: int = 1) -> int:
    """Rounds a kept width to the nearest multiple of ``round_to`` (at least one multiple, at most ``width``).

    When ``round_to`` is not below ``width`` rounding cannot apply and ``keep`` stays as it is.
    """
    if round_to and round_to < width:
        keep = max(round_to, round_half_up(keep / round_to) * round_to)
    return max(minimum, min(width, keep))


def kept_count(width: int, ratio: float, round_to: int | None = None, minimum: int = 1) -> int:
    """Units kept when removing ``ratio`` of ``width`` (then rounded)."""
    return round_width(width - round_half_up(width * ratio), width, round_to, minimum)


def top_units(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, sorted; ties keep the lower index (stable sort)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:keep]
    return sorted(int(i) for i in order)


def global_keep_counts(scores: dict[int, torch.Tensor], ratio: float) -> dict[int, int]:
    """Per-layer kept counts when the ``ratio`` lowest scores across all layers are removed together.

    Global ranking (LLM-Pruner's and Minitron's default for width) lets layers with unimportant units
    shrink more; every layer keeps at least one unit.
    """
    layers = sorted(scores)
    flat = torch.cat([scores[i].double().reshape(-1) for i in layers])
    owner = torch.cat([torch.full((scores[i].numel(),), i) for i in layers])
    n_remove = round_half_up(flat.numel() * ratio)
    removed = torch.sort(flat, stable=True).indices[:n_remove]
    counts = {i: scores[i].numel() for i in layers}
    for index in owner[removed].tolist():
        counts[index] -= 1
    return {i: max(1, c) for i, c in counts.items()}


def select_heads(
    scores: torch.Tensor, keep: int, num_kv_heads: int, grouping: str = "free"
) -> tuple[list[int], list[int]]:
    """Chooses query heads to keep and the kv heads that become empty.

    Query head h belongs to kv group ``h // (H / num_kv_heads)`` (transformers' ``repeat_kv`` layout).

    Args:
        scores: [H] head scores.
        keep: query heads to keep (adjusted to the grouping: a multiple of the group count for
            ``uniform``, of the group size for ``whole-group``).
        num_kv_heads: kv heads (equal to H for multi-head attention).
        grouping: ``free`` (best heads anywhere), ``uniform`` (the same number per kv group, chosen per
            group) or ``whole-group`` (remove whole kv groups, ranked by the sum of their heads' scores).

    Returns:
        (kept query heads, removed kv heads), both sorted.
    """
    heads = scores.numel()
    if heads % num_kv_heads:
        raise ConfigError(f"{heads} query heads do not split into {num_kv_heads} kv groups")
    size = heads // num_kv_heads
    keep = max(1, min(heads, keep))
    if grouping == "free" or size == 1:
        kept = top_units(scores, keep)
    elif grouping == "uniform":
        per_group = max(1, min(size, round_half_up(keep / num_kv_heads)))
        kept = []
        for g in range(num_kv_heads):
            kept += [g * size + h for h in top_units(scores[g * size : (g + 1) * size], per_group)]
    elif grouping == "whole-group":
        groups = max(1, round_half_up(keep / size))
        group_scores = scores.double().reshape(num_kv_heads, size).sum(dim=1)
        kept = [g * size + h for g in top_units(group_scores, groups) for h in range(size)]
    else:
        raise ConfigError(f"head_grouping must be free, uniform or whole-group, got '{grouping}'")
    kept_groups = {h // size for h in kept}
    return sorted(kept), [g for g in range(num_kv_heads) if g not in kept_groups]
