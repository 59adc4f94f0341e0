"""How much memory profiling a model will need, estimated from the cost model before ONNX Runtime allocates.

A profiling grid that cannot fit would swap the machine or be killed minutes into a run; the cost model
knows every node's weights and activations at a shape, which is enough for a lower bound that refuses such
shapes up front (``compile`` and ``profile`` both ask).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx_ir as ir

from prune2deploy.errors import BadInputError

__all__ = ["check_profile_memory", "default_memory_limit_gib", "estimate_memory_bytes"]


def default_memory_limit_gib() -> float:
    """Half of this machine's physical memory: profiling more than that would swap or be killed."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30 / 2
    except (ValueError, OSError, AttributeError):
        return 8.0


def estimate_memory_bytes(model: ir.Model, batch: int, seq: int) -> int:
    """What ONNX Runtime needs at least to run ``model`` once at (batch, seq), from the cost model.

    Weights plus twice the largest node's activations (its inputs and outputs live together, and the
    arena keeps the previous ones); a lower bound, which is enough to refuse shapes that cannot fit.
    """
    from prune2deploy.analysis.cost import model_cost

    cost = model_cost(model, batch=batch, seq=seq)
    weights = sum(node.weight_bytes for node in cost.nodes)
    largest = max((node.bytes_read + node.bytes_written for node in cost.nodes), default=0)
    return int(weights + 2 * largest)


def check_profile_memory(model: ir.Model, batches: Sequence[int], seqs: Sequence[int], limit_gib: float | None) -> None:
    """Refuses profiling shapes whose estimated memory exceeds the limit, before ONNX Runtime allocates.

    Raises:
        BadInputError: naming the shape, the estimate and how to raise the limit (``--memory-limit-gib``).
    """
    limit = limit_gib if limit_gib is not None else default_memory_limit_gib()
    for batch in batches:
        for seq in seqs:
            need = estimate_memory_bytes(model, batch, seq) / 2**30
            if need > limit:
                raise BadInputError(
                    f"profiling at batch {batch}, seq {seq} needs about {need:.1f} GiB (estimated from the cost "
                    f"model), more than the limit of {limit:.1f} GiB; choose smaller --batch/--seq, or raise the "
                    "limit with --memory-limit-gib (option memory_limit_gib)"
                )
