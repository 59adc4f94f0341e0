"""Output against output: the numbers every verdict is made of.

Errors are relative to the reference's scale (max |reference|) so that one bound serves logits and
hidden states alike; everything is computed in float64 whatever the models ran in, and every number is
finite or None so that the report stays valid JSON.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["compare_outputs", "keep_worst", "merge_worst", "relative_difference"]


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _mismatch() -> dict:
    return {
        "max_abs": None,
        "max_rel": None,
        "scale": None,
        "cosine": None,
        "shape_mismatch": True,
        "nonfinite_new": 0,
        "nonfinite_both": 0,
        "compared": 0,
    }


def compare_outputs(reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray]) -> dict:
    """Max abs, max relative (to the reference's scale) and cosine per output, plus non-finite counts.

    Errors are measured where both values are finite; ``nonfinite_new`` counts NaN/Inf in the compiled
    output where the reference is finite, and finite values where the reference is not (both are wrong, a
    failure); ``nonfinite_both`` where both are non-finite (reported); ``compared`` the values compared.
    """
    result = {}
    for name, ref in reference.items():
        ref64, out64 = np.asarray(ref).astype(np.float64), np.asarray(compiled[name]).astype(np.float64)
        if ref64.shape != out64.shape:
            result[name] = _mismatch()
            continue
        ref_ok, out_ok = np.isfinite(ref64), np.isfinite(out64)
        both = ref_ok & out_ok
        nonfinite_new = int(np.count_nonzero(ref_ok & ~out_ok)) + int(np.count_nonzero(~ref_ok & out_ok))
        nonfinite_both = int(np.count_nonzero(~ref_ok & ~out_ok))
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


def relative_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, float]:
    """max |a − b| / max |a| per output of ``a``, over values finite in both (0 where none are).

    The measure of a noise floor: two evaluations of the *same* model that differ only in rounding, so
    non-finite values and shapes are not judged here (the verdict's comparison does that).
    """
    found = {}
    for name, stats in compare_outputs(a, {n: b[n] for n in a}).items():
        found[name] = stats["max_rel"] if stats["max_rel"] is not None else 0.0
    return found


def merge_worst(worst: dict | None, stats: dict) -> dict:
    """The worse of two results for one output; counts add up over feed sets, the cosine is the lower."""
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


def keep_worst(worst: dict[str, dict], stats: Mapping[str, dict]) -> None:
    """Folds one feed set's results into ``worst`` (in place), output by output."""
    for name, entry in stats.items():
        worst[name] = merge_worst(worst.get(name), entry)
