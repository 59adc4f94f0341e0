"""The cost model against published measurements (``published.json``): per figure, per workload, overall.

A figure is a published latency or throughput of one model on one GPU (with its source); the model's
shape comes from the file's ``models`` section, so validating needs neither weights nor a GPU. Every
figure is compared as milliseconds per step: latency as published, throughput as 1000 / rate (per token
for decode, per sample for offline throughput).
"""

from __future__ import annotations

import importlib.resources
import json
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prune2deploy.profiling.costmodel import price
from prune2deploy.profiling.roofline import GPUSpec, load_catalog
from prune2deploy.profiling.shape_only import model_kernels, shape_from_config

__all__ = ["Comparison", "compare_published", "load_published", "orderings", "summary"]


@dataclass(frozen=True)
class Comparison:
    id: str
    workload: str
    model: str
    gpu: str
    precision: str
    batch: int
    seq: int
    sparse: bool
    published_ms: float
    predicted_ms: float
    lower_bound_ms: float
    binding: str

    @property
    def error(self) -> float:
        """Signed relative error of the prediction (positive: predicted slower than published)."""
        return self.predicted_ms / self.published_ms - 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error": self.error}


def load_published() -> dict[str, Any]:
    """The packaged data file (schema: ``published.schema.json`` next to it)."""
    text = importlib.resources.files("prune2deploy.profiling").joinpath("published.json").read_text("utf-8")
    return json.loads(text)


def _published_ms(figure: Mapping[str, Any]) -> float:
    if figure["metric"] == "latency_ms":
        return float(figure["value"])
    return 1000.0 / float(figure["value"])


def compare_published(
    data: Mapping[str, Any] | None = None, catalog: Mapping[str, GPUSpec] | None = None
) -> list[Comparison]:
    """Predicted vs published for every figure of ``data`` (the packaged file by default)."""
    data = data or load_published()
    catalog = catalog or load_catalog()
    rows = []
    for fig in data["figures"]:
        shape = shape_from_config(data["models"][fig["model"]])
        kernels = model_kernels(
            shape,
            batch=fig["batch"],
            seq=fig["seq"],
            past=fig.get("past", 0),
            decode=fig.get("decode", False),
            precision=fig["precision"],
            engine=fig["engine"],
            sparse=fig.get("sparse", False),
        )
        pred = price(kernels, catalog[fig["gpu"]], precision=fig["precision"], engine=fig["engine"])
        per = fig["batch"] if fig["metric"] == "samples_per_s" else 1
        rows.append(
            Comparison(
                fig["id"], fig["workload"], fig["model"], fig["gpu"], fig["precision"], fig["batch"], fig["seq"],
                fig.get("sparse", False), _published_ms(fig), pred.latency_ms / per, pred.lower_bound_ms / per,
                pred.binding,
            )
        )  # fmt: skip
    return rows


def orderings(rows: list[Comparison]) -> list[dict[str, Any]]:
    """Per workload setting (model, precision, batch, seq, sparsity) with ≥ 2 GPUs: both GPU orders."""
    groups: dict[tuple, list[Comparison]] = {}
    for r in rows:
        groups.setdefault((r.workload, r.model, r.precision, r.batch, r.seq, r.sparse), []).append(r)
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        published = [r.gpu for r in sorted(members, key=lambda r: r.published_ms)]
        predicted = [r.gpu for r in sorted(members, key=lambda r: r.predicted_ms)]
        out.append({"setting": key, "published": published, "predicted": predicted, "holds": published == predicted})
    return out


def summary(rows: list[Comparison]) -> dict[str, Any]:
    errors = [abs(r.error) for r in rows]
    by_workload = {}
    for r in rows:
        by_workload.setdefault(r.workload, []).append(abs(r.error))
    orders = orderings(rows)
    return {
        "figures": len(rows),
        "gpus": sorted({r.gpu for r in rows}),
        "workloads": sorted(by_workload),
        "median_abs_error": statistics.median(errors) if errors else None,
        "median_abs_error_by_workload": {w: statistics.median(e) for w, e in by_workload.items()},
        "orderings_held": sum(o["holds"] for o in orders),
        "orderings": len(orders),
    }
