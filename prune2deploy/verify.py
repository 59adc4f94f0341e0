"""Reference (masked) vs compiled: the proof that the compiled model computes what the pruned one did.

Both models run on the same feeds (random ones at several shapes, plus any the user gives). The error of
each output is measured relative to its scale (max |reference|), and an exact pipeline must stay within
:data:`EXACT_TOLERANCE` (DESIGN.md). Verification takes *runners* (anything with ``run(feeds) -> outputs``):
the reference on ONNX Runtime CPU fp32 against the compiled ONNX, and against every engine that can run on
this machine (the torch engine on CPU), not only ONNX Runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from prune2deploy.feeds import random_feeds
from prune2deploy.ort_session import make_session

__all__ = [
    "EXACT_TOLERANCE",
    "FeedSet",
    "OutputRunner",
    "Verification",
    "check_feeds",
    "compare_outputs",
    "feed_sets",
    "load_feeds",
    "verdict_line",
    "verdict_status",
    "verification_notes",
    "verify_models",
    "verify_runners",
]

#: (label, feeds by input name)
FeedSet = tuple[str, Mapping[str, np.ndarray]]


class OutputRunner(Protocol):
    """What verification needs of an engine: outputs by name for feeds by name."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class _SessionRunner:
    def __init__(self, session) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, dict(feeds)), strict=True))


log = logging.getLogger(__name__)

#: max |diff| / max(|reference|, 1e-6) allowed for an exact pipeline.
EXACT_TOLERANCE = 1e-4


@dataclass
class Verification:
    """Per-output errors over all feed sets.

    ``status`` is ``passed`` (exact and within the tolerance), ``approximate`` (an approximate pipeline:
    its error is reported, never held to the exact tolerance) or ``failed``. Non-finite values the reference
    does not have (NaN/Inf in the compiled output where the reference is finite), a shape mismatch, or an
    output of which no value could be compared (NaN in both everywhere) fail whatever the pipeline.
    Python's ``max`` and ``>`` skip NaN; nothing here relies on them for NaN.
    """

    exact: bool
    tolerance: float
    feeds: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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
        values = [o["max_rel"] for o in self.outputs.values()]
        if self.problems or any(v is None for v in values):
            return float("inf")
        return max(values, default=0.0)

    @property
    def cosine(self) -> float | None:
        values = [o["cosine"] for o in self.outputs.values() if o.get("cosine") is not None]
        return min(values) if values else None

    @property
    def status(self) -> str:
        if self.problems:
            return "failed"
        if not self.exact:
            return "approximate"
        return "passed" if self.worst <= self.tolerance else "failed"

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
            "worst": worst if np.isfinite(worst) else None,
            "cosine": self.cosine,
            "problems": self.problems,
            "notes": self.notes,
            "feeds": self.feeds,
            "outputs": self.outputs,
        }


def verdict_status(verification: Mapping) -> str:
    """``passed`` / ``approximate`` / ``failed`` of a verification dict (also one written before ``status``)."""
    if verification.get("status"):
        return str(verification["status"])
    if not verification.get("passed", True):
        return "failed"
    return "passed" if verification.get("exact", True) else "approximate"


