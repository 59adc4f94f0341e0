"""The console summary of a compile (``compile``, ``demo``, ``prune --compile``): report.json for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prune2deploy.cli.render import count, indent, table

__all__ = ["print_compile"]


def print_compile(report: dict[str, Any], out_dir: Path) -> None:
    """What was compiled and how it went: sizes, passes, notes, outputs, quality, verdict, speed, engine."""
    from prune2deploy import api

    ref, new = report["model"]["reference"], report["model"]["compiled"]
    shape = report["model"]["cost_shape"]
    print(f"compiled → {out_dir}/model.onnx")
    print(
        f"  params {count(ref['params'])} → {count(new['params'])}   FLOPs {count(ref['flops'])} → "
        f"{count(new['flops'])}  (batch {shape['batch']}, seq {shape['seq']})"
    )
    _print_passes(report["passes"])
    _print_groups(report.get("groups") or {})
    for note in api.pruning_notes(report):
        print(f"  {note}")
    _print_outputs(report)
    _print_quality(report.get("quality"))
    _print_verification(report["verification"], report["passes"])
    baseline = report.get("baseline") or {}
    _print_latency(report.get("latency", []), report.get("speedup", []), baseline.get("speedup") or [])
    _print_engine(report.get("engine"), out_dir)
    _print_predictions(report.get("predictions") or [], bool(report.get("options", {}).get("gpus")))
    _print_baseline(report)


def _print_passes(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        extras = {k: v for k, v in entry["record"].items() if not isinstance(v, (dict, list))}
        refused = f"  refused={len(entry['refused'])}" if entry["refused"] else ""
        print(
            f"  pass {entry['pass']:<18} exact={entry['exact']}  "
            + "  ".join(f"{k}={v}" for k, v in extras.items())
            + refused
        )


#: The groups that are neither prunable nor blocked: axes without a static width (not channels).
_UNSIZED = "without a static width (batch/sequence axes, not channels)"


def _print_groups(groups: dict[str, Any]) -> None:
    """How many channel groups could be pruned, and why the others could not (grouped by reason); the counts
    add up to the total (prunable + blocked + axes without a static width)."""
    if not groups.get("total"):
        return
    blocked = groups.get("blocked") or []
    unsized = groups["total"] - groups["prunable"] - len(blocked)
    line = f"  channel groups: {groups['prunable']} of {groups['total']} prunable"
    if unsized:
        line += f", {unsized} {_UNSIZED}"
    if not blocked:
        print(line)
        return
    reasons: dict[str, int] = {}
    hints: dict[str, str] = {}
    for b in blocked:
        reasons[b["reason"]] = reasons.get(b["reason"], 0) + 1
        hints[b["reason"]] = b.get("hint") or ""
    print(f"{line}; {len(blocked)} not:")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:4]:
        print(f"    {n:>3} × {reason[:100]}" + (f"\n          → {hints[reason]}" if hints[reason] else ""))
    if len(reasons) > 4:
        print(f"    … {len(reasons) - 4} more reasons in report.json (groups.blocked)")


def _print_outputs(report: dict[str, Any]) -> None:
    """genai/ and hf/: written (with their check) or why not."""
    for key, label in (("genai", "genai/"), ("hf", "hf/")):
        section = report.get(key)
        if section is None:
            continue
        if not section.get("written"):
            print(f"  {label:<7} not written: {section.get('reason')}")
            continue
        heads = sorted({tuple(h) for h in section.get("per_layer_heads", [])})
        line = f"  {label:<7} written"
        if heads:
            line += f"  (heads, kv heads) per layer: {', '.join(f'{h}/{k}' for h, k in heads)}"
        line += _check_text(section)
        print(line)
        if section.get("warning"):
            print(f"    warning: {section['warning']}")
        padded = section.get("padded") or {}
        if padded:
            where, why = next(iter(padded.items()))
            more = f" (and {len(padded) - 1} more places, report.json: {key}.padded)" if len(padded) > 1 else ""
            print(f"    zero heads/neurons kept for the runtime's shapes at {where}: {why}{more}")
        if section.get("padding"):
            pad = section["padding"]
            shape = "/".join(str(v) for v in pad["shape"].values())
            print(
                f"    padded to one shape (heads/kv heads/neurons {shape}) with zero neurons/heads: "
                f"{pad['params_share']:.1%} of its parameters, {pad['flops_share']:.1%} of its matmul FLOPs"
            )
    _print_hf_nas(report.get("hf_nas"))
    _print_gguf(report.get("gguf"))


def _print_hf_nas(section: dict[str, Any] | None) -> None:
    """hf-nas/: its layers, vLLM's reader rules and transformers' reload check (a verdict), or why not written."""
    if section is None:
        return
    if not section.get("written"):
        print(f"  {'hf-nas/':<7} not written: {section.get('reason')}")
        return
    free = section.get("attention_free_layers") or []
    line = f"  {'hf-nas/':<7} written (nemotron-nas, {len(section.get('per_layer', []))} layers"
    line += f", attention-free: {', '.join(map(str, free))})" if free else ")"
    rules = section.get("vllm_rules") or {}
    line += "  vLLM reader rules " + ("passed" if rules.get("passed") else "FAILED")
    check = section.get("check") or {}
    if check.get("error"):
        line += f"; transformers FAILED: {check['error']}"
    elif "passed" in check:
        verdict = "PASSED" if check["passed"] else "FAILED"
        line += f"; transformers {verdict}: max rel. error {check['max_rel_diff']:.2g} (bound {check['bound']:g})"
    print(line)
    padding = section.get("padding")
    if padding and padding.get("params_added"):
        print(
            f"    padded to the format's rules with zero heads/neurons: {padding['params_share']:.1%} of its "
            f"parameters, {padding['flops_share']:.1%} of its matmul FLOPs"
        )


def _print_gguf(section: dict[str, Any] | None) -> None:
    """gguf/: each file's architecture and llama.cpp's check (a verdict for f32, numbers for quantized types)."""
    if section is None:
        return
    if not section.get("written"):
        print(f"  {'gguf/':<7} not written: {section.get('reason')}")
        return
    for kind, entry in section["files"].items():
        check = entry.get("check") or {}
        line = f"  {'gguf/':<7} {entry['file']} ({entry['arch']}, {entry['bytes'] / 1e6:.1f} MB)"
        if not check.get("checked"):
            line += f"  not checked: {check.get('reason')}"
        elif "passed" in check:
            verdict = "PASSED" if check["passed"] else "FAILED"
            line += f"  llama.cpp {verdict}: max rel. error {check['max_rel_diff']:.2g} (bound {check['bound']:g})"
        else:
            line += f"  llama.cpp ({kind}, approximate): top-1 {check['top1_agreement']:.1%}, KL {check['kl']:.3g}"
        print(line)
        if entry.get("padded_mlp"):
            print(f"    {len(entry['padded_mlp'])} MLP(s) padded with zero neurons to whole 32-value blocks")


def _check_text(section: dict[str, Any]) -> str:
    """An output's check: the error and token equality for exact folders; for approximate ones (quantized
    decoders) their error as such — KL, top-1 and token agreement — never a verdict."""
    check = section.get("check") or {}
    tokens = section.get("genai") or check
    if check.get("status") == "approximate":
        text = f"  {section.get('precision', 'quantized')} (approximate): KL {check['kl_mean']:.3g}"
        if "top1_agreement" in check:
            text += f", top-1 {check['top1_agreement']:.1%}"
        if "token_agreement" in tokens:
            text += f", greedy tokens agree {tokens['token_agreement']:.0%}"
        return text
    if check.get("status") == "not checked":
        return f"  not checked: {check.get('reason')}"
    text = f"  max rel diff {check['max_rel_diff']:.2e}" if "max_rel_diff" in check else ""
    if "greedy_tokens_equal" in tokens:
        text += f"  greedy tokens equal: {tokens['greedy_tokens_equal']}"
    return text


def _print_quality(section: dict[str, Any] | None) -> None:
    """The quality section: vs the masked reference and vs dense, and who cost the quality when it fell."""
    from prune2deploy import api

    line = api.quality_line(section)
    if line:
        print(f"  quality {line}")
    warning = api.quality_warning(section)
    if warning:
        print(f"  note: {warning}")


def _print_verification(ver: dict[str, Any], passes: list[dict[str, Any]]) -> None:
    from prune2deploy import api

    approximate = [e["pass"] for e in passes if not e["exact"]]
    line = api.verdict_line(ver)
    if approximate and ver.get("status") == "approximate":
        line += f" [approximate passes: {', '.join(approximate)}]"
    print(f"  verification {line}")
    for note in api.verification_notes(ver):
        print(f"  note: {note}")


def _print_latency(
    latency: list[dict[str, Any]], speedups: list[dict[str, Any]], over_baseline: list[dict[str, Any]] = ()
) -> None:
    """Reference vs compiled medians per measured shape, with the speedup, its 95% CI and the ideal; with
    ``--baseline`` the dense baseline's median and the speedup over it side by side (timed in the same run)."""
    speed = {(s["batch"], s["seq"]): s for s in speedups}
    reference = {(r["batch"], r["seq"]): r for r in latency if r["model"] == "reference"}
    baseline = {(r["batch"], r["seq"]): r for r in latency if r["model"] == "baseline"}
    over = {(s["batch"], s["seq"]): s for s in over_baseline}
    rows = []
    for row in (r for r in latency if r["model"] == "compiled"):
        ref_row = reference.get((row["batch"], row["seq"]))
        s = speed.get((row["batch"], row["seq"]), {})
        rows.append([
            row["batch"], row["seq"], f"{ref_row['median_ms']:.2f}" if ref_row else "-", f"{row['median_ms']:.2f}",
            f"{s.get('measured', 0):.2f}x", f"{s['ci'][0]:.2f}–{s['ci'][1]:.2f}x" if s.get("ci") else "-",
            f"{s['ideal_speedup']:.2f}x" if s.get("ideal_speedup") else "-",
        ])  # fmt: skip
        if baseline:
            base, b = baseline.get((row["batch"], row["seq"])), over.get((row["batch"], row["seq"]), {})
            rows[-1] += [f"{base['median_ms']:.2f}" if base else "-", f"{b['measured']:.2f}x" if b else "-"]
    if not rows:
        return
    print("  ONNX Runtime CPU latency (median ms, same run):")
    header = ["batch", "seq", "reference", "compiled", "speedup", "95% CI", "ideal (FLOP ratio)"]
    if baseline:
        header += ["dense baseline", "vs baseline"]
    print(indent(table(rows, header)))
    loose = [s for s in speedups if s.get("tight") is False]
    if loose:
        print(
            f"    not tight: the time budget ran out before the medians were known to ±{loose[0]['target_ci']:.0%}"
            " (raise --budget or use a quieter machine)"
        )


