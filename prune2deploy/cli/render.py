"""Numbers and tables for the console: the one place the CLI formats them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prune2deploy.units import count

__all__ = ["count", "indent", "percent", "table"]


def percent(fraction: float) -> str:
    """``0.25`` → ``25%``; one decimal where the whole number would hide a difference."""
    value = 100 * fraction
    return f"{value:.0f}%" if abs(value - round(value)) < 0.05 else f"{value:.1f}%"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Plain-text columns, left-aligned, with a dashed line under the header."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def indent(text: str, prefix: str = "    ") -> str:
    """Every line of ``text`` indented by ``prefix`` (a table under a heading)."""
    return prefix + text.replace("\n", "\n" + prefix)
