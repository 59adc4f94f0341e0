"""report.json rendered as one self-contained HTML page for people.

The page needs nothing but itself (styles inline, plots as base64 PNG), so it can be attached to an
issue, mailed, or archived as a CI artifact and still open years later. Sections the compile did not
compute say so rather than disappear, so a reader can tell "not measured" from "forgot to look".
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prune2deploy.profiling.report_outputs import output_tables
from prune2deploy.units import number

__all__ = ["render_html"]

log = logging.getLogger(__name__)

_KNOWN = {
    "schema_version",
    "tool",
    "input",
    "options",
    "passes",
    "model",
    "per_layer",
    "groups",
    "verification",
    "latency",
    "speedup",
    "predictions",
    "ops",
    "sparsity",
    "quality",
    "genai",
    "hf",
    "hf_nas",
    "gguf",
}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem 2rem 3rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; vertical-align: top; }
th { background: #f5f5f5; } td.text, th.text { text-align: left; }
.ok { color: #1b7f3b; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.empty { color: #777; font-style: italic; } .muted { color: #777; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
ul.summary li { margin: 0.2rem 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    """:func:`prune2deploy.units.number`, escaped: separators, 4 significant digits, yes/no, a dash for None."""
    return _e(number(value, dash="—"))


def _pct_change(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], text_cols: Sequence[int] = (0,)) -> str:
    """An HTML table; cells are escaped unless already wrapped as ``_Raw``."""
    head = "".join(f'<th class="{"text" if i in text_cols else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            content = cell.html if isinstance(cell, _Raw) else (_e(cell) if i in text_cols else _num(cell))
            cells.append(f'<td class="{"text" if i in text_cols else ""}">{content}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw:
    """Markup that a table cell should not escape (built from escaped parts)."""

    def __init__(self, markup: str) -> None:
        self.html = markup


def _verdict(ok: bool | None, yes: str, no: str) -> _Raw:
    if ok is None:
        return _Raw('<span class="muted">—</span>')
    return _Raw(f'<span class="ok">{_e(yes)}</span>' if ok else f'<span class="bad">{_e(no)}</span>')


def _section(section_id: str, title: str, body: str | None) -> str:
    content = body if body else '<p class="empty">Not computed for this run.</p>'
    return f'<section id="{_e(section_id)}"><h2>{_e(title)}</h2>{content}</section>'


def _figure(png: bytes | None, img_id: str, alt: str, caption: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img id="{_e(img_id)}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _plot(draw: Callable[..., bytes | None], *args: Any) -> bytes | None:
    """Draws a plot, or None when matplotlib is missing (the tables still carry every number)."""
    try:
        return draw(*args)
    except ImportError:
        log.warning("matplotlib is not installed: the HTML report has tables but no plots (pip install matplotlib)")
        return None


def _json_block(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"


def _outputs(report: dict[str, Any]) -> str | None:
    """genai/, hf/, hf-nas/ and gguf/: one table each (see :mod:`.report_outputs`), then the writer's full record."""
    parts = []
    for table in output_tables(report):
        parts.append(f"<h3>{_e(table.folder)}</h3>")
        if table.rows:
            parts.append(_table(table.headers, table.rows, text_cols=_text_columns(table.rows)))
        parts.extend(f"<p>{_e(note)}</p>" for note in table.notes)
        key = table.folder.rstrip("/").replace("-", "_")  # hf-nas/ is report["hf_nas"]
        parts.append(f"<details><summary>{_e(key)} in report.json</summary>{_json_block(report[key])}</details>")
    return "".join(parts) or None


def _text_columns(rows: list[list[Any]]) -> list[int]:
    """Columns holding words (left-aligned and escaped as text); numbers are formatted as numbers."""
    return [i for i in range(len(rows[0])) if any(isinstance(row[i], str) for row in rows)]


