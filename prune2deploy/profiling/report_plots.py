"""The report's plots as PNG bytes: per-layer size, latency, speedup against ideal, predictions per GPU.

Figures are drawn on matplotlib's Agg canvas created inside each function (never ``pyplot``), so
importing this module changes no global backend state and works on machines without a display. Every
function returns None when it has nothing to draw, so the page can say "not computed" instead.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "MAX_LAYERS",
    "latency_png",
    "per_layer_png",
    "predictions_png",
    "speedup_png",
]

MAX_LAYERS = 40
"""Per-layer plots show at most this many layers (the largest before pruning) to stay readable."""

_REFERENCE = "#9e9e9e"
_COMPILED = "#1f77b4"
_IDEAL = "#ff7f0e"
_MEASURED = "#d62728"
_DPI = 100


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _shape_label(row: dict[str, Any]) -> str:
    seq = row.get("seq")
    return f"b{row['batch']}" if seq is None else f"b{row['batch']} s{seq}"


def _grouped_bars(axes, labels: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]]) -> None:
    """Vertical grouped bars: one group per label, one bar per series (NaN bars are left out)."""
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for index, (name, values, color) in enumerate(series):
        heights = np.asarray(values, dtype=float)
        axes.bar(x + (index - (len(series) - 1) / 2) * width, heights, width, label=name, color=color)
    axes.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center")
    _legend_outside(axes)
    axes.grid(axis="y", alpha=0.3)


def _legend_outside(axes) -> None:
    """Legend to the right of the axes, where it cannot hide a bar."""
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def per_layer_png(rows: Sequence[dict[str, Any]], max_layers: int = MAX_LAYERS) -> bytes | None:
    """Params and FLOPs per layer, before vs after, as horizontal bars (largest layers first)."""
    if not rows:
        return None
    from matplotlib.ticker import EngFormatter

    shown = sorted(rows, key=lambda r: -r["params_before"])[:max_layers]
    labels = [r["layer"] for r in shown]
    y = np.arange(len(shown))
    figure = _figure(11, 1.5 + 0.28 * len(shown))
    panels = figure.subplots(1, 2, sharey=True)
    for axes, key, title in ((panels[0], "params", "Parameters"), (panels[1], "flops", "FLOPs")):
        before = [r[f"{key}_before"] for r in shown]
        after = [r[f"{key}_after"] for r in shown]
        axes.barh(y - 0.2, before, 0.4, label="before", color=_REFERENCE)
        axes.barh(y + 0.2, after, 0.4, label="after", color=_COMPILED)
        axes.set_title(title)
        axes.xaxis.set_major_formatter(EngFormatter())
        axes.grid(axis="x", alpha=0.3)
    _legend_outside(panels[1])
    panels[0].set_yticks(y, labels, fontsize="small")
    panels[0].invert_yaxis()
    return _png(figure)


def latency_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Median latency of reference vs compiled per (batch, seq), one panel per engine; whiskers to p90."""
    if not rows:
        return None
    engines = sorted({r["engine"] for r in rows})
    figure = _figure(max(6.0, 1.2 * _max_shapes(rows) + 3), 3.2 * len(engines))
    panels = np.atleast_1d(figure.subplots(len(engines), 1, squeeze=False)[:, 0])
    for axes, engine in zip(panels, engines, strict=True):
        mine = [r for r in rows if r["engine"] == engine]
        shapes = _ordered_shapes(mine)
        labels = [_shape_label({"batch": b, "seq": s}) for b, s in shapes]
        x = np.arange(len(shapes))
        for index, (model, color) in enumerate((("reference", _REFERENCE), ("compiled", _COMPILED))):
            by_shape = {(r["batch"], r.get("seq")): r for r in mine if r["model"] == model}
            medians = [by_shape[s]["median_ms"] if s in by_shape else np.nan for s in shapes]
            p90 = [by_shape[s].get("p90_ms", np.nan) if s in by_shape else np.nan for s in shapes]
            upper = np.clip(np.nan_to_num(np.asarray(p90, float) - np.asarray(medians, float)), 0, None)
            axes.bar(
                x + (index - 0.5) * 0.4,
                medians,
                0.4,
                yerr=[np.zeros_like(upper), upper],
                capsize=3,
                label=model,
                color=color,
            )
        axes.set_xticks(x, labels)
        axes.set_ylabel("median ms (whisker: p90)")
        axes.set_title(engine)
        axes.grid(axis="y", alpha=0.3)
        _legend_outside(axes)
    return _png(figure)


def speedup_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Measured speedup next to the ideal (FLOP ratio) per engine and shape; the dashed line is 1x."""
    if not rows:
        return None
    labels = [f"{r['engine']}\n{_shape_label(r)}" for r in rows]
    figure = _figure(max(6.0, 0.9 * len(rows) + 3), 3.6)
    axes = figure.subplots()
    ideal = [r["ideal_speedup"] if r.get("ideal_speedup") is not None else np.nan for r in rows]
    series = [("measured", [r["measured"] for r in rows], _COMPILED)]
    if not np.all(np.isnan(ideal)):
        series.append(("ideal (FLOP ratio)", ideal, _IDEAL))
    _grouped_bars(axes, labels, series)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set_ylabel("speedup (x)")
    return _png(figure)


def predictions_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Predicted latency per target GPU (reference vs compiled), with a marker where it was measured."""
    if not rows:
        return None
    labels = [f"{r['gpu']} {r['precision']} {_shape_label(r)}" for r in rows]
    y = np.arange(len(rows))
    figure = _figure(9, 1.5 + 0.32 * len(rows))
    axes = figure.subplots()
    reference = [r.get("reference_ms") if r.get("reference_ms") is not None else np.nan for r in rows]
    if not np.all(np.isnan(np.asarray(reference, float))):
        axes.barh(y - 0.2, reference, 0.4, label="reference (predicted)", color=_REFERENCE)
    axes.barh(y + 0.2, [r["compiled_ms"] for r in rows], 0.4, label="compiled (predicted)", color=_COMPILED)
    measured = [(i, r["measured_ms"]) for i, r in enumerate(rows) if r.get("measured_ms") is not None]
    if measured:
        axes.scatter(
            [m for _, m in measured],
            [i + 0.2 for i, _ in measured],
            marker="D",
            color=_MEASURED,
            zorder=3,
            label="compiled (measured)",
        )
    axes.set_yticks(y, labels, fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel("ms")
    axes.grid(axis="x", alpha=0.3)
    _legend_outside(axes)
    return _png(figure)


def _ordered_shapes(rows: Sequence[dict[str, Any]]) -> list[tuple[int, int | None]]:
    shapes = {(r["batch"], r.get("seq")) for r in rows}
    return sorted(shapes, key=lambda s: (s[0], -1 if s[1] is None else s[1]))


def _max_shapes(rows: Sequence[dict[str, Any]]) -> int:
    engines = {r["engine"] for r in rows}
    return max(len(_ordered_shapes([r for r in rows if r["engine"] == e])) for e in engines)