def verdict_line(verification: Mapping) -> str:
    """One line a person reads: PASSED only for an exact pipeline within its tolerance.

    An approximate pipeline is labelled with its error and cosine, never PASSED (DESIGN.md, Exactness).
    Takes :meth:`Verification.as_dict` (or report.json's ``verification``).
    """
    status = verdict_status(verification)
    worst, cosine = verification.get("worst"), verification.get("cosine")
    if "worst" not in verification:
        values = [o.get("max_rel") for o in (verification.get("outputs") or {}).values()]
        worst = None if any(v is None for v in values) else max(values, default=0.0)
    if "cosine" not in verification:
        values = [o["cosine"] for o in (verification.get("outputs") or {}).values() if o.get("cosine") is not None]
        cosine = min(values) if values else None
    error = "inf/NaN" if worst is None else f"{worst:.2e}"
    feeds = len(verification.get("feeds") or [])
    if status == "approximate":
        cos = "n/a" if cosine is None else f"{cosine:.6f}"
        return f"approximate — error {error}, cosine {cos} (not held to the exact tolerance; {feeds} feed sets)"
    problems = "; ".join(verification.get("problems") or [])
    word = "PASSED" if status == "passed" else "FAILED"
    line = f"{word}: worst relative error {error} (tolerance {verification.get('tolerance', 0):g}, {feeds} feed sets)"
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


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compare_outputs(reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray]) -> dict:
    """Max abs, max relative (to the reference's scale) and cosine per output, plus non-finite counts.

    Errors are measured where both values are finite; ``nonfinite_new`` counts NaN/Inf in the compiled
    output where the reference is finite (a failure), ``nonfinite_both`` where both are non-finite (reported),
    ``compared`` the values compared. Every number is finite or None, so the report stays valid JSON.
    """
    result = {}
    for name, ref in reference.items():
        out = compiled[name]
        ref64, out64 = np.asarray(ref).astype(np.float64), np.asarray(out).astype(np.float64)
        if ref64.shape != out64.shape:
            result[name] = {
                "max_abs": None,
                "max_rel": None,
                "scale": None,
                "cosine": None,
                "shape_mismatch": True,
                "nonfinite_new": 0,
                "nonfinite_both": 0,
                "compared": 0,
            }
            continue
        ref_ok, out_ok = np.isfinite(ref64), np.isfinite(out64)
        both = ref_ok & out_ok
        nonfinite_new = int(np.count_nonzero(ref_ok & ~out_ok))
        nonfinite_both = int(np.count_nonzero(~ref_ok & ~out_ok))
        # Finite in the compiled output where the reference is not: as wrong as the other way round.
        nonfinite_new += int(np.count_nonzero(~ref_ok & out_ok))
        r, o = ref64[both], out64[both]
        diff = float(np.max(np.abs(r - o))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        denom = float(np.linalg.norm(r) * np.linalg.norm(o))
        cosine = float(np.sum(r * o) / denom) if denom else 1.0
        result[name] = {
            "max_abs": _finite_or_none(diff),
            "max_rel": _finite_or_none(diff / max(scale, 1e-6)),
            "scale": _finite_or_none(scale),
            "cosine": _finite_or_none(cosine),
            "nonfinite_new": nonfinite_new,
            "nonfinite_both": nonfinite_both,
            "compared": int(r.size),
        }
    return result


def _merge(worst: dict | None, stats: dict) -> dict:
    """The worse of two results for one output; counts add up over feed sets."""
    if worst is None:
        return dict(stats)

    def rel(o):
        return float("inf") if o["max_rel"] is None else o["max_rel"]

    merged = dict(worst if rel(worst) >= rel(stats) else stats)
    for key in ("nonfinite_new", "nonfinite_both", "compared"):
        merged[key] = worst.get(key, 0) + stats.get(key, 0)
    merged["shape_mismatch"] = bool(worst.get("shape_mismatch") or stats.get("shape_mismatch"))
    if not merged["shape_mismatch"]:
        merged.pop("shape_mismatch")
    cosines = [c for c in (worst.get("cosine"), stats.get("cosine")) if c is not None]
    merged["cosine"] = min(cosines) if cosines else None
    return merged


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    """User feeds: an ``.npz`` or safetensors file keyed by input name."""
    from prune2deploy.errors import BadInputError

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"feeds file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read feeds ({exc}); give an .npz or .safetensors file") from exc


def feed_sets(
    probe: ir.Model | None,
    *,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
) -> list[FeedSet]:
    """Random feeds at each (batch, seq) shape for ``probe``'s inputs, then the user's feed sets."""
    sets: list[FeedSet] = []
    if probe is not None:
        for index, (batch, seq) in enumerate(shapes):
            sets.append(
                (f"random batch={batch} seq={seq}", random_feeds(probe, batch=batch, seq=seq, seed=seed + index))
            )
    for i, feeds in enumerate(user_feeds):
        label = f"user feeds #{i + 1}"
        if probe is not None:
            check_feeds(probe, feeds, label)
        sets.append((label, feeds))
    return sets


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], label: str = "feeds") -> None:
    """User feeds must name the model's inputs with their dtype and rank, static dims, and finite floats.

    Raises:
        BadInputError: naming the input and what is wrong (exit code 2, not a verification failure).
    """
    from prune2deploy.errors import BadInputError
    from prune2deploy.feeds import feed_specs

    specs = {spec.name: spec for spec in feed_specs(model)}
    unknown = sorted(set(feeds) - set(specs))
    missing = sorted(set(specs) - set(feeds))
    if unknown or missing:
        raise BadInputError(
            f"{label}: the model's inputs are {sorted(specs)}"
            + (f"; unknown names {unknown}" if unknown else "")
            + (f"; missing {missing}" if missing else "")
        )
    for name, array in feeds.items():
        spec = specs[name]
        array = np.asarray(array)
        if array.dtype != np.dtype(spec.dtype):
            raise BadInputError(f"{label}: input '{name}' is {array.dtype}, the model wants {np.dtype(spec.dtype)}")
        if spec.dims and len(spec.dims) != array.ndim:
            raise BadInputError(
                f"{label}: input '{name}' has shape {array.shape}, the model wants rank {len(spec.dims)}"
            )
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise BadInputError(
                    f"{label}: input '{name}' has shape {array.shape}; axis {axis} must be {dim} ({spec.dims})"
                )
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise BadInputError(f"{label}: input '{name}' holds {bad} NaN/Inf values; verification needs finite feeds")


def verify_runners(
    reference: OutputRunner,
    compiled: OutputRunner,
    sets: Sequence[FeedSet],
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    outputs: Sequence[str] | None = None,
) -> Verification:
    """Runs both runners on every feed set and keeps each output's worst error."""
    verification = Verification(exact=exact, tolerance=tolerance)
    for label, feeds in sets:
        try:
            ref_out = reference.run(feeds)
        except Exception as exc:
            from prune2deploy.errors import BadInputError

            raise BadInputError(f"the reference does not run on {label}: {str(exc)[:300]}") from exc
        try:
            new_out = compiled.run(feeds)
        except Exception as exc:
            from prune2deploy.errors import VerificationError

            raise VerificationError(f"the compiled model does not run on {label}: {str(exc)[:300]}") from exc
        if outputs is not None:
            ref_out = {name: ref_out[name] for name in outputs}
        verification.feeds.append(label)
        missing = [name for name in ref_out if name not in new_out]
        if missing:
            from prune2deploy.errors import BadInputError

            raise BadInputError(
                f"the compiled model has no output {missing[0]!r} of the reference "
                f"(its outputs: {sorted(new_out)}); are these two versions of the same model?"
            )
        for name, stats in compare_outputs(ref_out, new_out).items():
            verification.outputs[name] = _merge(verification.outputs.get(name), stats)
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(sets))
    return verification


def verify_models(
    reference: ir.Model | bytes | Path,
    compiled: ir.Model | bytes | Path,
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
    compiled_is_input: bool = False,
) -> Verification:
    """Both models on ONNX Runtime CPU: random feeds (when ``reference`` is an onnx_ir model) + the user's."""

    def runner(model, what: str) -> _SessionRunner:
        if isinstance(model, ir.Model):
            model = ir.to_proto(model).SerializeToString()
        try:
            return _SessionRunner(make_session(model))
        except Exception as exc:
            if what == "the reference" or compiled_is_input:
                from prune2deploy.errors import BadInputError

                raise BadInputError(f"ONNX Runtime cannot load {what}: {str(exc)[:300]}") from exc
            raise

    ref_runner, out_runner = runner(reference, "the reference"), runner(compiled, "the compiled model")
    ref_inputs = sorted(i.name for i in ref_runner.session.get_inputs())
    new_inputs = sorted(i.name for i in out_runner.session.get_inputs())
    if ref_inputs != new_inputs or sorted(ref_runner.names) != sorted(out_runner.names):
        from prune2deploy.errors import BadInputError

        raise BadInputError(
            f"the models have different inputs or outputs ({new_inputs} → {sorted(out_runner.names)} vs the "
            f"reference's {ref_inputs} → {sorted(ref_runner.names)}); "
            "are these two versions of the same model?"
        )
    probe = reference if isinstance(reference, ir.Model) else None
    sets = feed_sets(probe, shapes=shapes, user_feeds=user_feeds, seed=seed)
    result = verify_runners(ref_runner, out_runner, sets, exact=exact, tolerance=tolerance, outputs=ref_runner.names)
    if probe is not None:
        from prune2deploy.feeds import unknown_ranges

        for name in unknown_ranges(probe):
            result.notes.append(
                f"input '{name}': its value range cannot be derived from the graph (not an index into a constant "
                "table, not compared with a constant, not cast to float), so random feeds held it at 0"
                + ("" if user_feeds else "; give --feeds with real values to verify what depends on it")
            )
    return result
