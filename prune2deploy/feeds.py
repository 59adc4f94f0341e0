"""Input feeds for an ONNX model at a chosen batch and sequence length.

Verification and profiling both need feeds that a model accepts: token ids below the vocabulary size,
an all-ones attention mask, zero token types, and normal floats for images and hidden states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["FeedSpec", "feed_specs", "random_feeds"]

_NP_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
}


class FeedSpec:
    """One graph input: name, numpy dtype, dims (int or symbol name) and, for ids, an exclusive bound."""

    def __init__(self, name: str, dtype: type, dims: Sequence[int | str | None], high: int | None) -> None:
        self.name, self.dtype, self.dims, self.high = name, dtype, list(dims), high

    def concrete_shape(self, batch: int, seq: int, overrides: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """Static dims stay; the first dynamic dim is the batch, later ones the sequence (or an override)."""
        shape = []
        for index, dim in enumerate(self.dims):
            if isinstance(dim, int):
                shape.append(dim)
            elif overrides and isinstance(dim, str) and dim in overrides:
                shape.append(overrides[dim])
            else:
                shape.append(batch if index == 0 else seq)
        return tuple(shape)

    def __repr__(self) -> str:
        return f"FeedSpec({self.name}, {self.dtype.__name__}, {self.dims}, high={self.high})"


def _id_bound(model: ir.Model, value: ir.Value) -> int | None:
    """Vocabulary size for an input that indexes an embedding table (Gather on a constant)."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
            table = node.inputs[0].const_value
            if table is not None:
                return int(table.shape[0])
    return None


def feed_specs(model: ir.Model) -> list[FeedSpec]:
    """Describes every graph input that is not an initializer."""
    specs = []
    initializers = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        dtype = _NP_DTYPES.get(value.dtype, np.float32)
        dims: list[int | str | None] = []
        for dim in value.shape or []:
            dims.append(dim if isinstance(dim, int) else (dim.value if hasattr(dim, "value") else None))
        specs.append(FeedSpec(value.name, dtype, dims, _id_bound(model, value)))
    return specs


def random_feeds(
    model: ir.Model | Sequence[FeedSpec],
    *,
    batch: int = 2,
    seq: int = 8,
    seed: int = 0,
    overrides: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic random feeds for every input of ``model``."""
    specs = feed_specs(model) if isinstance(model, ir.Model) else list(model)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.concrete_shape(batch, seq, overrides)
        lowered = spec.name.lower()
        if np.issubdtype(spec.dtype, np.integer):
            if "mask" in lowered:
                feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
            elif "type" in lowered or (spec.high is None and "position" not in lowered):
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            elif "position" in lowered:
                feeds[spec.name] = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
            else:
                feeds[spec.name] = rng.integers(0, spec.high, size=shape, dtype=spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds
