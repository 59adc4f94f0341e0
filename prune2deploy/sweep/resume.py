"""Resuming a sweep: which variants already finished, with numbers read from their own output folders.

``sweep.json`` says which variants ran; it is not trusted for anything else. A finished variant is shown
with the numbers of its own ``report.json`` (and the quality record the task wrote beside it), read again
on every resume, and only when its output folder is a relative path inside the sweep's folder. An entry
that fails any of these checks is not resumed: its variant runs again. So an edited sweep.json can neither
point sweep.html at another place (``href="javascript:…"``, ``../../elsewhere``) nor show numbers that no
variant measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

from prune2deploy.errors import BadInputError
from prune2deploy.io import atomic_write_json
from prune2deploy.limits import SWEEP_RECORD_BYTES
from prune2deploy.sweep.report import variant_problem
from prune2deploy.sweep.spec import Variant
from prune2deploy.sweep.task import summarize_report

__all__ = [
    "QUALITY_DIR",
    "previous_entries",
    "quality_path",
    "resumed_entry",
    "safe_out",
    "write_quality",
]

log = logging.getLogger(__name__)

#: ``OUT/quality/<variant id>.json``: each variant's quality record, outside its compile folder (whose
#: manifest lists every file it holds) so that a re-run may still replace that folder.
QUALITY_DIR = "quality"


def previous_entries(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The entries of an earlier run's ``sweep.json`` by variant id ({} when there is none).

    Raises:
        BadInputError: sweep.json parses but is not a sweep record (a list, a mapping without a list of
            variants): it is some other file, which this sweep would overwrite.
    """
    path = out_dir / "sweep.json"
    if not path.is_file():
        return {}
    if path.stat().st_size > SWEEP_RECORD_BYTES:
        raise BadInputError(
            f"{path}: {path.stat().st_size} bytes; a sweep.json is at most {SWEEP_RECORD_BYTES} bytes. Choose another "
            "--out, or move the file away"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; no variant is resumed from it", path)
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("variants"), list):
        found = type(record).__name__ if not isinstance(record, dict) else "a mapping without a 'variants' list"
        raise BadInputError(
            f"{path}: not a sweep.json of prune2deploy sweep (found {found}; expected a mapping with a "
            "'variants' list). Choose another --out, or move the file away; the sweep would overwrite it"
        )
    return {v["id"]: v for v in record["variants"] if isinstance(v, dict) and isinstance(v.get("id"), str)}


def safe_out(out: Any, out_dir: Path) -> str | None:
    """``out`` when it is a plain relative path that stays inside ``out_dir`` (symlinks resolved), else None.

    Only such a path may name a variant's folder or become a link in sweep.html.
    """
    if not isinstance(out, str) or not out or "\\" in out or ":" in out:
        return None
    parts = PurePosixPath(out).parts
    if PurePosixPath(out).is_absolute() or any(p in ("..", ".") for p in parts) or out.startswith("~"):
        return None
    root = out_dir.resolve()
    target = (root / out).resolve()
    return out if target != root and target.is_relative_to(root) else None


def quality_path(out_dir: Path, variant_id: str) -> Path:
    return out_dir / QUALITY_DIR / f"{variant_id}.json"


def write_quality(out_dir: Path, variant: Variant, quality: dict[str, Any] | None) -> None:
    """Records a finished variant's quality where a resume reads it back (bound to its id and hash)."""
    atomic_write_json(quality_path(out_dir, variant.id), {"id": variant.id, "hash": variant.hash, "quality": quality})


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing, larger than :data:`SWEEP_RECORD_BYTES` or not JSON."""
    try:
        if path.stat().st_size > SWEEP_RECORD_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _why_not(variant: Variant, old: Any, out_dir: Path) -> str | None:
    """Why an earlier entry cannot be resumed (None: it can)."""
    if not isinstance(old, dict) or old.get("error") is not None:
        return "it did not finish"
    if old.get("hash") != variant.hash:
        return "its options changed"
    if safe_out(old.get("out"), out_dir) is None:
        return f"its out {str(old.get('out'))[:80]!r} is not a relative path inside the sweep folder"
    if old["out"] != variant.id:  # the sweep writes each variant into the folder named by its id
        return f"its out {old['out'][:80]!r} is not the variant's folder {variant.id}"
    if not isinstance(_read_json(out_dir / old["out"] / "report.json"), dict):
        return f"{old['out']}/report.json is missing or not JSON"
    saved = _read_json(quality_path(out_dir, variant.id))
    if not isinstance(saved, dict) or saved.get("id") != variant.id or saved.get("hash") != variant.hash:
        return f"{QUALITY_DIR}/{variant.id}.json is missing, unreadable or another variant's"
    return None


def resumed_entry(variant: Variant, old: Any, out_dir: Path) -> dict[str, Any] | None:
    """The variant's entry rebuilt from its own files, or None when it must run again (logged, with why).

    Kept from sweep.json: only the node it ran on and its MLflow run id (labels, escaped where shown).
    """
    why = _why_not(variant, old, out_dir)
    entry = None
    if why is None:
        node = old.get("node") if isinstance(old.get("node"), str) else "unknown"
        try:
            numbers = summarize_report(_read_json(out_dir / old["out"] / "report.json"), node=node)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why, numbers = f"{old['out']}/report.json is not a compile report ({type(exc).__name__}: {exc})", None
        if numbers is not None:
            entry = {
                "id": variant.id,
                "hash": variant.hash,
                "options": variant.options(),
                "out": old["out"],
                "error": None,
                "node": node,
                **numbers,
                "quality": _read_json(quality_path(out_dir, variant.id))["quality"],
                "mlflow_run_id": old.get("mlflow_run_id") if isinstance(old.get("mlflow_run_id"), str) else None,
                "resumed": True,
            }
            why = variant_problem(entry)
            entry = None if why else entry
    if why and isinstance(old, dict) and old.get("error") is None:
        log.warning("variant %s is run again instead of resumed: %s", variant.id, why)
    return entry
