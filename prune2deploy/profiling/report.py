"""The compile report: its JSON schema, validation, and writing report.json + report.html together.

report.json is the machine-readable record (CI diffs it, dashboards read it); report.html is the same
data for people. Both are written atomically so a crash never leaves a report that disagrees with itself.
The schema (report.schema.json, shipped next to this module) requires only what every run knows —
``schema_version``, ``tool``, ``input``, ``options`` — and types every section a run may add.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError, ConfigError, P2DError
from prune2deploy.io import atomic_write_json, atomic_write_text
from prune2deploy.profiling.report_html import render_html

__all__ = [
    "SCHEMA_VERSION",
    "latency_sections",
    "render_html",
    "report_schema",
    "validate_report",
    "write_report",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("prune2deploy.profiling").joinpath("report.schema.json").read_text(encoding="utf-8")


def report_schema() -> dict[str, Any]:
    """The JSON schema of report.json (a fresh copy; callers may modify it)."""
    return json.loads(_schema_text())


def validate_report(report: dict[str, Any]) -> None:
    """Checks ``report`` against the schema.

    Raises:
        BadInputError: naming the JSON path of the most relevant error (``$.latency[0].median_ms``) and
            what is wrong there, so the writer of the bad field is found at once.
        P2DError: jsonschema is not installed.
    """
    try:
        import jsonschema
        from jsonschema.exceptions import best_match
    except ImportError as exc:
        raise P2DError("validating a report needs jsonschema: pip install jsonschema") from exc
    validator = jsonschema.Draft202012Validator(report_schema())
    error = best_match(validator.iter_errors(report))
    if error is None:
        return
    message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
    raise BadInputError(f"report does not match report.schema.json at {error.json_path}: {message}")


def write_report(out_dir: Path | str, report: dict[str, Any], *, validate: bool = True) -> tuple[Path, Path]:
    """Validates ``report`` and writes ``report.json`` and ``report.html`` into ``out_dir`` atomically.

    The HTML is rendered before anything is written, so a rendering failure leaves no half report.

    Returns:
        The paths of report.json and report.html.
    """
    if validate:
        validate_report(report)
    page = render_html(report)
    out = Path(out_dir)
    json_path, html_path = out / "report.json", out / "report.html"
    atomic_write_json(json_path, report)
    atomic_write_text(html_path, page)
    log.info("wrote %s and %s", json_path, html_path)
    return json_path, html_path


def latency_sections(
    rows: Sequence[Mapping[str, Any]],
    *,
    ideal: float | Mapping[tuple[int, int | None], float] | None = None,
    target_ci: float = 0.02,
) -> dict[str, list[dict[str, Any]]]:
    """Turns :func:`~prune2deploy.profiling.measure.compare_models` rows into report.json's sections.

    Args:
        rows: latency and speedup rows; models must be named ``"reference"`` and ``"compiled"``.
        ideal: the ideal speedup, reference FLOPs / compiled FLOPs (the one meaning of "ideal", as in the
            predictions' ``ideal_speedup``), one number for every shape or one per (batch, seq); written as
            each speedup row's ``ideal_speedup``; None leaves it null.
        target_ci: the relative half width of the medians' 95 % CI that the measurement aimed for; each
            speedup row says whether both medians reached it (``tight``) and its own 95 % CI (``ci``).

    Returns:
        ``{"latency": [...], "speedup": [...]}`` ready to merge into the report.
    """
    latency, speedup = [], []
    by_shape = {
        (r.get("engine"), r.get("model"), r["batch"], r.get("seq")): r
        for r in rows
        if r.get("kind", "latency") == "latency"
    }
    for row in rows:
        kind = row.get("kind", "latency")
        entry = {k: v for k, v in row.items() if k != "kind"}
        if kind == "latency":
            if entry.get("model") not in ("reference", "compiled"):
                raise ConfigError(
                    f"latency row for model {entry.get('model')!r}: report.json names the measured models "
                    "'reference' and 'compiled'; pass them to compare_models under those names"
                )
            latency.append(entry)
        elif kind == "speedup":
            shape = (entry["batch"], entry.get("seq"))
            expected = ideal.get(shape) if isinstance(ideal, Mapping) else ideal
            key = (entry["engine"], entry["batch"], entry.get("seq"))
            speedup.append(
                {
                    "engine": entry["engine"],
                    "batch": entry["batch"],
                    "seq": entry.get("seq"),
                    "measured": entry["measured"],
                    "ideal_speedup": expected,
                    **_speedup_ci(
                        by_shape.get((key[0], "reference", *key[1:])), by_shape.get((key[0], "compiled", *key[1:])),
                        target_ci,
                    ),
                }
            )  # fmt: skip
    return {"latency": latency, "speedup": speedup}


def _speedup_ci(reference: Mapping[str, Any] | None, compiled: Mapping[str, Any] | None, target: float) -> dict:
    """The speedup's 95 % interval from the two medians' intervals (ratio of the far ends, so conservative),
    the runs behind it, and whether both medians were known to ``target`` when the measurement stopped."""
    if not reference or not compiled:
        return {}
    import math

    ref_ci, new_ci = reference.get("rel_ci"), compiled.get("rel_ci")
    out: dict[str, Any] = {"runs": min(reference.get("runs", 0), compiled.get("runs", 0)), "target_ci": target}
    if ref_ci is None or new_ci is None:
        return out
    tight = ref_ci <= target and new_ci <= target
    out["tight"] = bool(tight)
    if math.isfinite(ref_ci) and math.isfinite(new_ci) and new_ci < 1:
        ref_ms, new_ms = reference["median_ms"], compiled["median_ms"]
        low = ref_ms * (1 - ref_ci) / (new_ms * (1 + new_ci))
        high = ref_ms * (1 + ref_ci) / (new_ms * (1 - new_ci))
        out["ci"] = [max(low, 0.0), high]
    return out
