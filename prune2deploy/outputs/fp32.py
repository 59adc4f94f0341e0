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


class _Scratch:
    """fp32 scratch memory for the upcast parameters, reused from one submodule to the next.

    Upcasting into new tensors cost the kernel's page faults on every forward: at 8B, 32 GB of fresh fp32
    pages per pass (12 s of a 20 s forward on 2 cores, against 1.5 s to copy into memory already mapped).
    The forward hooks nest (a module's pre-hook, its children's, their hooks, its hook), so the scratch is a
    stack: a submodule takes the top, gives it back when its forward ends. It grows only while nothing is
    taken, to the largest submodule's parameters (the vocabulary embedding: 2.1 GB at 8B), and is held until
    the block ends.
    """

    def __init__(self) -> None:
        self._buffer: Any = None
        self._top = 0

    def take(self, numel: int) -> tuple[Any, bool]:
        """A flat fp32 tensor of ``numel`` elements, and whether it came from the stack (to give back)."""
        import torch

        if self._buffer is None or self._top + numel > self._buffer.numel():
            if self._top:  # nested and full: a fresh tensor for this one (not seen in transformers' LMs)
                return torch.empty(numel, dtype=torch.float32), False
            self._buffer = None  # dropped before the larger one is made
            self._buffer = torch.empty(numel, dtype=torch.float32)
        view = self._buffer[self._top : self._top + numel]
        self._top += numel
        return view, True

    def give(self, numel: int) -> None:
        self._top -= numel


@contextlib.contextmanager
def computing_in_fp32(module: Any) -> Iterator[Any]:
    """Within the block, every forward of ``module`` computes in fp32 (no-op for an fp32 module).

    Parameters shared between submodules (tied embeddings) are one tensor: it is upcast by whichever
    submodule runs and restored after, so the tie holds. The fp32 values live in scratch memory that the
    next submodule reuses, so the block runs without autograd (a graph would keep them) and nothing may keep
    a parameter's fp32 tensor past its submodule's forward.
    """
    if not is_half_precision(module):
        yield module
        return
    import torch

    scratch = _Scratch()
    saved: dict[int, list[tuple[Any, Any, int, bool]]] = {}

    def upcast(sub: Any, _args: Any) -> None:
        half = [p for p in sub.parameters(recurse=False) if p.dtype in (torch.bfloat16, torch.float16)]
        numel = sum(p.numel() for p in half)
        flat, stacked = scratch.take(numel)
        held, offset = [], 0
        for param in half:
            held.append((param, param.data, numel, stacked))
            numel, stacked = 0, False  # given back once, with the first
            param.data = flat[offset : offset + param.numel()].view(param.shape).copy_(param.data)
            offset += param.numel()
        saved.setdefault(id(sub), []).extend(held)

    def restore(sub: Any, _args: Any, _output: Any) -> None:
        for param, data, numel, stacked in reversed(saved.pop(id(sub), [])):
            param.data = data
            if stacked:
                scratch.give(numel)

    handles = []
    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)):
            handles.append(sub.register_forward_pre_hook(upcast))
            handles.append(sub.register_forward_hook(restore))
    try:
        with torch.no_grad():
            yield module
    finally:
        for handle in handles:
            handle.remove()
        for held in saved.values():  # a forward that raised left its parameters upcast
            for param, data, _numel, _stacked in reversed(held):
                param.data = data
        saved.clear()