def _summary(report: dict[str, Any]) -> str:
    """The page's first list: input, tool, sizes, verdict, quality, groups, the best measured and predicted speed."""
    items = [*_provenance(report)]
    model = report.get("model") or {}
    ref, new = model.get("reference") or {}, model.get("compiled") or {}
    for key, label in (("params", "Parameters"), ("flops", "FLOPs"), ("nodes", "Nodes")):
        if key in ref and key in new:
            items.append(
                f"<li>{label}: {_num(ref[key])} → {_num(new[key])} "
                f"<strong>{_e(_pct_change(ref[key], new[key]))}</strong></li>"
            )
    verification = report.get("verification")
    if verification and "passed" in verification:
        from prune2deploy.verify import verdict_line, verdict_status

        status = verdict_status(verification)
        if status == "approximate":  # an error to read, never a verdict (docs/exactness.md)
            items.append(f"<li>Verification: {_e(verdict_line(verification))}</li>")
        else:
            items.append(f"<li>Verification (exact): {_verdict(status == 'passed', 'passed', 'FAILED').html}</li>")
    items.extend(_summary_quality(report.get("quality")))
    groups = report.get("groups")
    if groups and "total" in groups:
        blocked = len(groups.get("blocked") or [])
        unsized = groups["total"] - (groups.get("prunable") or 0) - blocked
        items.append(
            f"<li>Channel groups: {_num(groups.get('prunable'))} of {_num(groups['total'])} prunable"
            + (f", {blocked} blocked (see below)" if blocked else "")
            + (f", {unsized} {_e(_UNSIZED)}" if unsized > 0 else "")
            + "</li>"
        )
    items.extend(_summary_speed(report))
    items.extend(_summary_baseline(report))
    return '<ul class="summary">' + "".join(items) + "</ul>"


def _summary_baseline(report: dict[str, Any]) -> list[str]:
    """``--baseline``: the compiled model against the dense model an already-pruned input came from."""
    from prune2deploy.profiling.summary import baseline_lines

    return [f"<li>{_e(line[0].upper() + line[1:])}</li>" for line in baseline_lines(report)]


def _provenance(report: dict[str, Any]) -> list[str]:
    """The input (name, path, kind, digest) and the tool with its libraries."""
    source = report.get("input", {})
    sha = source.get("sha256")
    tool = report.get("tool", {})
    libraries = ", ".join(f"{_e(k)} {_e(v)}" for k, v in sorted((tool.get("libraries") or {}).items()))
    return [
        f"<li>Input: <strong>{_e(_model_name(source))}</strong>"
        + (" (bundled)" if source.get("bundled") else "")
        + f' <code class="muted">{_e(source.get("path", "?"))}</code> ({_e(source.get("kind", "?"))})'
        + (f', sha256 <code title="{_e(sha)}">{_e(sha[:12])}…</code>' if sha else "")
        + "</li>",
        f"<li>Tool: {_e(tool.get('name', '?'))} {_e(tool.get('version', '?'))}"
        + (f' <span class="muted">({libraries})</span>' if libraries else "")
        + "</li>",
    ]


def _summary_quality(section: dict[str, Any] | None) -> list[str]:
    """Quality vs the masked reference and vs dense in one line, and who cost it when it fell a lot."""
    from prune2deploy.profiling.summary import quality_line, quality_warning

    line = quality_line(section)
    if not line:
        return []
    warning = quality_warning(section)
    note = f'<br><strong class="bad">{_e(warning)}</strong>' if warning else ""
    return [f'<li>Quality: {_e(line)} — <a href="#quality">details</a>{note}</li>']


def _summary_speed(report: dict[str, Any]) -> list[str]:
    """The best measured speedup (with its CI and the ideal) and the predicted span over the GPUs."""
    items = []
    speedups = report.get("speedup") or []
    if speedups:
        best = max(speedups, key=lambda r: r["measured"])
        ci = _ci_text(best)
        items.append(
            f"<li>Best measured speedup: <strong>{best['measured']:.2f}×</strong> on {_e(best['engine'])} at "
            f"{_e(_shape(best))}"
            + (f" ({_e(ci)})" if ci else "")
            + (f"; ideal (FLOP ratio) {best['ideal_speedup']:.2f}×" if best.get("ideal_speedup") else "")
            + ' — <a href="#speedup">why it differs from the ideal</a></li>'
        )
    predictions = [p for p in report.get("predictions") or [] if p.get("speedup")]
    if predictions:
        best = max(predictions, key=lambda r: r["speedup"])
        worst = min(predictions, key=lambda r: r["speedup"])
        if best["speedup"] - worst["speedup"] < 0.005:  # a tie names no GPU "best"
            items.append(
                f"<li>Predicted speedup: <strong>{best['speedup']:.2f}×</strong> on every GPU "
                f"({_e(best['precision'])}, {_e(_shape(best))})</li>"
            )
        else:
            items.append(
                f"<li>Predicted speedup: <strong>{best['speedup']:.2f}×</strong> on {_e(best['gpu'])} down to "
                f"{worst['speedup']:.2f}× on {_e(worst['gpu'])} ({_e(best['precision'])}, {_e(_shape(best))})</li>"
            )
    return items


