"""One variant's work, as it runs inside a Ray task: compile the cached dense ONNX with the variant's masks,
then measure its quality against the dense model.

Kept free of Ray so that it can be tested (and debugged) as a plain function. It never raises: a variant
that fails returns its error, so one bad grid point cannot stop a sweep.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["quality_input", "run_variant", "summarize_report"]

log = logging.getLogger(__name__)


def summarize_report(report: dict[str, Any], *, node: str) -> dict[str, Any]:
    """The part of a compile's report.json that a sweep compares: size, cost, latency, verification."""
    model = report.get("model", {})
    latency: list[dict[str, Any]] = []
    measured = {(r["batch"], r.get("seq"), r["model"]): r for r in report.get("latency", [])}
    for row in report.get("speedup", []):
        ref = measured.get((row["batch"], row.get("seq"), "reference"))
        new = measured.get((row["batch"], row.get("seq"), "compiled"))
        latency.append(
            {
                "target": f"{row['engine']}@{node}",
                "kind": "measured",
                "engine": row["engine"],
                "batch": row["batch"],
                "seq": row.get("seq"),
                "reference_ms": ref["median_ms"] if ref else None,
                "compiled_ms": new["median_ms"] if new else None,
                "speedup": row["measured"],
            }
        )
    for row in report.get("predictions", []):
        latency.append(
            {
                "target": row["gpu"],
                "kind": "predicted",
                "engine": row.get("engine", "tensorrt"),
                "batch": row["batch"],
                "seq": row.get("seq"),
                "reference_ms": row.get("reference_ms"),
                "compiled_ms": row["compiled_ms"],
                "speedup": row.get("speedup"),
            }
        )
    verification = report.get("verification", {})
    worst = max((o.get("max_rel", 0.0) for o in verification.get("outputs", {}).values()), default=None)
    return {
        "params": {k: model.get(k, {}).get("params") for k in ("reference", "compiled")},
        "flops": {k: model.get(k, {}).get("flops") for k in ("reference", "compiled")},
        "latency_ms": latency,
        "speedup": next((r["speedup"] for r in latency if r["kind"] == "measured"), None),
        "verification": {
            "passed": bool(verification.get("passed", False)),
            "exact": verification.get("exact"),
            "worst": worst,
            "tolerance": verification.get("tolerance"),
        },
        "passes": [entry["pass"] for entry in report.get("passes", []) if entry.get("modified")],
        "timings": report.get("timings", {}),
    }


def quality_input(task: str, tokenizer: Any, vocab_size: int | None, settings: dict[str, Any]) -> dict[str, Any]:
    """What every variant's quality measurement needs, prepared once by the driver (small, picklable).

    Causal LMs get token ids of the bundled evaluation text (random ids from a seeded generator when the
    checkpoint has no tokenizer: they still measure how far the pruned distribution moved); encoders get
    the tokenizer itself (sentences are tokenized with padding per batch).
    """
    if not settings.get("enabled", True):
        return {"kind": None, "reason": "quality disabled in the sweep file"}
    if task == "causal-lm":
        need = settings["window"] * settings["windows"]
        if tokenizer is not None:
            from prune2deploy.pruning.calibration import bundled_text

            ids = tokenizer(bundled_text("evaluation.txt"))["input_ids"]
            return {"kind": "lm", "token_ids": list(ids[:need]), "text": "bundled:evaluation.txt", **settings}
        import numpy as np

        ids = np.random.default_rng(0).integers(0, vocab_size or 100, size=need).tolist()
        return {"kind": "lm", "token_ids": ids, "text": "random ids (the checkpoint has no tokenizer)", **settings}
    if tokenizer is None:
        return {"kind": None, "reason": "the encoder checkpoint has no tokenizer to embed sentences with"}
    return {"kind": "encoder", "tokenizer": tokenizer, "text": "bundled:evaluation.txt", **settings}


def _quality(dense: Path, compiled: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    from prune2deploy.quality import encoder_quality, lm_quality

    if spec.get("kind") == "lm":
        result = lm_quality(
            str(dense), str(compiled), token_ids=spec["token_ids"], window=spec["window"], max_windows=spec["windows"]
        )
        return {"kind": "lm", "text": spec["text"], **result.to_dict()}
    if spec.get("kind") == "encoder":
        result = encoder_quality(
            str(dense), str(compiled), tokenizer=spec["tokenizer"], max_sentences=spec["sentences"]
        )
        return {"kind": "encoder", "text": spec["text"], **result.to_dict()}
    return None


def run_variant(job: dict[str, Any], quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compiles one variant and measures it; returns its sweep entry fragment (never raises).

    ``job``: ``id``, ``dense`` (the cached dense ONNX), ``out`` (the variant's output folder), ``plan``
    (its plan.yaml), ``compile`` (CompileOptions keys). ``quality``: from :func:`quality_input` (shared by
    every variant: Ray passes it once through its object store), None to skip.
    """
    from prune2deploy.driver.compile import compile_model
    from prune2deploy.errors import VerificationError
    from prune2deploy.spec import CompileOptions

    start = time.perf_counter()
    node = socket.gethostname()
    entry: dict[str, Any] = {"id": job["id"], "node": node, "error": None}
    out = Path(job["out"])
    try:
        dense = Path(job["dense"])
        if not dense.is_file():
            raise FileNotFoundError(
                f"{dense}: the cached dense export is not visible on worker {node}; on a multi-machine cluster "
                "the sweep's --out and --cache folders must be on storage every worker mounts (docs/sweep.md)"
            )
        options = CompileOptions.from_dict(
            {**job["compile"], "plan": job["plan"], "overwrite": True}, source=f"variant {job['id']}"
        )
        t0 = time.perf_counter()
        try:
            report = compile_model(dense, out, options).report
        except VerificationError as exc:  # the folder is written: record what it measured, and the error
            report = json.loads((out / "report.json").read_text())
            entry["error"] = f"VerificationError: {exc}"
        compile_s = time.perf_counter() - t0
        entry.update(summarize_report(report, node=node))
        t0 = time.perf_counter()
        entry["quality"] = _quality(dense, out / "model.onnx", quality or {})
        entry["timings"] = {**entry.get("timings", {}), "compile_s": compile_s, "quality_s": time.perf_counter() - t0}
    except Exception as exc:  # one variant's failure is its record, not the sweep's end
        log.info("variant %s failed", job["id"], exc_info=True)
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc(limit=8)
    entry["seconds"] = time.perf_counter() - start
    return entry
