"""The cost model against published measurements (``published.json``): per figure, per workload, overall.

A figure is a published latency or throughput of one model on one GPU (with its source); the model's
shape comes from the file's ``models`` section, so validating needs neither weights nor a GPU. Every
figure is compared as milliseconds per step: latency as published, throughput as 1000 / rate (per token
for decode, per sample for offline throughput).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prune2deploy.profiling.costmodel import FITTED, factor, factors_set, price
from prune2deploy.profiling.roofline import GPUSpec, load_catalog
from prune2deploy.profiling.shape_only import model_kernels, shape_from_config

__all__ = [
    "Comparison",
    "compare_published",
    "cross_validate",
    "discordant_pairs",
    "exercised",
    "fit_factors",
    "load_published",
    "orderings",
    "source_group",
    "summary",
]


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
    source: str = ""

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


def source_group(figure: Mapping[str, Any]) -> str:
    """The publication a figure comes from: ``source.group`` when given, else the repository of its URL
    (``github.com/NVIDIA/TensorRT-LLM``, ``github.com/mlcommons/inference_results_v3.0`` …) or its host."""
    source = figure["source"]
    if source.get("group"):
        return str(source["group"])
    parts = source["url"].split("://", 1)[-1].split("/")
    return "/".join(parts[:3]) if parts[0] == "github.com" else parts[0]


def compare_published(
    data: Mapping[str, Any] | None = None,
    catalog: Mapping[str, GPUSpec] | None = None,
    *,
    only: set[str] | None = None,
    _kernels: dict[str, Any] | None = None,
) -> list[Comparison]:
    """Predicted vs published for every figure of ``data`` (the packaged file by default); ``only``: these ids."""
    data = data or load_published()
    catalog = catalog or load_catalog()
    cache = _kernels if _kernels is not None else {}
    rows = []
    for fig in data["figures"]:
        if only is not None and fig["id"] not in only:
            continue
        if fig["id"] not in cache:
            shape = shape_from_config(data["models"][fig["model"]])
            cache[fig["id"]] = model_kernels(
                shape,
                batch=fig["batch"],
                seq=fig["seq"],
                past=fig.get("past", 0),
                decode=fig.get("decode", False),
                precision=fig["precision"],
                engine=fig["engine"],
                sparse=fig.get("sparse", False),
            )
        pred = price(cache[fig["id"]], catalog[fig["gpu"]], precision=fig["precision"], engine=fig["engine"])
        per = fig["batch"] if fig["metric"] == "samples_per_s" else 1
        rows.append(
            Comparison(
                fig["id"], fig["workload"], fig["model"], fig["gpu"], fig["precision"], fig["batch"], fig["seq"],
                fig.get("sparse", False), _published_ms(fig), pred.latency_ms / per, pred.lower_bound_ms / per,
                pred.binding, source_group(fig),
            )
        )  # fmt: skip
    return rows


#: The values each fitted factor may take (:data:`~prune2deploy.profiling.costmodel.FITTED`).
GRIDS: dict[str, tuple[float, ...]] = {
    "gemm_efficiency.int8": tuple(round(0.3 + 0.05 * i, 2) for i in range(13)),
    "gemm_efficiency.fp8": tuple(round(0.3 + 0.05 * i, 2) for i in range(13)),
    "conv_efficiency": tuple(round(0.25 + 0.05 * i, 2) for i in range(12)),
    "launch_cycles.tensorrt": tuple(float(v) for v in range(1000, 20001, 1000)),
    "launch_overlap.tensorrt": tuple(round(0.1 * i, 1) for i in range(11)),
    "launch_cycles_pre_ampere": tuple(round(1.0 + 0.1 * i, 1) for i in range(21)),
}


def _setting_gpu_logs(rows: list[Comparison]) -> list[float]:
    """One log(predicted / published) per workload setting and GPU: the median of that GPU's figures there.

    Figures of one GPU in one setting are repeats of one measurement (MLPerf rounds, or partners' systems,
    a few software releases or hosts apart; the model prices them all the same): counted one by one, a GPU
    would weigh in the fit as often as it was submitted. Adding 15 such repeats of ResNet-50 batch 1 moved the
    per-figure fit from conv efficiency 0.6 to 0.25, the grid's edge, and Offline ResNet-50 to +57..+125%;
    counted once per GPU, the fit is the same with and without them (docs/cost-model.md). :func:`orderings`
    ranks GPUs by the same median.
    """
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r.workload, r.model, r.precision, r.batch, r.seq, r.sparse, r.gpu)
        groups.setdefault(key, []).append(math.log(r.predicted_ms / r.published_ms))
    return [statistics.median(logs) for logs in groups.values()]


def _loss(rows: list[Comparison]) -> tuple[float, float]:
    """Mean |log(predicted / published)| (symmetric in over- and under-prediction), then |median log error|,
    over workload settings and GPUs (:func:`_setting_gpu_logs`), not over figures.

    A mean, not a median: the median of ~20 settings and GPUs moves only when a setting crosses it, so a
    factor that prices a few GPUs alone (the pre-Ampere per-kernel cycles: T4 and Xavier) or one kind of
    kernel was left wherever the descent passed, and folds of the cross-validation returned overlaps of
    0.2 to 0.8 for the same figures (docs/cost-model.md round 5). Each setting and GPU still counts once, so
    one far-off GPU weighs as one. The second part breaks ties toward the issue's second target (median
    signed error within +-10%). Both parts are rounded to 1e-9 so that float noise never decides.
    """
    if not rows:
        return 0.0, 0.0
    logs = _setting_gpu_logs(rows)
    return round(statistics.fmean(abs(x) for x in logs), 9), round(abs(statistics.median(logs)), 9)


#: Where a fit starts, and what a factor keeps when the training figures do not exercise it: values from the
#: cited measurements alone, never from published.json (the shipped values are fitted on all of it, so starting
#: from them, or keeping them, would leak the held-out figures into their own prediction). Efficiencies: the
#: cuBLAS 4096^3 fp16 measurement on H100 (0.75, costmodel.FACTORS["gemm_efficiency"]) for int8 and convs;
#: fp8: FBGEMM's row-scaled fp8 GEMM at 8192^3 on an H100 (500 W), 1125.51 TFLOP/s = 0.57 of 1979
#: (https://github.com/pytorch/FBGEMM/pull/2546), on the grid 0.55; per-kernel cost: 4 us at A100's 1410 MHz,
#: the top of the 2-5 us CUDA launch cost (NVIDIA, 'Getting Started with CUDA Graphs'). No measurement splits
#: the per-kernel cost into a floor the work hides and a gap: the overlap starts in the middle (0.5); the
#: pre-Ampere multiplier starts at 1.0 (no difference between generations).
PRIORS: dict[str, float] = {
    "gemm_efficiency.int8": 0.75,
    "gemm_efficiency.fp8": 0.55,
    "conv_efficiency": 0.75,
    "launch_cycles.tensorrt": 5640.0,
    "launch_overlap.tensorrt": 0.5,
    "launch_cycles_pre_ampere": 1.0,
}

#: A fitted factor is refit on a set of figures only when it moves at least this many of them by at least
#: :data:`EXERCISED_BY` when it changes by a quarter; otherwise (int8 GEMM efficiency without the int8 BERT
#: figures: only ResNet-50's classifier GEMM uses it) the fit would follow noise, and the prior stays.
EXERCISED_FIGURES = 2
EXERCISED_BY = 0.05


def exercised(
    name: str,
    data: Mapping[str, Any],
    catalog: Mapping[str, GPUSpec],
    *,
    only: set[str] | None = None,
    _kernels: dict[str, Any] | None = None,
) -> bool:
    """Whether the figures ``only`` (all by default) depend on the fitted factor ``name`` enough to fit it."""
    cache = _kernels if _kernels is not None else {}
    base = compare_published(data, catalog, only=only, _kernels=cache)
    with factors_set({name: factor(name) * 1.25}):
        moved = compare_published(data, catalog, only=only, _kernels=cache)
    changed = sum(abs(m.predicted_ms / b.predicted_ms - 1.0) >= EXERCISED_BY for b, m in zip(base, moved, strict=True))
    return changed >= EXERCISED_FIGURES


def fit_factors(
    data: Mapping[str, Any] | None = None,
    catalog: Mapping[str, GPUSpec] | None = None,
    *,
    only: set[str] | None = None,
    passes: int = 2,
    _kernels: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The fitted factors' values that lower the mean |log error| per setting and GPU (:func:`_loss`) on the
    figures ``only`` (all by default): ``passes`` rounds of coordinate descent over :data:`GRIDS`, starting
    from :data:`PRIORS` (a local search, not a global minimum of the grid); a factor the training figures do
    not exercise (:func:`exercised`) keeps its prior; ties in the mean |log error| go to the smaller median
    signed error."""
    data = data or load_published()
    catalog = catalog or load_catalog()
    cache = _kernels if _kernels is not None else {}
    values = dict(PRIORS)
    with factors_set(values):
        free = [name for name in FITTED if exercised(name, data, catalog, only=only, _kernels=cache)]

    def loss(trial: dict[str, float]) -> tuple[float, float]:
        with factors_set(trial):
            return _loss(compare_published(data, catalog, only=only, _kernels=cache))

    best = loss(values)
    for _ in range(passes):
        for name in free:
            for value in GRIDS[name]:
                trial = {**values, name: value}
                trial_loss = loss(trial)
                if trial_loss < best:
                    best, values = trial_loss, trial
    return values


