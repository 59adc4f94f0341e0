"""The MLOps hook: each variant becomes an MLflow run, when MLflow is installed and asked for.

Active when ``mlflow`` imports and ``MLFLOW_TRACKING_URI`` is set (a server, ``sqlite:///mlflow.db``, or a
local ``file:`` store — MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for the last). Runs are logged by the
sweep's driver as variants finish, so workers need neither MLflow nor access to the tracking server.
Params are the variant's options (flattened: ``prune.mlp``, ``compile.engine``), metrics its latency per
target, speedup, quality and size, artifacts its report.json and report.html. A failed variant is a run
with status FAILED and its error as a tag. A tracking failure is logged and never fails the sweep.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["MLflowHook", "flatten", "variant_metrics"]

log = logging.getLogger(__name__)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b.c`` keys; lists as their JSON-ish text."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix.rstrip(".")] = data if not isinstance(data, (list, tuple)) else ",".join(map(str, data))
    return out


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def variant_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """Latency per target and grid point, speedup, quality, params and FLOPs of one variant."""
    metrics: dict[str, float] = {}
    for row in entry.get("latency_ms", []) or []:
        shape = f"b{row['batch']}_s{row.get('seq')}"
        name = _metric_name(f"{row['kind']}.{row['target']}.{shape}")
        if row.get("compiled_ms") is not None:
            metrics[f"latency_ms.{name}"] = float(row["compiled_ms"])
        if row.get("speedup") is not None:
            metrics[f"speedup.{name}"] = float(row["speedup"])
    if entry.get("speedup") is not None:
        metrics["speedup"] = float(entry["speedup"])
    for key, value in (entry.get("quality") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"quality.{key}"] = float(value)
    for key in ("params", "flops"):
        compiled = (entry.get(key) or {}).get("compiled")
        if compiled is not None:
            metrics[f"{key}.compiled"] = float(compiled)
    verification = entry.get("verification") or {}
    if verification.get("worst") is not None:
        metrics["verification.worst"] = float(verification["worst"])
    return metrics


class MLflowHook:
    """Logs each finished variant as one run of the experiment named after the sweep."""

    def __init__(self, experiment: str) -> None:
        import mlflow

        self.mlflow = mlflow
        self.experiment = experiment
        self.experiment_id = mlflow.set_experiment(experiment).experiment_id

    @classmethod
    def from_env(cls, experiment: str) -> MLflowHook | None:
        """The hook when MLflow is installed and ``MLFLOW_TRACKING_URI`` is set; otherwise None."""
        if not os.environ.get("MLFLOW_TRACKING_URI") or importlib.util.find_spec("mlflow") is None:
            return None
        try:
            return cls(experiment)
        except Exception as exc:  # a tracking server that is down must not stop a sweep
            log.warning("MLflow tracking at %s is unavailable (%s); variants are not logged", _uri(), exc)
            return None

    def log_variant(self, entry: dict[str, Any], out_dir: Path) -> str | None:
        """One run for ``entry``; returns its run id (None when logging failed)."""
        mlflow = self.mlflow
        try:
            with mlflow.start_run(experiment_id=self.experiment_id, run_name=entry["id"]) as run:
                params = {k: ("" if v is None else str(v)[:500]) for k, v in flatten(entry["options"]).items()}
                mlflow.log_params(params)
                mlflow.set_tags({"prune2deploy.variant": entry["id"], "prune2deploy.hash": entry["hash"]})
                metrics = variant_metrics(entry)
                if metrics:
                    mlflow.log_metrics(metrics)
                folder = Path(out_dir) / entry["out"]
                for name in ("report.json", "report.html"):
                    if (folder / name).is_file():
                        mlflow.log_artifact(str(folder / name))
                if entry.get("error"):
                    mlflow.set_tag("prune2deploy.error", entry["error"][:5000])
                    mlflow.end_run(status="FAILED")
                return run.info.run_id
        except Exception as exc:
            log.warning("MLflow: could not log variant %s (%s)", entry["id"], exc)
            return None


def _uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "")
