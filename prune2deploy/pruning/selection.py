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

GLOBAL_SCALES = ("standardize", "raw")

__all__ = [
    "GLOBAL_SCALES",
    "global_keep_counts",
    "kept_count",
    "round_half_up",
    "round_width",
    "select_heads",
    "standardized",
    "top_units",
]


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


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """Scores minus their mean, over their standard deviation (population), in float64.

    A layer whose scores are all equal has no order to standardize: its scores become 0 (the mean of the
    others' standardized scores), so it is neither favoured nor sacrificed.
    """
    values = scores.double().reshape(-1)
    std = values.std(unbiased=False)
    centred = values - values.mean()
    return centred / std if float(std) > 0 else torch.zeros_like(centred)


def global_keep_counts(
    scores: dict[int, torch.Tensor], ratio: float, *, scale: str = "standardize", min_keep: float = 0.0
) -> dict[int, int]:
    """Per-layer kept counts when the ``ratio`` lowest scores across all layers are removed together.

    Global ranking lets layers with unimportant units shrink more, but raw scores of different layers are
    not on one scale: activation norms (Wanda's |W|·‖x‖, Minitron's activations) grow with depth, so a raw
    ranking empties the first layers (SmolLM2-135M, wanda, 50 % of MLP neurons: layers 1–4 kept 32 of 1,536
    and perplexity went from 54 to 268,871; BENCHMARKS.md §12). ``scale="standardize"`` ranks each layer's
    scores after subtracting their mean and dividing by their standard deviation, as FLAP does with its
    fluctuation metric before it ranks all layers' units together (An et al., "Fluctuation-based Adaptive
    Structured Pruning for Large Language Models", AAAI 2024, arXiv:2312.11983, abstract and code); layers
    then differ by the shape of their score distribution, not by its scale. ``scale="raw"`` is the plain
    ranking (the old behaviour). ``min_keep`` protects each layer's best ``ceil(min_keep · width)`` units,
    a floor like OWL's bound on how far a layer's sparsity may move from the average (Yin et al., "Outlier
    Weighed Layerwise Sparsity", arXiv:2310.05175). Every layer keeps at least one unit.

    Raises:
        ConfigError: an unknown ``scale``, or ``min_keep`` outside [0, 1].
    """
    if scale not in GLOBAL_SCALES:
        raise ConfigError(f"global_scale: must be one of {', '.join(GLOBAL_SCALES)}, got '{scale}'")
    if isinstance(min_keep, bool) or not 0.0 <= float(min_keep) <= 1.0:
        raise ConfigError(f"min_keep: must be a fraction in [0, 1], got {min_keep!r}")
    layers = sorted(scores)
    ranked = [
        standardized(scores[i]) if scale == "standardize" else scores[i].double().flatten().clone() for i in layers
    ]
    for values in ranked:  # the protected best units sort last: never among the removed
        protect = min(values.numel(), math.ceil(min_keep * values.numel() - 1e-9))
        if protect:
            values[top_units(values, protect)] = math.inf
    flat = torch.cat(ranked)
    owner = torch.cat([torch.full((scores[i].numel(),), i) for i in layers])
    n_remove = min(round_half_up(flat.numel() * ratio), int(torch.isfinite(flat).sum()))
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
