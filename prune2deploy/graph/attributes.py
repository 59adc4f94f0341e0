"""Node attributes with defaults, the way ONNX leaves optional attributes out.

These read ``attr.value`` without checking the attribute's declared type (``onnx_ir``'s
``Attributes.get_int`` and friends raise on a mismatch): an analysis that meets an odd model should see the
value and decide, and the exporter writes the types the schemas ask for anyway.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

__all__ = ["attr_value", "float_attr", "int_attr", "ints_attr", "string_attr"]


def attr_value(node: ir.Node, name: str, default: Any = None) -> Any:
    """The raw value of attribute ``name`` (int, float, str, tuple, tensor ...), or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def int_attr(node: ir.Node, name: str, default: int | None = None) -> int | None:
    """An INT attribute as ``int``, or ``default`` when the node leaves it out."""
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def ints_attr(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    """An INTS attribute as a list, or ``default`` when the node leaves it out."""
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.value]


def float_attr(node: ir.Node, name: str, default: float | None = None) -> float | None:
    """A FLOAT attribute as ``float``, or ``default`` when the node leaves it out."""
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def string_attr(node: ir.Node, name: str, default: str | None = None) -> str | None:
    """A STRING attribute as ``str``, or ``default`` when the node leaves it out."""
    attr = node.attributes.get(name)
    return default if attr is None else str(attr.value)
