"""The pieces of ``report.json`` and ``manifest.json`` that the compile driver assembles."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from prune2deploy import __version__
from prune2deploy.driver.source import Source, input_record
from prune2deploy.io import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = [
    "blocked_hint",
    "costmodel_engine",
    "groups_summary",
    "model_summary",
    "predictions",
    "profile_section",
    "report_header",
    "versions",
    "write_manifest",
]

_LIBRARIES = ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch", "transformers", "safetensors", "numpy")


def versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def report_header(loaded: Source, options: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "tool": {"name": "prune2deploy", "version": __version__, "libraries": versions()},
        "input": input_record(loaded),
        "options": options.to_dict(),
    }


def model_summary(cost: Any) -> dict[str, int]:
    return {"params": int(cost.params), "flops": int(cost.flops), "nodes": len(cost.nodes)}


def groups_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Channel groups: how many, how many prunable and changed, and each blocked one with its reason.

    From the record that carries the channel-group counts (the pass that removes channels group by group).
    """
    for entry in records:
        record = entry["record"]
        if "groups_total" in record:
            return {
                "total": record["groups_total"],
                "prunable": record["groups_prunable"],
                "changed": record["groups_changed"],
                "blocked": [{**b, "hint": blocked_hint(b.get("reason", ""))} for b in record.get("blocked", [])],
            }
    return {}


#: A blocked group's reason (its start) → what it means for a user and which pass handles such channels.
_HINTS = {
    "Reshape creates this axis": "attention head structure: heads are removed whole by remove-heads (zero the "
    "head's o_proj columns / V rows), not channel by channel",
    "ReduceMean reduces over this axis": "the normalised residual stream: pruned by prune-hidden (--drop-hidden "
    "or zero channels in every writer), not by remove-channels",
    "LayerNormalization normalises over this axis": "the normalised residual stream: pruned by prune-hidden "
    "(--drop-hidden), not by remove-channels",
    "graph outputs keep their shape": "a model output: its width is part of the model's interface",
}


def blocked_hint(reason: str) -> str:
    """What a blocked group's reason means for the user ("" when there is nothing to add)."""
    return next((hint for start, hint in _HINTS.items() if reason.startswith(start)), "")


def keep_inputs(staging: Path, options: Any) -> dict[str, str]:
    """Copies the plan and the mask file into ``staging/inputs/``; option key → path inside the output folder.

    A compile whose masks came from a temporary folder (the demo's, a notebook's) can then be repeated from
    its output folder alone: ``compile MODEL --plan OUT/inputs/plan.yaml``.
    """
    kept: dict[str, str] = {}
    for key in ("plan", "masks"):
        source = getattr(options, key)
        if source is None:
            continue
        target = staging / "inputs" / Path(source).name
        target.parent.mkdir(exist_ok=True)
        atomic_write_bytes(target, Path(source).read_bytes())
        kept[key] = str(target.relative_to(staging))
    return kept


def write_manifest(staging: Path, loaded: Source, options: Any, *, kept: dict[str, str] | None = None) -> None:
    """manifest.json: tool and library versions, the input as read, the options, every output file's sha256.

    ``kept`` (from :func:`keep_inputs`) names the copies of the plan and masks inside the folder: the
    manifest points there instead of at files that may be gone.
    """
    kept = kept or {}
    files = [p for p in sorted(staging.iterdir()) if p.is_file()] + [staging / path for path in kept.values()]
    outputs = {str(p.relative_to(staging)): sha256_file(p) for p in files}
    masks = None
    if options.masks:
        masks = {"path": kept.get("masks", str(options.masks)), "sha256": sha256_file(options.masks)}
    manifest = {
        "tool": {"name": "prune2deploy", "version": __version__},
        "libraries": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": input_record(loaded),
        "masks": masks,
        "plan": kept.get("plan", str(options.plan)) if options.plan else None,
        "options": options.to_dict(),
        "outputs": outputs,
    }
    atomic_write_json(staging / "manifest.json", manifest)


