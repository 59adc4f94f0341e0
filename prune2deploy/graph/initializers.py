"""New initializers: fresh names, one correct way to register an array, and editing shared constants.

The exporter de-duplicates equal tensors, so a small constant (a Reshape target, a bias of zeros) is often
read by several nodes. A pass that changes it for one reader registers a new initializer for that reader
(:func:`replace_input_with_array`) and leaves the shared one alone.

Arrays are copied, never aliased: the caller's array (often a view of another initializer's memory-mapped
data) may change or be freed later. ``np.ascontiguousarray`` is not used for the copy because it turns a
0-d array into a 1-d one; ``np.array(..., order="C")`` keeps the shape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = [
    "NameCounter",
    "add_initializer",
    "owned_array",
    "replace_const",
    "replace_input_with_array",
    "unique_name",
]


def owned_array(array: np.ndarray, dtype: ir.DataType | None = None) -> np.ndarray:
    """A C-ordered copy of ``array`` (0-d stays 0-d), converted to ``dtype`` when one is given."""
    if dtype is not None:
        array = np.asarray(array).astype(dtype.numpy(), copy=False)
    return np.array(array, order="C", copy=True)


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base`` if no initializer has that name, else the first free ``base_1``, ``base_2`` ..."""
    name, index = base, 1
    while name in graph.initializers:
        name, index = f"{base}_{index}", index + 1
    return name


class NameCounter:
    """Names ``{base}_{tag}{n}`` with one running counter, skipping names the graph already has.

    One counter per pass instance keeps the names of one pass recognisable (``_p2d3``, ``_h7``) and lets
    nodes made alongside an initializer (a cloned Concat) reuse its number through :attr:`count`.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.count = 0

    def __call__(self, graph: ir.Graph, base: str) -> str:
        while True:
            self.count += 1
            name = f"{base}_{self.tag}{self.count}"
            if name not in graph.initializers:
                return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Registers a copy of ``array`` as initializer ``name`` (its dtype, or ``dtype`` when given)."""
    data = owned_array(array, dtype)
    tensor = ir.tensor(data, name=name)
    value = ir.Value(name=name, shape=ir.Shape(data.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_const(value: ir.Value, array: np.ndarray) -> None:
    """Gives an existing constant new contents (a copy of ``array``) and the matching shape, in place.

    Only for a value whose every reader should see the change; otherwise use
    :func:`replace_input_with_array`.
    """
    data = owned_array(array)
    value.const_value = ir.tensor(data, name=value.name)
    value.shape = ir.Shape(data.shape)


def replace_input_with_array(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str, dtype: ir.DataType | None = None
) -> ir.Value:
    """Points input ``index`` of ``node`` at a new initializer of ``graph`` holding ``array``.

    The clone-before-edit step for shared constants: other readers of the old input keep it unchanged.
    """
    value = add_initializer(graph, name, array, dtype)
    node.replace_input_with(index, value)
    return value
