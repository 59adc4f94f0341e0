"""What a compile report means, in sentences a person reads: shared by the console summary and report.html.

Each function reads report.json's sections and the pass registry (what kind of change each pass makes),
never a pass's name, so a new pass is described by its registration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MASKS_COST", "baseline_lines", "pruning_notes", "quality_line", "quality_warning"]

#: Where the masks cost "a lot": perplexity vs dense at least this many times the dense model's, top-1
#: agreement with the dense model below this fraction, or (encoders) embedding cosine below this.
MASKS_COST = {"ppl_ratio": 3.0, "top1": 0.5, "cosine": 0.9}
#: The compiled model "matches" the masked reference: top-1 agreement at least this, or cosine at least this.
_FAITHFUL = {"top1": 0.99, "cosine": 0.999}


def quality_line(section: Mapping[str, Any] | None) -> str:
    """One line of the report's quality section: each comparison's numbers and the text, or why none."""
    if not section:
        return ""
    if not section.get("computed"):
        return f"not measured: {section.get('reason')}"
    parts = []
    for c in section.get("comparisons") or []:
        if "kl_mean" in c:
            parts.append(
                f"vs {c['reference']}: KL {c['kl_mean']:.3g}, top-1 {100 * c['top1_agreement']:.1f}%, "
                f"ppl {c['ppl_candidate']:.2f} (ref {c['ppl_reference']:.2f})"
            )
        else:
            parts.append(f"vs {c['reference']}: embedding cosine {c['cosine_mean']:.5f} (min {c['cosine_min']:.5f})")
    unit = (
        f"{section['windows']}×{section['window']} tokens"
        if "window" in section
        else f"{section['sentences']} sentences"
    )
    return "; ".join(parts) + f"  [{unit} of {section.get('text')}]"


def _comparison(section: Mapping[str, Any], *, dense: bool) -> Mapping[str, Any] | None:
    for c in section.get("comparisons") or []:
        if str(c.get("reference", "")).startswith("dense") == dense:
            return c
    return None


def quality_warning(section: Mapping[str, Any] | None) -> str | None:
    """A plain sentence when the masks cost a lot of quality (:data:`MASKS_COST`), saying whether the masks
    or the compile did it; None when the quality vs the dense model is not far off or was not measured."""
    if not section or not section.get("computed"):
        return None
    dense, masked = _comparison(section, dense=True), _comparison(section, dense=False)
    if dense is None:
        return None
    if "ppl_candidate" in dense:
        ratio = dense["ppl_candidate"] / dense["ppl_reference"] if dense["ppl_reference"] else float("inf")
        if ratio < MASKS_COST["ppl_ratio"] and dense["top1_agreement"] >= MASKS_COST["top1"]:
            return None
        cost = (
            f"perplexity {dense['ppl_reference']:.2f} → {dense['ppl_candidate']:.2f} ({ratio:.1f}×) and top-1 "
            f"agreement {100 * dense['top1_agreement']:.0f}% vs the dense model"
        )
        faithful = masked is not None and masked.get("top1_agreement", 0) >= _FAITHFUL["top1"]
        match = f"top-1 {100 * masked['top1_agreement']:.1f}%" if faithful else ""
    else:
        if dense["cosine_mean"] >= MASKS_COST["cosine"]:
            return None
        cost = f"embedding cosine {dense['cosine_mean']:.3f} vs the dense model"
        faithful = masked is not None and masked.get("cosine_mean", 0) >= _FAITHFUL["cosine"]
        match = f"cosine {masked['cosine_mean']:.5f}" if faithful else ""
    if str(dense.get("reference", "")).startswith("dense baseline"):  # --baseline: an already-pruned input
        cost = cost.replace("vs the dense model", "vs the dense baseline")
        if faithful:
            return (
                f"the pruning cost this quality, not the compile: {cost}, while the compiled model matches its input "
                f"({match}); prune less, or with a criterion that keeps more"
            )
    if faithful:
        return (
            f"the masks cost this quality, not the compile: {cost}, while the compiled model matches the masked "
            f"reference ({match}); prune less, or with a criterion that keeps more (e.g. prune --criterion wanda)"
        )
    return f"quality is far from the dense model ({cost}), and the compiled model differs from the masked reference too"


def pruning_notes(report: Mapping[str, Any]) -> list[str]:
    """What the passes did about 2:4 sparsity, and why nothing was pruned when nothing was."""
    from prune2deploy.passes.registry import load_passes

    specs = load_passes()
    entries = report.get("passes") or []
    sparse = [e for e in entries if e["pass"] in specs and specs[e["pass"]].sparse_weights]
    notes = []
    twos = 0  # weights that are 2:4 after the passes
    for entry in sparse:
        r = entry["record"]
        twos += r.get("already_nm", 0) + r.get("made_nm", 0)
        notes.append(
            f"2:4: {r.get('already_nm', 0) + r.get('made_nm', 0)} of {r.get('eligible', 0)} eligible weights are 2:4 "
            f"({r.get('made_nm', 0)} made so here); the speed comes from sparse tensor cores: --engine tensorrt on an "
            "Ampere or later GPU"
        )
    model = report.get("model") or {}
    smaller = (model.get("compiled") or {}).get("params", 0) < (model.get("reference") or {}).get("params", 0)
    removed = any(e["modified"] for e in entries if e["pass"] in specs and specs[e["pass"]].structural)
    if smaller or removed:
        return notes
    given = report.get("options") or {}
    if twos:
        notes.append(
            "no channel, head or layer removed: the zeros are 2:4 within each weight, which keeps its shape; they "
            "pay off on sparse tensor cores, not as a smaller model"
        )
    elif given.get("masks") or given.get("plan"):
        notes.append(
            "nothing was pruned: the masks zero no whole channel, head or layer (unstructured zeros leave no "
            "structure to remove; `prune2deploy inspect` shows what is zero per group)"
        )
    elif report.get("baseline"):
        notes.append(
            "nothing left to remove here: no zero channels, heads or layers in the input (already pruned: see the "
            "comparison with the dense baseline)"
        )
    else:
        notes.append("nothing was pruned: no zero channels/heads found; did you mean --masks or --plan?")
    return notes


def baseline_lines(report: Mapping[str, Any]) -> list[str]:
    """``--baseline``: the compiled model against the dense model an already-pruned input came from, in sentences
    (size, measured speedup in the same run, predicted speedup per GPU; quality is in :func:`quality_line`)."""
    section = report.get("baseline")
    if not section:
        return []
    name = str(section.get("source") or section.get("path") or "?")
    lines = []
    base, new = section.get("model") or {}, (report.get("model") or {}).get("compiled") or {}
    if base.get("params") and base.get("flops") and "params" in new and "flops" in new:
        lines.append(
            f"vs dense baseline {name}: params {_change(base['params'], new['params'])}, FLOPs "
            f"{_change(base['flops'], new['flops'])} (ideal speedup {base['flops'] / max(new['flops'], 1):.2f}×)"
        )
    else:
        lines.append(f"vs dense baseline {name}")
    for row in section.get("speedup") or []:
        ci = f" (95% CI {row['ci'][0]:.2f}–{row['ci'][1]:.2f}×)" if row.get("ci") else ""
        loose = "; not tight: raise --budget" if row.get("tight") is False else ""
        lines.append(
            f"measured speedup vs dense baseline: {row['measured']:.2f}×{ci} on {row['engine']} CPU at batch "
            f"{row['batch']}, seq {row.get('seq')} (same run){loose}"
        )
    if section.get("profiled") is False and section.get("reason"):
        lines.append(f"baseline not timed: {section['reason']}")
    by_engine: dict[str, list[Mapping[str, Any]]] = {}
    for row in section.get("predictions") or []:
        if row.get("speedup"):
            by_engine.setdefault(str(row.get("engine")), []).append(row)
    for engine, rows in by_engine.items():
        low, high = min(r["speedup"] for r in rows), max(r["speedup"] for r in rows)
        span = f"{low:.2f}×" if high - low < 0.005 else f"{low:.2f}–{high:.2f}×"
        sparse = sum(1 for r in rows if r.get("sparse_used"))
        lines.append(
            f"predicted speedup vs dense baseline ({engine} cost model, {rows[0].get('precision')}): {span} on "
            f"{len(rows)} GPU{'s' if len(rows) != 1 else ''}"
            + (f"; 2:4 sparse tensor cores used on {sparse}" if sparse else "")
        )
    return lines


def _change(before: float, after: float) -> str:
    """``77.9k → 60.1k (-23%)``."""
    pct = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{_short(before)} → {_short(after)}{pct}"


def _short(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"
