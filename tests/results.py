"""Reading a pass's typed result in tests: one flat mapping of its record, name, exactness and refusals."""

from __future__ import annotations

from typing import Any

from prune2deploy.passes.base import P2DResult


def outcome(result: P2DResult) -> dict[str, Any]:
    """``result.record`` plus ``pass``, ``exact``, ``modified`` and ``refused`` (where → reason)."""
    return {
        **result.record,
        "pass": result.name,
        "exact": result.exact,
        "modified": result.modified,
        "refused": result.refused,
    }
