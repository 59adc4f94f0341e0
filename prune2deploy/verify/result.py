"""The verdict of a verification and the words a person reads about it.

Kept apart from the runs that produce it because the report, the HTML page, the CLI and the sweep read a
verdict (often from report.json, long after the run) without running anything.

An exact pipeline's error is held to a *bound*: the user's ``tolerance`` where the comparison ran in fp64
(rounding there is about 1e-14 of the outputs' scale, far below any tolerance), and
``max(tolerance, NOISE_FACTOR × floor)`` where it ran in fp32, ``floor`` being how far float rounding alone
moves this model's outputs (docs/exactness.md has the measurements behind both numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "EXACT_TOLERANCE",
    "NOISE_FACTOR",
    "Verification",
    "bound_for",
    "verdict_line",
    "verdict_status",
    "verification_notes",
]

#: Default relative error (max |diff| / max |reference|) an exact pipeline may show beyond float rounding.
EXACT_TOLERANCE = 1e-4

#: How many times its measured rounding noise floor an fp32 comparison may differ before it fails. Correct
#: SmolLM2 compiles measured 0.5–6.6 times the floor (fused graphs the most), one wrong MLP channel of the
#: same model 51–300 times it; 20 sits between the two, about 3× from each (docs/exactness.md).
NOISE_FACTOR = 20.0


def bound_for(tolerance: float, floor: float | None) -> float:
    """The error an exact comparison may reach: the tolerance, raised to ``NOISE_FACTOR × floor`` in fp32."""
    return tolerance if floor is None else max(tolerance, NOISE_FACTOR * floor)


@dataclass
class Verification:
    """Per-output errors over all feed sets, and the verdict on them.

    ``status`` is ``passed`` (exact and within the bound), ``approximate`` (an approximate pipeline: its error
    is reported, never held to the exact bound) or ``failed``. Non-finite values the reference does not have
    (NaN/Inf in the compiled output where the reference is finite), a shape mismatch, or an output of which
    no value could be compared (NaN in both everywhere) fail whatever the pipeline. Python's ``max`` and ``>``
    skip NaN; nothing here relies on them for NaN.

    ``precision`` says what the models were compared in (``fp64``, ``fp32``; blockwise runs can mix them,
    per block). ``floors`` holds, per output, the rounding noise measured on the reference when the
    comparison ran in fp32 (none in fp64, where rounding cannot reach the tolerance).
    """

    exact: bool
    tolerance: float
    feeds: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mode: str = "whole"  # "whole" | "blockwise" (see verify_blockwise)
    blocks: list[dict] = field(default_factory=list)  # blockwise: per block, its input and output errors
    precision: str = "fp32"
    floors: dict[str, float] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        found = []
        for name, o in self.outputs.items():
            if o.get("shape_mismatch"):
                found.append(f"output '{name}': shape differs from the reference's")
            if o.get("nonfinite_new"):
                found.append(f"output '{name}': {o['nonfinite_new']} NaN/Inf values where the reference is finite")
            if o.get("compared") == 0 and o.get("nonfinite_both"):
                found.append(f"output '{name}': NaN/Inf in both models everywhere; nothing could be compared")
        return found

    @property
    def worst(self) -> float:
        values = [o["max_rel"] for o in self.outputs.values()] + [b["max_rel"] for b in self.blocks]
        if self.problems or any(v is None for v in values):
            return float("inf")
        return max(values, default=0.0)

    @property
    def cosine(self) -> float | None:
        values = [o["cosine"] for o in self.outputs.values() if o.get("cosine") is not None]
        return min(values) if values else None

    def bound(self, output: str | None = None) -> float:
        """The bound applied to ``output`` (the largest applied to any output when None)."""
        if output is not None:
            return bound_for(self.tolerance, self.floors.get(output))
        return max([self.tolerance, *(bound_for(self.tolerance, f) for f in self.floors.values())])

    def exceeded(self) -> list[str]:
        """Outputs and blocks whose error is above their bound (an unmeasurable error counts as above)."""
        over = [
            f"output '{name}'"
            for name, o in self.outputs.items()
            if o["max_rel"] is None or o["max_rel"] > self.bound(name)
        ]
        for block in self.blocks:
            limit = block.get("bound", self.tolerance)
            if block["max_rel"] is None or block["max_rel"] > limit:
                over.append(f"block {block['block']}")
        return over

    @property
    def status(self) -> str:
        if self.problems:
            return "failed"
        if not self.exact:
            return "approximate"
        return "failed" if self.exceeded() else "passed"

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def as_dict(self) -> dict:
        worst = self.worst
        return {
            "exact": self.exact,
            "passed": self.passed,
            "status": self.status,
            "tolerance": self.tolerance,
            "bound": self.bound(),
            "precision": self.precision,
            "worst": worst if np.isfinite(worst) else None,
            "cosine": self.cosine,
            "problems": self.problems,
            "notes": self.notes,
            "feeds": self.feeds,
            "outputs": self.outputs,
            "mode": self.mode,
            **({"floors": self.floors} if self.floors else {}),
            **({"blocks": self.blocks} if self.blocks else {}),
        }


def verdict_status(verification: Mapping) -> str:
    """``passed`` / ``approximate`` / ``failed`` of a verification dict (also one written before ``status``)."""
    if verification.get("status"):
        return str(verification["status"])
    if not verification.get("passed", True):
        return "failed"
    return "passed" if verification.get("exact", True) else "approximate"


def _worst_and_cosine(verification: Mapping) -> tuple[float | None, float | None]:
    """From the dict's own fields, or from its outputs for dicts written before those fields existed."""
    outputs = (verification.get("outputs") or {}).values()
    worst, cosine = verification.get("worst"), verification.get("cosine")
    if "worst" not in verification:
        values = [o.get("max_rel") for o in outputs]
        worst = None if any(v is None for v in values) else max(values, default=0.0)
    if "cosine" not in verification:
        values = [o["cosine"] for o in outputs if o.get("cosine") is not None]
        cosine = min(values) if values else None
    return worst, cosine


