"""What both models are run on: random feeds at several shapes, and the user's, checked before any run.

A user feed that names the wrong input or has the wrong dtype would otherwise surface as an ONNX Runtime
error blamed on the compiled model (a verification failure, exit 1) instead of bad input (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from prune2deploy.feeds import random_feeds

__all__ = ["FeedSet", "check_feeds", "check_feeds_file", "check_sequence", "feed_sets", "load_feeds", "load_user_feeds"]

#: (label, feeds by input name)
FeedSet = tuple[str, Mapping[str, np.ndarray]]


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    """User feeds: an ``.npz`` or safetensors file keyed by input name, checked by :func:`check_feeds_file`
    before a byte of data is read."""
    from prune2deploy.errors import BadInputError

    path = Path(path)
    check_feeds_file(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read feeds ({exc}); give an .npz or .safetensors file") from exc


def check_feeds_file(path: Path) -> None:
    """A feeds file is a regular file whose arrays, as declared (npz: each member's ``.npy`` header and its
    uncompressed size; safetensors: the file itself, which is uncompressed), total at most
    :data:`prune2deploy.limits.FEEDS_BYTES`. An npz of 1 KB can declare, or inflate to, gigabytes.

    Raises:
        BadInputError: naming the file, the array, what it declares and the limit.
    """
    from prune2deploy.errors import BadInputError
    from prune2deploy.limits import FEEDS_BYTES, check_regular_file

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"feeds file {path} does not exist")
    info = check_regular_file(path, what="feeds file")
    declared = _npz_declared(path) if path.suffix == ".npz" else {"(whole file)": info.st_size}
    total = sum(declared.values())
    if total > FEEDS_BYTES:
        largest = max(declared, key=declared.__getitem__)
        raise BadInputError(
            f"{path}: the feeds declare {total} bytes (largest: '{largest}', {declared[largest]} bytes); feed files "
            f"are at most {FEEDS_BYTES} bytes (verification runs both models on every set). Give fewer or smaller "
            "arrays"
        )


def _npz_declared(path: Path) -> dict[str, int]:
    """Bytes each member of an ``.npz`` declares: the larger of its ``.npy`` header's shape x itemsize and the
    member's uncompressed size, read from the zip directory and the header only (no data)."""
    import zipfile

    from prune2deploy.errors import BadInputError

    declared: dict[str, int] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as handle:
                    shape, dtype = _npy_header(handle)
                if dtype.hasobject:
                    raise BadInputError(
                        f"{path}: array '{member.filename}' holds Python objects (dtype {dtype}), which load only by "
                        "unpickling; save numeric arrays"
                    )
                count = int(np.prod(shape, dtype=object))
                declared[member.filename] = max(count * dtype.itemsize, member.file_size)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BadInputError(
            f"{path}: cannot read feeds (not an .npz of arrays: {exc}); save them with numpy.savez"
        ) from None
    return declared


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an ``.npy`` stream from its header (numpy's own header reader; no data read)."""
    from numpy.lib import format as npy

    version = npy.read_magic(handle)
    if version == (1, 0):
        shape, _fortran, dtype = npy.read_array_header_1_0(handle)
    else:
        shape, _fortran, dtype = npy.read_array_header_2_0(handle)
    return shape, dtype


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
    if spec.source == "gather" and spec.high is not None and array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= spec.high:
            raise BadInputError(
                f"{label}: input '{name}' holds values {low}..{high}, but it indexes a table of {spec.high} rows "
                f"(the vocabulary, for token ids): values must be 0..{spec.high - 1}"
            )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise BadInputError(f"{label}: input '{name}' holds {bad} NaN/Inf values; verification needs finite feeds")


def check_sequence(model: ir.Model, feeds: Mapping[str, np.ndarray], limit: Any, label: str = "feeds") -> None:
    """No dynamic non-batch axis of a user feed is longer than the model's sequence bound ``limit``
    (:class:`prune2deploy.analysis.shapes.SequenceLimit`, None when the model has none): a longer run reads
    past a position table.

    Raises:
        BadInputError: naming the input, its length, the bound and where it comes from.
    """
    from prune2deploy.errors import BadInputError
    from prune2deploy.feeds import feed_specs

    if limit is None:
        return
    for spec in feed_specs(model):
        array = feeds.get(spec.name)
        if array is None:
            continue
        for axis, dim in enumerate(spec.dims):
            if axis and not isinstance(dim, int) and axis < array.ndim and array.shape[axis] > limit.max_seq:
                raise BadInputError(
                    f"{label}: input '{spec.name}' is {array.shape[axis]} long on axis {axis}; the model accepts "
                    f"at most {limit.max_seq} positions ({limit.where}). Shorten the feeds"
                )


def load_user_feeds(model: ir.Model, paths: Sequence[Path], limit: Any = None) -> list[dict[str, np.ndarray]]:
    """The ``--feeds`` files, each loaded (:func:`load_feeds`) and checked against ``model`` (names, dtypes,
    ranks, token ids within their table, finite floats) and its sequence bound ``limit``: bad input is found
    before any pass runs, not minutes later when verification reaches it."""
    loaded = []
    for index, path in enumerate(paths):
        feeds = load_feeds(path)
        label = f"{path} (user feeds #{index + 1})"
        check_feeds(model, feeds, label)
        check_sequence(model, feeds, limit, label)
        loaded.append(feeds)
    return loaded