def _print_baseline(report: dict[str, Any]) -> None:
    """``--baseline``: size, measured and predicted speedup of the compiled model against the dense baseline."""
    from prune2deploy.profiling.summary import baseline_lines

    for line in baseline_lines(report):
        print(f"  {line}")


def _print_engine(engine: dict[str, Any] | None, out_dir: Path) -> None:
    if not engine:
        return
    artifact = f"{out_dir}/{engine['artifact']}" if engine.get("artifact") else "(in memory)"
    print(f"  engine {engine['engine']} → {artifact}")
    shapes = engine.get("shapes") or {}
    if shapes:
        spans = ", ".join(f"{axis} {lo}–{hi} (opt {opt})" for axis, (lo, opt, hi) in shapes.items())
        print(f"    accepts {spans}; change with --shapes batch=MIN:OPT:MAX seq=MIN:OPT:MAX")
    for note in (engine.get("info") or {}).get("notes", []):
        print(f"    note: {note}")
    if engine.get("verification") is None:
        print("    not run here (it needs its GPU); verified: the ONNX it was built from")


def _print_predictions(rows: list[dict[str, Any]], asked: bool) -> None:
    """The GPUs the user named, one row each; otherwise one line over the whole catalog."""
    if not rows:
        return
    if not asked:
        low, high = min(r["speedup"] for r in rows), max(r["speedup"] for r in rows)
        span = f"{low:.2f}×" if high - low < 0.005 else f"{low:.2f}–{high:.2f}×"
        print(f"  predicted speedup on {len(rows)} catalog GPUs: {span} (per GPU: report.html, or --gpu NAME)")
        return
    cells = [
        [r["gpu"], r["precision"], f"{r['reference_ms']:.3f}", f"{r['compiled_ms']:.3f}", f"{r['speedup']:.2f}x",
         r["binding"]]
        for r in rows
    ]  # fmt: skip
    print(f"  predicted on GPU ({rows[0]['engine']} cost model, batch {rows[0]['batch']}, seq {rows[0]['seq']}):")
    print(indent(table(cells, ["gpu", "precision", "reference ms", "compiled ms", "speedup", "bound"])))
