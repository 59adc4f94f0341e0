"""Input feeds for an ONNX model at a chosen batch and sequence length.

Verification and profiling both need feeds that a model accepts and that exercise it: integer inputs get
values from how the graph uses them (below the size of the table they index, on both sides of a constant
they are compared with, small signed values where they are cast to float), an all-ones attention mask,
positions 0..n-1, and normal floats for images and hidden states. An integer input whose range cannot be
known gets zeros and is listed by :func:`unknown_ranges`, so the report can ask for ``--feeds``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["FeedSpec", "feed_specs", "random_feeds", "unknown_ranges"]

_NP_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
}


class FeedSpec:
    """One graph input: name, numpy dtype, dims (int or symbol name) and, for integers, a value range.

    ``low``/``high`` (exclusive) and ``source`` say where the range came from: ``gather`` (an index into a
    constant table of that size), ``compare`` (compared with a constant: values on both sides of it),
    ``cast`` (converted to float: small signed values), or None when it cannot be known.
    """

    def __init__(
        self,
        name: str,
        dtype: type,
        dims: Sequence[int | str | None],
        high: int | None,
        *,
        low: int = 0,
        source: str | None = None,
    ) -> None:
        self.name, self.dtype, self.dims, self.high = name, dtype, list(dims), high
        self.low = low
        self.source = source if source is not None else ("gather" if high is not None else None)

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

    @property
    def range_known(self) -> bool:
        """Whether random values for this input exercise the model (floats always do)."""
        lowered = self.name.lower()
        if not (np.issubdtype(self.dtype, np.integer) or self.dtype == np.bool_):
            return True
        return self.source is not None or "mask" in lowered or "position" in lowered

    def __repr__(self) -> str:
        return f"FeedSpec({self.name}, {self.dtype.__name__}, {self.dims}, [{self.low}, {self.high}), {self.source})"


#: Ops an integer index passes through unchanged in value (only its shape changes).
_VALUE_PRESERVING = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Transpose"})
_COMPARISONS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"})
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def _scalar_const(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _value_range(value: ir.Value, depth: int = 0) -> tuple[int, int, str] | None:
    """(low, high exclusive, source) for an integer input, from how the graph uses it."""
    bounds: list[tuple[int, int, str]] = []
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
            table = node.inputs[0].const_value
            if table is not None:
                axis = node.attributes.get_int("axis", 0)
                bounds.append((0, int(table.shape[axis]), "gather"))
        elif node.op_type in _COMPARISONS and len(node.inputs) == 2:
            other = node.inputs[1 - use.idx]
            c = _scalar_const(other)
            if c is not None:
                bounds.append((int(np.floor(c)) - 4, int(np.floor(c)) + 5, "compare"))
        elif node.op_type == "Cast" and node.outputs[0].dtype in _FLOAT_TYPES:
            bounds.append((-8, 9, "cast"))
        elif node.op_type in _VALUE_PRESERVING and use.idx == 0 and depth < 3:
            found = _value_range(node.outputs[0], depth + 1)
            if found is not None:
                bounds.append(found)
    if not bounds:
        return None
    gathers = [b for b in bounds if b[2] == "gather"]
    if gathers:  # an index must stay in every table it indexes
        return 0, min(b[1] for b in gathers), "gather"
    return min(b[0] for b in bounds), max(b[1] for b in bounds), bounds[0][2]


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
        found = _value_range(value) if (np.issubdtype(dtype, np.integer) or dtype == np.bool_) else None
        if found is None:
            specs.append(FeedSpec(value.name, dtype, dims, None))
        else:
            low, high, source = found
            specs.append(FeedSpec(value.name, dtype, dims, high, low=low, source=source))
    return specs


def unknown_ranges(model: ir.Model) -> list[str]:
    """Integer and bool inputs whose values random feeds cannot choose well: verification needs ``--feeds``."""
    return [spec.name for spec in feed_specs(model) if not spec.range_known]


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
            elif "position" in lowered:
                feeds[spec.name] = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
            elif spec.high is None or spec.source is None:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)  # range unknown: reported, --feeds asked for
            else:
                feeds[spec.name] = rng.integers(spec.low, spec.high, size=shape, dtype=spec.dtype)
        elif spec.dtype == np.bool_:
            if "mask" in lowered or spec.source is None:
                feeds[spec.name] = np.ones(shape, dtype=np.bool_)
            else:
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds
