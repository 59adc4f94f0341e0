"""Static dims and shape vectors: what the passes may rely on when they change a width.

A dim of an ``onnx_ir`` shape is an ``int`` or a ``SymbolicDim`` whose ``value`` is a name (or ``None``
when even the name is unknown). :func:`dim_value` keeps the name, since two equal names are the same
run-time size; :func:`static_dim` keeps only ints, since only those can be sliced.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from prune2deploy.graph.constants import const_array

__all__ = ["dim_value", "rank", "same_dim", "set_dim", "shape_entries", "static_dim", "value_dim"]


def dim_value(dim: Any) -> int | str | None:
    """An int, a symbolic dim's name (also a plain ``str``, as ONNX Runtime reports them), or ``None``."""
    if isinstance(dim, (int, str)):
        return dim
    value = getattr(dim, "value", None)
    return value if isinstance(value, (int, str)) else None


def static_dim(dim: Any) -> int | None:
    """The dim as an int when it is static, else ``None``."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    return value if isinstance(value, int) else None


def same_dim(a: Any, b: Any) -> bool:
    """Provably equal: equal static sizes, or the same symbolic name (two unnamed dims are not)."""
    sa, sb = static_dim(a), static_dim(b)
    if sa is not None or sb is not None:
        return sa == sb
    na, nb = getattr(a, "value", None), getattr(b, "value", None)
    return na is not None and na == nb


def rank(value: ir.Value | None) -> int | None:
    """The rank of ``value``, or ``None`` when it has no shape."""
    return None if value is None or value.shape is None else len(value.shape)


def value_dim(value: ir.Value, axis: int) -> int | str | None:
    """:func:`dim_value` of ``value``'s dim ``axis``; ``None`` when it has no shape."""
    if value.shape is None:
        return None
    return dim_value(value.shape[axis])


def set_dim(value: ir.Value, axis: int, width: int) -> None:
    """Sets one dim of ``value``'s shape (a value without a shape is left alone)."""
    if value.shape is None:
        return
    dims = list(value.shape)
    dims[axis] = width
    value.shape = ir.Shape(dims)


def shape_entries(value: ir.Value | None) -> list[int | None] | None:
    """Entries of a shape vector: constants where known, ``None`` where computed at run time.

    Reads a constant or a ``Concat`` of pieces with static lengths (how the exporter builds
    ``[batch, seq, -1, head_dim]``). ``None`` when even the length is unknown.
    """
    array = const_array(value)
    if array is not None:
        return [int(x) for x in array.reshape(-1)]
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for piece in producer.inputs:
        piece_array = const_array(piece)
        if piece_array is not None:
            entries += [int(x) for x in piece_array.reshape(-1)]
            continue
        if piece is None or piece.shape is None or len(piece.shape) != 1 or static_dim(piece.shape[0]) is None:
            return None
        entries += [None] * static_dim(piece.shape[0])
    return entries
