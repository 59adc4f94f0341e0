"""How numbers read: the one formatter shared by the console (``cli/render``), report.html and the sweep page.

Plain text only (no escaping, no markup): each caller escapes for its own medium.
"""

from __future__ import annotations

from typing import Any

__all__ = ["count", "number"]


def number(value: Any, *, dash: str = "—") -> str:
    """A table cell: integers with separators, floats to 4 significant digits, booleans as yes/no,
    None as ``dash``; anything else as ``str``."""
    if value is None:
        return dash
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def count(n: float) -> str:
    """A count with a unit: ``1.23M``, ``45.60k``, ``812``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