def verdict_line(verification: Mapping) -> str:
    """One line a person reads: PASSED only for an exact pipeline within its bound.

    An approximate pipeline is labelled with its error and cosine, never PASSED (docs/exactness.md).
    The line names the precision and, where an fp32 noise floor raised the bound above the tolerance, the
    bound, so that a reader sees why 3e-4 passed a 1e-4 tolerance. Takes :meth:`Verification.as_dict` (or
    report.json's ``verification``, also one written before precision and bounds were recorded).
    """
    status = verdict_status(verification)
    worst, cosine = _worst_and_cosine(verification)
    error = "inf/NaN" if worst is None else f"{worst:.2e}"
    feeds = len(verification.get("feeds") or [])
    if status == "approximate":
        cos = "n/a" if cosine is None else f"{cosine:.6f}"
        return f"approximate — error {error}, cosine {cos} (not held to the exact tolerance; {feeds} feed sets)"
    problems = "; ".join(verification.get("problems") or [])
    word = "PASSED" if status == "passed" else "FAILED"
    precision = verification.get("precision")
    tolerance = verification.get("tolerance", 0)
    limits = f"tolerance {tolerance:g}"
    bound = verification.get("bound")
    if bound is not None and bound > tolerance:
        limits += f", bound {bound:.2g} = {NOISE_FACTOR:g} × the fp32 noise floor"
    where = f" in {precision}" if precision else ""
    line = f"{word}: worst relative error {error}{where} ({limits}, {feeds} feed sets)"
    return line + (f": {problems}" if problems else "")


def verification_notes(verification: Mapping) -> list[str]:
    """What a verdict does not say: values that are NaN/Inf in both models are reported, not compared."""
    notes = list(verification.get("notes") or [])
    for name, o in (verification.get("outputs") or {}).items():
        if o.get("nonfinite_both"):
            notes.append(
                f"output '{name}': {o['nonfinite_both']} values are NaN/Inf in both the reference and the compiled "
                "model (not compared)"
            )
    return notes
