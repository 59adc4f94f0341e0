"""Checking and applying a mask dict to a torch module (for evaluation of a pruning in torch).

The compiler has its own mask loading; this is the small in-memory helper that quality checks, tests and
benchmarks use to build the masked reference. It checks the contract (known name, the parameter's own
shape, values 0/1) so that a bad mask fails loudly instead of scaling weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prune2deploy.errors import MaskError

__all__ = ["apply_masks", "check_masks"]


def check_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raises :class:`MaskError` for an unknown name, a wrong shape or a value other than 0 and 1."""
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise MaskError(f"mask '{name}' names no parameter of {type(module).__name__}")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise MaskError(
                f"mask '{name}' has shape {tuple(mask.shape)} "
                f"but the parameter is {tuple(params[name].shape)}. "
                "Masks are keyed by torch parameter name and use the parameter's own layout."
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise MaskError(f"mask '{name}' holds values other than 0 and 1")


@torch.no_grad()
def apply_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Multiplies every masked parameter by its mask, in place; returns the module."""
    check_masks(module, masks)
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))
    return module
