"""sweep.json (schema-validated) and sweep.html (Pareto fronts of latency vs quality, a sortable table).

sweep.json is what a script or dashboard reads; sweep.html is for choosing a variant: per target (each
measured engine and machine, and each GPU the cost model predicts for) a plot of latency against quality
loss with its Pareto front, every point linking to that variant's own report.html; below it, every variant
in a table that sorts by any column.
"""

from __future__ import annotations

import functools
import html
import io
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from prune2deploy import __version__
from prune2deploy.errors import BadInputError, P2DError
from prune2deploy.io import atomic_write_json, atomic_write_text
from prune2deploy.units import number

__all__ = [
    "SCHEMA_VERSION",
    "pareto_front",
    "pareto_plot",
    "quality_loss",
    "render_sweep_html",
    "report_href",
    "sweep_schema",
    "validate_sweep",
    "variant_problem",
    "write_sweep",
]

SCHEMA_VERSION = 1
#: Predicted targets plotted when no variant names a GPU (the table and sweep.json keep every GPU).
DEFAULT_PLOTTED_GPUS = ("l4", "a100-sxm-80gb", "h100-sxm")
MAX_PANELS = 6


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("prune2deploy.sweep").joinpath("sweep.schema.json").read_text(encoding="utf-8")


def sweep_schema() -> dict[str, Any]:
    """The JSON schema of sweep.json (a fresh copy)."""
    return json.loads(_schema_text())


def validate_sweep(record: dict[str, Any]) -> None:
    """Checks ``record`` against sweep.schema.json.

    Raises:
        BadInputError: naming the JSON path of the most relevant error.
    """
    try:
        import jsonschema
        from jsonschema.exceptions import best_match
    except ImportError as exc:
        raise P2DError("validating sweep.json needs jsonschema: pip install jsonschema") from exc
    error = best_match(jsonschema.Draft202012Validator(sweep_schema()).iter_errors(record))
    if error is not None:
        raise BadInputError(f"sweep.json does not match sweep.schema.json at {error.json_path}: {error.message[:300]}")


def variant_problem(entry: dict[str, Any]) -> str | None:
    """Why one variant entry does not match the schema's variant (None: it does), for entries rebuilt on resume."""
    try:
        import jsonschema
        from jsonschema.exceptions import best_match
    except ImportError as exc:
        raise P2DError("validating sweep.json needs jsonschema: pip install jsonschema") from exc
    schema = sweep_schema()
    validator = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/variant"})
    error = best_match(validator.iter_errors(json.loads(json.dumps(entry, default=str))))
    return None if error is None else f"{error.json_path}: {error.message[:200]}"


#: What a link in sweep.html may be made of: a variant folder's relative path (ids are [a-z0-9._-]).
_HREF = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


def report_href(out: Any) -> str | None:
    """``OUT/report.html`` for a variant folder given as a plain relative path; None (no link) otherwise.

    Links are built only from what this pattern allows (no scheme, no ``..``, no leading ``/``), so a
    tampered entry cannot make one point elsewhere (``javascript:…``, another site, a parent folder).
    """
    if not isinstance(out, str) or not _HREF.fullmatch(out) or ".." in out.split("/"):
        return None
    return f"{out}/report.html"


def quality_loss(variant: dict[str, Any]) -> tuple[float, str] | None:
    """(loss, label): lower is better — KL(dense ‖ variant) for causal LMs, 1 − cosine for encoders."""
    quality = variant.get("quality")
    if not quality:
        return None
    if quality.get("kind") == "lm":
        return float(quality["kl_mean"]), "KL(dense ‖ variant), nats/token"
    if quality.get("kind") == "encoder":
        return 1.0 - float(quality["cosine_mean"]), "1 − cosine to dense embeddings"
    return None


