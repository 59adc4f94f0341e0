"""Run a half-precision torch module in fp32 without an fp32 copy of it.

The LM outputs are checked against the masked model within a tight tolerance; half-precision rounding
differs between torch's and ONNX Runtime's kernels by far more, so the masked model's outputs are computed
in fp32 (the checkpoint's bf16/fp16 values are exactly representable there). An fp32 copy of a 3B bf16
model is 12.9 GB beside the 6.4 GB it comes from, which does not fit beside the compile in 24 GiB; here
each submodule's own parameters become fp32 for the length of its forward and the half-precision tensors
are put back after, so only one submodule at a time (the largest: a 128k-vocabulary embedding, 1.6 GB at
3B) exists in fp32. The round trip changes nothing: the original tensors themselves are restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["computing_in_fp32", "is_half_precision"]

_HALF = ("torch.bfloat16", "torch.float16")


def is_half_precision(module: Any) -> bool:
    """Whether ``module``'s parameters are bf16 or fp16 (judged by its first parameter)."""
    first = next(iter(module.parameters()), None)
    return first is not None and str(first.dtype) in _HALF


@contextlib.contextmanager
def computing_in_fp32(module: Any) -> Iterator[Any]:
    """Within the block, every forward of ``module`` computes in fp32 (no-op for an fp32 module).

    Parameters shared between submodules (tied embeddings) are one tensor: it is upcast by whichever
    submodule runs and restored after, so the tie holds.
    """
    if not is_half_precision(module):
        yield module
        return
    import torch

    saved: dict[int, list[tuple[Any, Any]]] = {}

    def upcast(sub: Any, _args: Any) -> None:
        held = []
        for param in sub.parameters(recurse=False):
            if param.dtype in (torch.bfloat16, torch.float16):
                held.append((param, param.data))
                param.data = param.data.float()
        saved.setdefault(id(sub), []).extend(held)

    def restore(sub: Any, _args: Any, _output: Any) -> None:
        for param, data in reversed(saved.pop(id(sub), [])):
            param.data = data

    handles = []
    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)):
            handles.append(sub.register_forward_pre_hook(upcast))
            handles.append(sub.register_forward_hook(restore))
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
        for held in saved.values():  # a forward that raised left its parameters upcast
            for param, data in reversed(held):
                param.data = data
        saved.clear()