def profile_section(
    reference_path: Path,
    model_path: Path,
    options: Any,
    ideal: float,
    *,
    baseline_path: Path | None = None,
    baseline_ideal: float | None = None,
) -> dict[str, Any]:
    """Reference vs compiled latency on ONNX Runtime CPU, in one run, over the options' grid.

    All are paths: ONNX Runtime reads each model's external data beside it. With ``baseline_path`` (``--baseline``)
    the dense baseline is timed in the same run: its rows join ``latency`` (``model: "baseline"``) and
    ``baseline_speedup`` holds compiled vs baseline, rows like ``speedup``'s (``baseline_ideal``: baseline FLOPs /
    compiled FLOPs)."""
    from prune2deploy.profiling.measure import compare_models
    from prune2deploy.profiling.report import latency_sections

    grid = [(b, s) for b in options.profile_batches for s in options.profile_seqs]
    models = {"reference": Path(reference_path), "compiled": Path(model_path)}
    if baseline_path is not None:
        models["baseline"] = Path(baseline_path)
    rows = compare_models(
        models,
        grid,
        threads=options.threads,
        reference="reference",
        budget_s=options.profile_budget_s,
        min_runs=5,  # the median of at least five runs, whatever the budget
    )
    sections = latency_sections([r for r in rows if r.get("model") != "baseline"], ideal=ideal)
    if baseline_path is not None:
        timed = [r for r in rows if r.get("kind", "latency") == "latency" and r.get("model") == "baseline"]
        sections["latency"] += [{k: v for k, v in r.items() if k != "kind"} for r in timed]
        sections["baseline_speedup"] = _over_baseline(rows, baseline_ideal)
    return sections


def _over_baseline(rows: list[dict[str, Any]], ideal: float | None) -> list[dict[str, Any]]:
    """Compiled vs baseline per engine and shape, as ``speedup`` rows (measured, ideal, 95 % CI, tight)."""
    from prune2deploy.profiling.report import latency_sections

    timed = [r for r in rows if r.get("kind", "latency") == "latency"]
    compiled = {(r["engine"], r["batch"], r.get("seq")): r for r in timed if r["model"] == "compiled"}
    pairs: list[dict[str, Any]] = []
    for row in (r for r in timed if r["model"] == "baseline"):
        new = compiled.get((row["engine"], row["batch"], row.get("seq")))
        if new is None:
            continue
        # latency_sections names the measured pair reference/compiled: the baseline stands in as the reference.
        speedup = {
            "kind": "speedup", "engine": row["engine"], "model": "compiled", "reference": "reference",
            "batch": row["batch"], "seq": row.get("seq"), "measured": row["median_ms"] / new["median_ms"],
        }  # fmt: skip
        pairs += [{**row, "model": "reference"}, new, speedup]
    return latency_sections(pairs, ideal=ideal)["speedup"]


def predictions(
    ref_cost: Any,
    new_cost: Any,
    options: Any,
    *,
    reference: Any = None,
    model_path: Path | None = None,
    engine: str | None = None,
) -> list[dict[str, Any]]:
    """Per-GPU predictions of the compiled model against the reference: the rows of
    :mod:`prune2deploy.profiling.prediction` (the same as ``prune2deploy predict model.onnx --against
    reference.onnx`` with the compile's engine, precision and shape), each with ``measured_ms`` (None here).

    ``ref_cost`` / ``new_cost`` are the unfused graphs' costs. Given the reference graph and the written
    ``model_path``, a model.onnx that carries fuse-ort's kernels is priced as written, against a copy of the
    reference fused the same way (its tensors shared), as ``predict`` does. ``engine``: the cost model's engine
    profile to price instead of the compile engine's (``tensorrt`` for the 2:4 estimate).
    """
    from prune2deploy.analysis.contrib_cost import fused_op_counts
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.profiling.prediction import Priced, compare_costs, compare_models, costmodel_engine

    precision = options.precision if options.precision != "fp32" else "fp16"
    where = {"gpus": options.gpus or None, "precision": precision, "engine": engine or costmodel_engine(options.engine)}
    written = load_onnx(model_path) if reference is not None and model_path is not None else None
    if written is not None and fused_op_counts(written):
        rows = compare_models(
            reference.clone(), written, batch=new_cost.batch or 1, seq=new_cost.seq or 128, reference_cost=ref_cost,
            **where,
        )  # fmt: skip
    else:
        rows = compare_costs(Priced(ref_cost, {}), Priced(new_cost, {}), **where)
    return [{**row, "measured_ms": None} for row in rows]


def costmodel_engine(engine: str | None) -> str:
    """The cost model's engine profile for a compile engine name (see :mod:`prune2deploy.profiling.prediction`)."""
    from prune2deploy.profiling.prediction import costmodel_engine as profile

    return profile(engine)