def cross_validate(
    data: Mapping[str, Any] | None = None,
    catalog: Mapping[str, GPUSpec] | None = None,
    *,
    by: str = "source",
) -> tuple[list[Comparison], dict[str, dict[str, float]]]:
    """Leave-one-group-out: each group's figures predicted with the fitted factors refit on the other groups.

    ``by``: ``source`` (the publication, :func:`source_group`) or ``workload``. Returns the held-out rows (in
    the file's order) and, per group, the factors fitted without it.
    """
    data = data or load_published()
    catalog = catalog or load_catalog()
    key = source_group if by == "source" else (lambda f: f[by])
    groups: dict[str, set[str]] = {}
    for fig in data["figures"]:
        groups.setdefault(key(fig), set()).add(fig["id"])
    everything = {fig["id"] for fig in data["figures"]}
    cache: dict[str, Any] = {}
    held: dict[str, Comparison] = {}
    fitted = {}
    for group, ids in groups.items():
        fitted[group] = values = fit_factors(data, catalog, only=everything - ids, _kernels=cache)
        with factors_set(values):
            held.update((r.id, r) for r in compare_published(data, catalog, only=ids, _kernels=cache))
    return [held[fig["id"]] for fig in data["figures"]], fitted


def orderings(rows: list[Comparison]) -> list[dict[str, Any]]:
    """Per workload setting (model, precision, batch, seq, sparsity) with ≥ 2 GPUs: both GPU orders.

    A GPU with several figures in one setting (MLPerf rounds a few software releases apart) is ranked by the
    median of its published figures; its prediction is the same for all of them.
    """
    groups: dict[tuple, dict[str, list[Comparison]]] = {}
    for r in rows:
        key = (r.workload, r.model, r.precision, r.batch, r.seq, r.sparse)
        groups.setdefault(key, {}).setdefault(r.gpu, []).append(r)
    out = []
    for key, by_gpu in groups.items():
        if len(by_gpu) < 2:
            continue
        published = sorted(by_gpu, key=lambda g: statistics.median(r.published_ms for r in by_gpu[g]))
        predicted = sorted(by_gpu, key=lambda g: statistics.median(r.predicted_ms for r in by_gpu[g]))
        out.append({"setting": key, "published": published, "predicted": predicted, "holds": published == predicted})
    return out


def discordant_pairs(order: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The GPU pairs of one :func:`orderings` entry that the prediction ranks the other way round:
    ``(faster as published, slower as published)``."""
    published, rank = order["published"], {g: i for i, g in enumerate(order["predicted"])}
    return [(a, b) for i, a in enumerate(published) for b in published[i + 1 :] if rank[a] > rank[b]]


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
        "median_signed_error": statistics.median(r.error for r in rows) if rows else None,
        "optimistic": sum(r.error < 0 for r in rows),
        "median_abs_error_by_workload": {w: statistics.median(e) for w, e in by_workload.items()},
        "orderings_held": sum(o["holds"] for o in orders),
        "orderings": len(orders),
    }
