"""What both models are run on: random feeds at several shapes, and the user's, checked before any run.

A user feed that names the wrong input or has the wrong dtype would otherwise surface as an ONNX Runtime
error blamed on the compiled model (a verification failure, exit 1) instead of bad input (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from prune2deploy.feeds import random_feeds

__all__ = ["FeedSet", "check_feeds", "feed_sets", "load_feeds"]

#: (label, feeds by input name)
FeedSet = tuple[str, Mapping[str, np.ndarray]]


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    """User feeds: an ``.npz`` or safetensors file keyed by input name."""
    from prune2deploy.errors import BadInputError

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"feeds file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read feeds ({exc}); give an .npz or .safetensors file") from exc


def feed_sets(
    probe: ir.Model | None,
    *,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
) -> list[FeedSet]:
    """Random feeds at each (batch, seq) shape for ``probe``'s inputs, then the user's feed sets.

    Two shapes by default because a graph with a baked-in batch or sequence constant passes at one shape
    and breaks at another; each shape gets its own seed so the sets are not the same numbers reshaped.
    """
    sets: list[FeedSet] = []
    if probe is not None:
        for index, (batch, seq) in enumerate(shapes):
            sets.append(
                (f"random batch={batch} seq={seq}", random_feeds(probe, batch=batch, seq=seq, seed=seed + index))
            )
    for i, feeds in enumerate(user_feeds):
        label = f"user feeds #{i + 1}"
        if probe is not None:
            check_feeds(probe, feeds, label)
        sets.append((label, feeds))
    return sets


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], label: str = "feeds") -> None:
    """User feeds must name the model's inputs with their dtype and rank, static dims, and finite floats.

    Raises:
        BadInputError: naming the input and what is wrong (exit code 2, not a verification failure).
    """
    from prune2deploy.errors import BadInputError
    from prune2deploy.feeds import feed_specs

    specs = {spec.name: spec for spec in feed_specs(model)}
    unknown = sorted(set(feeds) - set(specs))
    missing = sorted(set(specs) - set(feeds))
    if unknown or missing:
        raise BadInputError(
            f"{label}: the model's inputs are {sorted(specs)}"
            + (f"; unknown names {unknown}" if unknown else "")
            + (f"; missing {missing}" if missing else "")
        )
    for name, array in feeds.items():
        _check_one(label, name, np.asarray(array), specs[name])


def _check_one(label: str, name: str, array: np.ndarray, spec) -> None:
    from prune2deploy.errors import BadInputError

    if array.dtype != np.dtype(spec.dtype):
        raise BadInputError(f"{label}: input '{name}' is {array.dtype}, the model wants {np.dtype(spec.dtype)}")
    if spec.dims and len(spec.dims) != array.ndim:
        raise BadInputError(f"{label}: input '{name}' has shape {array.shape}, the model wants rank {len(spec.dims)}")
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and array.shape[axis] != dim:
            raise BadInputError(
                f"{label}: input '{name}' has shape {array.shape}; axis {axis} must be {dim} ({spec.dims})"
            )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise BadInputError(f"{label}: input '{name}' holds {bad} NaN/Inf values; verification needs finite feeds")