def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Ids of the points no other point beats on both latency and quality loss (both minimised)."""
    front, best = [], float("inf")
    for _latency, loss, ident in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append(ident)
            best = loss
    return front


def _targets(variants: list[dict[str, Any]]) -> list[tuple[str, str, int, int | None]]:
    """(target, kind, batch, seq) to plot: every measured target, and the predicted GPUs of interest."""
    named = {g for v in variants for g in v.get("options", {}).get("compile", {}).get("gpus", []) or []}
    seen: dict[tuple[str, str, int, int | None], None] = {}
    for v in variants:
        for row in v.get("latency_ms", []) or []:
            if row["kind"] == "predicted" and row["target"] not in (named or DEFAULT_PLOTTED_GPUS):
                continue
            seen.setdefault((row["target"], row["kind"], row["batch"], row.get("seq")), None)
    ordered = sorted(seen, key=lambda t: (t[1] != "measured", t[0], t[2], t[3] or 0))
    return ordered[:MAX_PANELS]


def _series(variants, target) -> list[tuple[float, float, str]]:
    points = []
    for v in variants:
        loss = quality_loss(v)
        if loss is None or v.get("error"):
            continue
        for row in v.get("latency_ms", []) or []:
            if (row["target"], row["kind"], row["batch"], row.get("seq")) == target and row.get("compiled_ms"):
                points.append((float(row["compiled_ms"]), loss[0], v["id"]))
    return points


def pareto_plot(variants: list[dict[str, Any]], fmt: str = "svg") -> bytes | None:
    """The Pareto panels (matplotlib) as SVG — each point a link to its variant's report.html — or PNG."""
    targets = _targets(variants)
    panels = [(t, _series(variants, t)) for t in targets]
    panels = [(t, p) for t, p in panels if p]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    label = next(q[1] for v in variants if (q := quality_loss(v)) is not None)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    figure = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    for i, ((target, kind, batch, seq), points) in enumerate(panels):
        axes = figure.add_subplot(rows, cols, i + 1)
        front = set(pareto_front(points))
        xs, ys, ids = zip(*points, strict=True)
        colours = ["#b3261e" if p in front else "#4a6fa5" for p in ids]
        dots = axes.scatter(xs, ys, c=colours, s=36, zorder=3)
        dots.set_urls([report_href(p) for p in ids])
        line = sorted((x, y) for x, y, p in points if p in front)
        axes.step([x for x, _ in line], [y for _, y in line], where="post", color="#b3261e", lw=1, alpha=0.7)
        for x, y, p in points:
            axes.annotate(p.rsplit("_", 1)[0], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        where = "measured" if kind == "measured" else "predicted"
        axes.set_title(f"{target} ({where}) b{batch} s{seq}", fontsize=9)
        axes.set_xlabel("latency, ms", fontsize=8)
        axes.set_ylabel(label, fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=110)
    return buffer.getvalue()


def _svg(variants: list[dict[str, Any]]) -> str | None:
    data = pareto_plot(variants, "svg")
    if data is None:
        return None
    text = data.decode("utf-8")
    return text[text.index("<svg") :]


def _fmt(value: Any) -> str:
    return number(value, dash="–")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
main { max-width: 1300px; margin: 0 auto; padding: 1rem 2rem 3rem; }
table { border-collapse: collapse; font-size: 0.85rem; } th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; }
th { background: #f5f5f5; cursor: pointer; user-select: none; } td { text-align: right; } td.text { text-align: left; }
.bad { color: #b3261e; } .front { font-weight: 600; } .muted { color: #777; } svg { max-width: 100%; height: auto; }
"""

_SORT = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0]; const asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent; const n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); })
    .forEach(r => body.appendChild(r));
}));
"""


def render_sweep_html(record: dict[str, Any]) -> str:
    """The whole page (self-contained: SVG inline, no external scripts)."""
    e = functools.partial(html.escape, quote=True)
    variants = record["variants"]
    grid_keys = list(record.get("grid", {}))
    first_measured = {}
    for v in variants:
        row = next((r for r in v.get("latency_ms", []) or [] if r["kind"] == "measured"), None)
        first_measured[v["id"]] = row
    points = [(r["compiled_ms"], q[0], i) for i, r in first_measured.items() if r and (q := quality_loss(
        next(v for v in variants if v["id"] == i))) is not None]  # fmt: skip
    front = set(pareto_front(points))
    heads = ["variant", *grid_keys, "params", "FLOPs", "measured ms", "speedup", "quality loss", "verified", "worst"]
    rows = []
    for v in variants:
        grid = v["options"]["grid"]
        m = first_measured[v["id"]]
        loss = quality_loss(v)
        ver = v.get("verification") or {}
        href = None if v.get("error") else report_href(v.get("out"))
        link = f'<a href="{e(href)}">{e(v["id"])}</a>' if href else e(v["id"])
        cells = [f'<td class="text{" front" if v["id"] in front else ""}">{link}</td>']
        cells += [f'<td class="text">{e(_fmt(grid.get(k)))}</td>' for k in grid_keys]
        params = (v.get("params") or {}).get("compiled")
        flops = (v.get("flops") or {}).get("compiled")
        values = [params, flops, m["compiled_ms"] if m else None, v.get("speedup"), loss[0] if loss else None]
        cells += [f'<td data-v="{"" if x is None else x}">{e(_fmt(x))}</td>' for x in values]
        if v.get("error"):
            cells.append(f'<td class="text bad" colspan="2">{e(v["error"][:300])}</td>')
        else:
            cells.append(f'<td class="text">{"yes" if ver.get("passed") else "no"}</td>')
            cells.append(f"<td>{e(_fmt(ver.get('worst')))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    svg = _svg(variants)
    executor = record["executor"]
    workers = ", ".join(
        f"{w['host']} ({w['cpus']:g} CPU{', ' + str(w['gpus']) + ' GPU' if w['gpus'] else ''}"
        f"{', ' + '/'.join(w.get('accelerators', [])) if w.get('accelerators') else ''})"
        for w in executor["workers"]
    )
    failed = sum(1 for v in variants if v.get("error"))
    body = [
        f"<h1>Sweep {e(record.get('name') or '')}: {e(record['model'])}</h1>",
        f"<p>{len(variants)} variants ({failed} failed) · dense exports this run: {record['exports']} · "
        f"executor: Ray {e(executor['version'])} at {e(executor['address'])} · workers: {e(workers)}</p>",
        "<h2>Latency vs quality (Pareto front in red; click a point for its report)</h2>",
        svg or '<p class="muted">no variant has both a latency and a quality measurement</p>',
        "<h2>Variants</h2><p class='muted'>Click a header to sort. Bold: on the Pareto front of the first "
        "measured target. Quality loss: KL(dense ‖ variant) for causal LMs, 1 − cosine for encoders.</p>",
        '<table class="sortable"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead>",
        "<tbody>" + "\n".join(rows) + "</tbody></table>",
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>prune2deploy sweep</title>"
        f"<style>{_STYLE}</style></head><body><main>{''.join(body)}</main><script>{_SORT}</script></body></html>\n"
    )


def write_sweep(
    out_dir: Path,
    *,
    spec: Any,
    executor: dict[str, Any],
    exports: int,
    export: dict[str, Any],
    variants: list[dict[str, Any]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Validates and writes sweep.json and sweep.html (atomically); returns the record."""
    record = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "prune2deploy", "version": __version__},
        "name": spec.name or "",
        "model": spec.model,
        "grid": spec.grid,
        "executor": executor,
        "exports": exports,
        "export": export,
        "timings": {k: round(float(v), 3) for k, v in timings.items()},
        "variants": variants,
    }
    record = json.loads(json.dumps(record, default=str))  # the record exactly as it will be read back
    validate_sweep(record)
    page = render_sweep_html(record)
    atomic_write_json(Path(out_dir) / "sweep.json", record)
    atomic_write_text(Path(out_dir) / "sweep.html", page)
    return record