def _model_name(source: dict[str, Any]) -> str:
    """What a person calls the input: the bundled model's name, else the file or folder name."""
    if source.get("bundled"):
        return str(source["bundled"])
    path = str(source.get("path") or "model")
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def _ci_text(row: dict[str, Any]) -> str:
    """``95% CI 1.2–1.4×, 37 runs`` plus a warning when the medians did not reach the target precision."""
    parts = []
    if row.get("ci"):
        parts.append(f"95% CI {row['ci'][0]:.2f}–{row['ci'][1]:.2f}×")
    if row.get("runs"):
        parts.append(f"{row['runs']} runs")
    text = ", ".join(parts)
    if row.get("tight") is False:
        text += (
            f"; not tight: the time budget ran out before each median was known to ±{row.get('target_ci', 0.02):.0%}"
        )
    return text


def _shape(row: dict[str, Any]) -> str:
    seq = row.get("seq")
    return f"batch {row['batch']}" if seq is None else f"batch {row['batch']}, seq {seq}"


def _passes(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    return _table(
        ["#", "pass", "exact", "changed", "what it did", "refused (where: why)"],
        (
            [
                i + 1,
                r["pass"],
                _verdict(r.get("exact"), "exact", "approximate"),
                "yes" if r.get("modified") else "no",
                _scalars(r.get("record") or {}),
                _refusals(r.get("refused") or {}),
            ]
            for i, r in enumerate(rows)
        ),
        text_cols=(1, 4, 5),
    )


def _scalars(record: dict[str, Any]) -> str:
    """The counts of a pass record (its lists and per-item tables are in report.json)."""
    text = ", ".join(f"{k}={v}" for k, v in record.items() if not isinstance(v, (dict, list)))
    return text if len(text) <= 300 else text[:297] + "..."


def _refusals(refused: dict[str, str], shown: int = 5) -> str:
    if not refused:
        return "-"
    items = [f"{where}: {why}" for where, why in list(refused.items())[:shown]]
    more = len(refused) - shown
    return "; ".join(items) + (f"; … {more} more in report.json" if more > 0 else "")


#: Channel groups neither prunable nor blocked: axes without a static width (not channels).
_UNSIZED = "without a static width (batch/sequence axes, not channels)"


def _groups(groups: dict[str, Any] | None) -> str | None:
    if not groups:
        return None
    blocked = groups.get("blocked") or []
    unsized = (groups.get("total") or 0) - (groups.get("prunable") or 0) - len(blocked)
    parts = [
        f"<p>{_num(groups.get('prunable'))} of {_num(groups.get('total'))} channel groups are prunable"
        + (f"; {unsized} {'is' if unsized == 1 else 'are'} {_e(_UNSIZED)}" if unsized > 0 else "")
        + ".</p>"
    ]
    if blocked:
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for b in blocked:
            by_reason.setdefault(b.get("reason") or "", []).append(b)
        other = "The other" if unsized <= 0 else "The remaining"
        parts.append(f"<p>{other} {len(blocked)} groups are left as they are, for these reasons:</p>")
        parts.append(
            _table(
                ["groups", "reason", "what it means", "for example"],
                (
                    [
                        len(items),
                        reason,
                        items[0].get("hint") or "",
                        ", ".join(_short(b.get("group")) for b in items[:3]),
                    ]
                    for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
                ),
                text_cols=(1, 2, 3),
            )
        )
        rows = _table(
            ["group", "node", "reason"],
            ([_short(b.get("group"), 120), b.get("node") or "", b.get("reason")] for b in blocked),
            text_cols=(0, 1, 2),
        )
        parts.append(f"<details><summary>All {len(blocked)} groups</summary>{rows}</details>")
    return "".join(parts)


def _short(text: Any, limit: int = 60) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _verification(verification: dict[str, Any] | None) -> str | None:
    if not verification:
        return None
    from prune2deploy.verify import verdict_line, verdict_status, verification_notes

    status = verdict_status(verification)
    label = {"passed": _verdict(True, "passed", ""), "failed": _verdict(False, "", "FAILED")}.get(
        status, _Raw('<span class="muted">approximate (not held to the exact tolerance)</span>')
    )
    parts = [
        f"<p>{_e(verdict_line(verification))}</p>",
        *(f"<p>{_e(note)}</p>" for note in verification_notes(verification)),
        _table(
            ["exact", "verdict", "tolerance", "feeds"],
            [
                [
                    _verdict(verification.get("exact"), "exact", "approximate"),
                    label,
                    verification.get("tolerance"),
                    ", ".join(verification.get("feeds") or []),
                ]
            ],
            text_cols=(3,),
        ),
    ]
    outputs = verification.get("outputs") or {}
    if outputs:
        extra = sorted({k for v in outputs.values() for k in v} - {"max_abs", "max_rel", "scale"})
        columns = ["max_abs", "max_rel", "scale", *extra]
        parts.append(
            _table(["output", *columns], ([name, *(v.get(c) for c in columns)] for name, v in outputs.items()))
        )
    return "".join(parts)


def _quality(section: dict[str, Any] | None) -> str | None:
    """Compiled vs reference (and vs dense) on the evaluation text: information beside the verdict."""
    if not section:
        return None
    if not section.get("computed"):
        return f'<p class="muted">not measured: {_e(section.get("reason", ""))}</p>'
    unit = (
        f"{section['windows']} windows of {section['window']} tokens"
        if "window" in section
        else f"{section['sentences']} sentences"
    )
    parts = [f"<p>{_e(unit)} of the {_e(section.get('text', ''))}; information, not the verification verdict.</p>"]
    rows = section.get("comparisons") or []
    if section.get("kind") == "lm":
        columns = ["kl_mean", "kl_max", "top1_agreement", "ppl_reference", "ppl_candidate"]
    else:
        columns = ["cosine_mean", "cosine_min"]
    header = ["compiled vs", "KL mean", "KL max", "top-1", "ppl (reference)", "ppl (compiled)"]
    parts.append(
        _table(
            header if section.get("kind") == "lm" else ["compiled vs", "cosine mean", "cosine min"],
            ([r.get("reference"), *(r.get(c) for c in columns)] for r in rows),
        )
    )
    if section.get("dense_skipped"):
        parts.append(f'<p class="muted">no dense comparison: {_e(section["dense_skipped"])}</p>')
    return "".join(parts)


def _per_layer(rows: list[dict[str, Any]]) -> str | None:
    from prune2deploy.profiling.report_plots import MAX_LAYERS, per_layer_png

    if not rows:
        return None
    shown = min(len(rows), MAX_LAYERS)
    caption = "Parameters and FLOPs per layer before and after compilation"
    if len(rows) > MAX_LAYERS:
        caption += f" ({shown} largest of {len(rows)} layers; the table lists all)"
    figure = _figure(
        _plot(per_layer_png, rows),
        "plot-per-layer",
        "Bar chart of parameters and FLOPs per layer, before and after compilation",
        caption,
    )
    # A layer with FLOPs of its own but no parameters reads a weight stored elsewhere (a tied LM head); layers
    # of only elementwise ops have no FLOPs worth naming.
    total = sum(r["flops_before"] for r in rows) or 1
    tied = [r["layer"] for r in rows if not r["params_before"] and r["flops_before"] > 0.01 * total]
    table = _table(
        ["layer", "params before", "params after", "change", "FLOPs before", "FLOPs after", "change"],
        (
            [
                r["layer"] + (" (tied weights †)" if r["layer"] in tied else ""),
                r["params_before"],
                r["params_after"],
                _pct_change(r["params_before"], r["params_after"]),
                r["flops_before"],
                r["flops_after"],
                _pct_change(r["flops_before"], r["flops_after"]),
            ]
            for r in rows
        ),
        text_cols=(0, 3, 6),
    )
    note = (
        f'<p class="muted">† {_e(", ".join(tied))}: 0 parameters because its weight is shared with another '
        "layer (a tied LM head reads the embedding matrix); the parameters are counted once, where they are "
        "stored, and its FLOPs here.</p>"
        if tied
        else ""
    )
    return figure + table + note


def _latency(rows: list[dict[str, Any]]) -> str | None:
    from prune2deploy.profiling.report_plots import latency_png

    if not rows:
        return None
    figure = _figure(
        _plot(latency_png, rows),
        "plot-latency",
        "Bar chart of median latency, reference versus compiled, per engine, batch and sequence length",
        "Measured median latency (reference and compiled timed interleaved in one run); whiskers reach p90",
    )
    columns = ["median_ms", "p90_ms", "p99_ms", "mean_ms", "runs", "throughput", "peak_rss_mb"]
    table = _table(
        [
            "engine",
            "model",
            "batch",
            "seq",
            "median ms",
            "p90 ms",
            "p99 ms",
            "mean ms",
            "runs",
            "samples/s",
            "peak RSS MB",
        ],
        ([r["engine"], r["model"], r["batch"], r.get("seq"), *(r.get(c) for c in columns)] for r in rows),
        text_cols=(0, 1),
    )
    return figure + table


def _speedup(rows: list[dict[str, Any]], gap: str | None = None) -> str | None:
    from prune2deploy.profiling.report_plots import speedup_png

    if not rows:
        return None
    figure = _figure(
        _plot(speedup_png, rows),
        "plot-speedup",
        "Bar chart of measured speedup next to the ideal speedup per engine and shape",
        "Measured speedup (reference median / compiled median) against the ideal from the FLOP reduction",
    )

    def achieved(r: dict[str, Any]) -> str:
        return f"{r['measured'] / r['ideal_speedup'] * 100:.0f}%" if r.get("ideal_speedup") else "—"

    table = _table(
        ["engine", "batch", "seq", "measured ×", "95% CI / runs", "ideal ×", "of ideal"],
        (
            [r["engine"], r["batch"], r.get("seq"), r["measured"], _ci_text(r), r.get("ideal_speedup"), achieved(r)]
            for r in rows
        ),
        text_cols=(0, 4, 6),
    )
    return figure + table + (gap or "")


def _ordering(values: dict[str, float]) -> str:
    """``predicted 1.10× < measured 1.45× ≈ ideal 1.50×``: the names in increasing order of their value, each
    joined by the relation that holds (``≈`` where the two print the same)."""
    ordered = sorted(values.items(), key=lambda kv: kv[1])
    text = f"{ordered[0][0]} {ordered[0][1]:.2f}×"
    for (_, before), (name, value) in itertools.pairwise(ordered):
        text += f" {'≈' if f'{before:.2f}' == f'{value:.2f}' else '<'} {name} {value:.2f}×"
    return text


def _gap(report: dict[str, Any]) -> str | None:
    """How predicted, measured and ideal speedup compare (in the order that holds for this report's numbers)
    and why: what pruning did not touch, and what binds the GPU predictions."""
    layers = report.get("per_layer") or []
    flops = sum(r["flops_before"] for r in layers)
    params = sum(r["params_before"] for r in layers)
    if not layers or not flops or not params:
        return None
    same = [r for r in layers if r["flops_after"] == r["flops_before"] and r["params_after"] == r["params_before"]]
    same_flops = sum(r["flops_before"] for r in same) / flops
    same_params = sum(r["params_before"] for r in same) / params
    biggest = sorted(same, key=lambda r: -max(r["params_before"], r["flops_before"] / 2))[:3]
    names = ", ".join(r["layer"] for r in biggest if r["params_before"] or r["flops_before"])
    untouched = (
        f"{same_flops:.0%} of the reference's FLOPs and {same_params:.0%} of its parameters sit in layers the "
        "pruning did not touch" + (f" ({_e(names)})" if names else "")
    )
    items = [
        "<li><strong>Ideal</strong> is the ratio of the whole model's FLOPs before and after: it assumes time "
        f"is proportional to FLOPs. {untouched}; that share is already in the ideal.</li>"
    ]
    speedups = [r for r in report.get("speedup") or [] if r.get("ideal_speedup")]
    predictions = report.get("predictions") or []
    values: dict[str, float] = {}
    if speedups:
        r = speedups[0]
        values.update(measured=r["measured"], ideal=r["ideal_speedup"])
        ci = f" (95% CI {r['ci'][0]:.2f}–{r['ci'][1]:.2f}×)" if r.get("ci") else ""
        if r["measured"] < r["ideal_speedup"]:
            items.append(
                f"<li><strong>Measured</strong> {r['measured']:.2f}×{ci} is below the ideal "
                f"{r['ideal_speedup']:.2f}×: "
                "inside the pruned layers attention, norms, elementwise ops and per-op overheads do not shrink "
                "with the MLP, and smaller matrices run at a lower fraction of peak.</li>"
            )
        else:
            items.append(
                f"<li><strong>Measured</strong> {r['measured']:.2f}×{ci} "
                + ("reaches" if f"{r['measured']:.2f}" == f"{r['ideal_speedup']:.2f}" else "exceeds")
                + f" the ideal {r['ideal_speedup']:.2f}× here: "
                "smaller weight matrices also fit the CPU's caches better"
                + ("; the interval is wide, so part of it may be noise" if r.get("tight") is False else "")
                + ".</li>"
            )
    elif predictions and predictions[0].get("ideal_speedup"):
        values["ideal"] = predictions[0]["ideal_speedup"]
    if predictions:
        predicted = sorted(p["speedup"] for p in predictions if p.get("speedup"))
        if predicted:
            values["predicted"] = predicted[len(predicted) // 2]
        bound: dict[str, int] = {}
        for p in predictions:
            bound[p.get("binding") or "?"] = bound.get(p.get("binding") or "?", 0) + 1
        counts = ", ".join(f"{k}-bound on {v}" for k, v in sorted(bound.items(), key=lambda kv: -kv[1]))
        nodes = (report.get("model") or {}).get("compiled", {}).get("nodes")
        why = []
        if bound.get("launch"):
            why.append(
                "launch-bound: the time goes to starting its"
                + (f" ~{nodes:,}" if nodes else "")
                + " kernels, which pruning does not reduce (fewer, fused kernels — TensorRT — or a larger batch / "
                "sequence let the smaller matrices show)"
            )
        if bound.get("memory"):
            why.append(
                "memory-bound: time follows the bytes read, and the untouched embedding / LM head and the "
                "activation traffic are a larger share of bytes than of FLOPs"
            )
        span = ""
        if predicted and f"{predicted[0]:.2f}" == f"{predicted[-1]:.2f}":
            span = f" speedup {predicted[0]:.2f}× on every GPU;"
        elif predicted:
            span = f" speedup {predicted[0]:.2f}–{predicted[-1]:.2f}× (median {values['predicted']:.2f}×);"
        items.append(
            f"<li><strong>Predicted</strong> (GPU, {_e(predictions[0].get('precision', ''))}, "
            f"{_e(_shape(predictions[0]))}):{span} {counts} of {len(predictions)} GPUs. "
            + "; ".join(why)
            + ". Compute-bound kernels are the ones that speed up by the FLOP ratio.</li>"
        )
    heading = f"Why {_ordering(values)}" if len(values) > 1 else "What the ideal assumes"
    return f"<h3>{_e(heading)}</h3><ul>" + "".join(items) + "</ul>"


def _predictions(rows: list[dict[str, Any]]) -> str | None:
    from prune2deploy.profiling.report_plots import predictions_png

    if not rows:
        return None
    figure = _figure(
        _plot(predictions_png, rows),
        "plot-predictions",
        "Horizontal bar chart of predicted latency per target GPU, reference versus compiled",
        "Predicted latency per target GPU (engine-aware cost model; roofline lower bound in the table); "
        "diamonds mark measurements where a device was present",
    )
    table = _table(
        [
            "GPU",
            "precision",
            "batch",
            "seq",
            "reference ms",
            "compiled ms",
            "speedup ×",
            "lower bound ms",
            "bound",
            "bound by layer type",
            "measured ms",
        ],
        (
            [
                r["gpu"],
                r["precision"],
                r["batch"],
                r.get("seq"),
                r.get("reference_ms"),
                r["compiled_ms"],
                r.get("speedup"),
                r.get("lower_bound_ms"),
                r.get("binding"),
                ", ".join(f"{g}: {b}" for g, b in (r.get("binding_by_group") or {}).items()),
                r.get("measured_ms"),
            ]
            for r in rows
        ),
        text_cols=(0, 1, 8, 9),
    )
    return figure + table


def _ops(breakdowns: dict[str, dict[str, Any]] | None, top: int = 15) -> str | None:
    """Time per op type side by side for every profiled model, and the slowest nodes of each."""
    if not breakdowns:
        return None
    names = list(breakdowns)
    per_model = {name: {r["op_type"]: r for r in b.get("by_op_type", [])} for name, b in breakdowns.items()}
    first = per_model[names[0]]
    ops = sorted(
        {op for table in per_model.values() for op in table},
        key=lambda op: (-first.get(op, {}).get("ms_per_run", 0.0), op),
    )
    ratio = len(names) == 2

    def cells(op: str) -> list[Any]:
        row: list[Any] = [op]
        for name in names:
            entry = per_model[name].get(op)
            row += [entry["ms_per_run"], entry.get("calls_per_run")] if entry else [None, None]
        if ratio:
            a, b = (per_model[n].get(op, {}).get("ms_per_run") for n in names)
            row.append(f"{a / b:.2f}×" if a and b else "—")
        return row

    headers = ["op type"]
    for name in names:
        headers += [f"{name} ms/run", f"{name} calls"]
    if ratio:
        headers.append(f"{names[0]} / {names[1]}")
    summary = "".join(
        f"<li>{_e(name)}: {_num(b.get('model_run_ms'))} ms per run, "
        f"{_num(b.get('kernel_ms'))} ms in kernels, {_num(b.get('runs'))} profiled runs</li>"
        for name, b in breakdowns.items()
    )
    parts = [
        f"<ul>{summary}</ul>",
        _table(headers, (cells(op) for op in ops), text_cols=(0, len(headers) - 1) if ratio else (0,)),
    ]
    for name, b in breakdowns.items():
        nodes = b.get("top_nodes") or []
        if nodes:
            parts.append(f"<h3>Slowest nodes: {_e(name)}</h3>")
            parts.append(
                _table(
                    ["node", "op type", "ms/run", "share"],
                    (
                        [n["node"], n.get("op_type", ""), n["ms_per_run"], f"{n.get('share', 0) * 100:.1f}%"]
                        for n in nodes[:top]
                    ),
                    text_cols=(0, 1, 3),
                )
            )
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page for ``report`` (a report.json dict; see report.schema.json).

    Plots are drawn with matplotlib when it is installed and embedded as ``<img>`` elements with ids
    ``plot-per-layer``, ``plot-latency``, ``plot-speedup`` and ``plot-predictions``; without matplotlib the
    page keeps every table. All text from the report is HTML-escaped.
    """
    source = report.get("input", {})
    name = _model_name(source)
    title = f"prune2deploy report — {name}"
    sections = [
        _section("summary", "Summary", _summary(report)),
        _section("passes", "Passes", _passes(report.get("passes") or [])),
        _section("groups", "Channel groups", _groups(report.get("groups"))),
        _section("verification", "Verification", _verification(report.get("verification"))),
        _section("quality", "Quality on text", _quality(report.get("quality"))),
        _section("per-layer", "Per-layer size", _per_layer(report.get("per_layer") or [])),
        _section("latency", "Measured latency", _latency(report.get("latency") or [])),
        _section("speedup", "Speedup against ideal", _speedup(report.get("speedup") or [], _gap(report))),
        _section("predictions", "Predicted latency per GPU", _predictions(report.get("predictions") or [])),
    ]
    if any(report.get(key) is not None for key in ("genai", "hf", "hf_nas", "gguf")):
        sections.append(_section("outputs", "Deployable outputs (genai/, hf/, hf-nas/, gguf/)", _outputs(report)))
    if report.get("ops"):
        sections.append(_section("ops", "Time per op type (ONNX Runtime profiler)", _ops(report["ops"])))
    if report.get("sparsity"):
        sections.append(_section("sparsity", "Sparsity", _json_block(report["sparsity"])))
    sections.append(_section("options", "Options", _json_block(report.get("options", {}))))
    extra = {k: v for k, v in report.items() if k not in _KNOWN}
    if extra:
        sections.append(_section("more", "More", _json_block(extra)))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><main><h1>prune2deploy report: {_e(name)}</h1>"
        f'<p class="muted">{_e(source.get("path", ""))}</p>\n' + "\n".join(sections) + "\n</main></body></html>\n"
    )
