"""Weight-only masks from element scores: unstructured sparsity and N:M along the input dimension.

These masks change no shape; their value is in sparse kernels (2:4 sparse tensor cores need exactly 2
nonzeros in every 4 consecutive weights along K, the input dimension of an nn.Linear weight [out, in]).
"""

from __future__ import annotations

import math

import torch

from prune2deploy.errors import ConfigError

__all__ = ["COMPARISON_GROUPS", "nm_mask", "unstructured_mask"]

#: Where each criterion compares its scores for unstructured sparsity. Wanda compares within each output
#: row (Sun et al. 2023, §3: "per output" comparison groups beat per layer for LLMs); magnitude and Taylor
#: rank the whole matrix, the usual layer-wise baseline.
COMPARISON_GROUPS = {"magnitude": "layer", "wanda": "row", "taylor": "layer"}


def _n_pruned(count: int, ratio: float) -> int:
    return math.floor(count * ratio + 0.5)


def unstructured_mask(scores: torch.Tensor, ratio: float, *, group: str = "layer") -> torch.Tensor:
    """0/1 float32 mask that removes the ``ratio`` lowest-scoring weights per row or per matrix.

    Ties break by index (a stable sort), so equal scores give the same mask on every run.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"unstructured ratio must be in [0, 1), got {ratio}")
    if group not in ("row", "layer"):
        raise ConfigError(f"comparison group must be 'row' or 'layer', got '{group}'")
    flat = scores.reshape(scores.shape[0], -1) if group == "row" else scores.reshape(1, -1)
    k = _n_pruned(flat.shape[1], ratio)
    mask = torch.ones_like(flat, dtype=torch.float32)
    if k:
        order = torch.sort(flat.double(), dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, 0.0)
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` highest scores in every group of ``m`` consecutive weights along the last axis.

    Raises:
        ConfigError: ``n`` is not below ``m``, or the input dimension is not a multiple of ``m`` (a partial
            group has no N:M pattern and sparse kernels would reject the layer).
    """
    if not 0 < n < m:
        raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    if scores.shape[-1] % m:
        raise ConfigError(f"input dimension {scores.shape[-1]} is not a multiple of M={m} for {n}:{m} sparsity")
    groups = scores.reshape(-1, m).double()
    keep = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.float32)
    mask.scatter_(1, keep, 1.0)
    return mask.reshape(scores.shape)
