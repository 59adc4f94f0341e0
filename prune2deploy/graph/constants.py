"""Reading constants: which values are known at compile time, their arrays, and which entries are zero.

Two meanings of "constant" exist in an exported graph and both are needed. An *initializer* (or any value a
pass gave a ``const_value``) is what the passes may slice and rewrite: the channel and residual analyses
only count those, so that everything they call a weight can be edited. A ``Constant`` node's output is
also known at compile time, which is enough for reading a shape target or Split sizes: the attention
analysis reads those. :func:`const_value_array` is the first meaning, :func:`const_array` the second.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["all_zero", "const_array", "const_value_array", "is_const", "zero_channels"]


def is_const(value: ir.Value | None) -> bool:
    """Whether ``value`` carries a ``const_value`` (an initializer; a ``Constant`` node's output does not)."""
    return value is not None and value.const_value is not None


def const_value_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of ``value.const_value``; ``None`` for run-time values and for ``Constant`` node outputs."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer *or* of a ``Constant`` node's output; ``None`` for run-time values.

    Raises:
        ValueError: A malformed ``Constant`` node (``onnx_ir.convenience.get_const_tensor``'s checks).
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def all_zero(value: ir.Value | None) -> bool:
    """Whether ``value`` carries a ``const_value`` whose entries are all zero."""
    return value is not None and value.const_value is not None and not np.any(value.const_value.numpy())


def zero_channels(array: np.ndarray, axis: int) -> np.ndarray:
    """Boolean per index of ``axis``: every entry with that index is zero (a 0-d array: itself == 0)."""
    other = tuple(a for a in range(array.ndim) if a != axis)
    return np.all(array == 0, axis=other) if other else array == 0
