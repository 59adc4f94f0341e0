"""What the deployable-outputs part of the report says: genai/, hf/, hf-nas/ and gguf/ as plain rows and notes.

The HTML page renders these rows (``report_html``); they are kept apart as data so that the page and its
tests read the same wording. An output's check is information or a verdict exactly as its writer recorded
it: an exact output passes or fails against its bound, a quantized one shows its error (top-1, KL) and is
never called passed, and an output that was not checked says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["OutputTable", "check_text", "output_tables"]


@dataclass
class OutputTable:
    """One output folder: a caption, a table (headers and rows of cells) and notes under it."""

    folder: str
    headers: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)


def output_tables(report: dict[str, Any]) -> list[OutputTable]:
    """Tables for the output folders the compile wrote or refused; empty when it was asked for none."""
    tables = []
    for key in ("genai", "hf"):
        section = report.get(key)
        if section is not None:
            tables.append(_folder(f"{key}/", section))
    if report.get("hf_nas") is not None:
        tables.append(_hf_nas(report["hf_nas"]))
    if report.get("gguf") is not None:
        tables.append(_gguf(report["gguf"]))
    return tables


def _folder(folder: str, section: dict[str, Any]) -> OutputTable:
    """genai/ or hf/: written or why not, its check, and for a padded hf/ what the padding costs."""
    if not section.get("written"):
        return OutputTable(folder, ["written"], [["no"]], [f"not written: {section.get('reason', 'no reason given')}"])
    row = ["yes", section.get("precision", "—"), check_text(section.get("check"))]
    notes = []
    padding = section.get("padding")
    if padding:
        shape = padding.get("shape", {})
        notes.append(
            f"padded with zero heads/neurons to {shape.get('num_heads')} heads / {shape.get('kv_heads')} kv heads / "
            f"{shape.get('intermediate')} MLP neurons in every layer (exact): the padding is "
            f"{padding['params_share']:.1%} of the checkpoint's parameters and {padding['flops_share']:.1%} of its "
            "matmul FLOPs per token, which every runtime computes"
        )
    if section.get("warning"):
        notes.append(f"warning: {section['warning']}")
    return OutputTable(folder, ["written", "precision", "check"], [row], notes)


def _hf_nas(section: dict[str, Any]) -> OutputTable:
    """hf-nas/: written or why not, its layers (attention-/FFN-free ones), vLLM's reader rules, the reload check
    in transformers, and what the format's padding costs."""
    headers = ["written", "layers", "attention-free", "FFN-free", "vLLM reader rules", "transformers check"]
    if not section.get("written"):
        return OutputTable("hf-nas/", headers, [], [f"not written: {section.get('reason', 'no reason given')}"])
    rules = section.get("vllm_rules") or {}
    check = section.get("check")
    verdict = "" if not check or "passed" not in check else ("PASSED: " if check["passed"] else "FAILED: ")
    row = [
        "yes",
        len(section.get("per_layer", [])),
        ", ".join(str(i) for i in section.get("attention_free_layers", [])) or "none",
        ", ".join(str(i) for i in section.get("ffn_free_layers", [])) or "none",
        "passed" if rules.get("passed") else "; ".join(rules.get("problems", [])) or "not checked",
        verdict + (check.get("error") or check_text(check)) if check else "pending",
    ]
    notes = []
    padding = section.get("padding")
    if padding:
        notes.append(
            f"padded to the format's rules (full query heads, kv heads in groups of n_heads_in_group, FFN widths in "
            f"multiples of 256) with zero heads/neurons (exact): {padding['params_share']:.1%} of the checkpoint's "
            f"parameters and {padding['flops_share']:.1%} of its matmul FLOPs per token"
        )
    notes.extend(f"{runtime}: {text}" for runtime, text in (section.get("runtimes") or {}).items())
    if section.get("not_checked"):
        notes.append(section["not_checked"])
    return OutputTable("hf-nas/", headers, [row], notes)


def _gguf(section: dict[str, Any]) -> OutputTable:
    """gguf/: per file its type, size, architecture, padding and llama.cpp's check (or why it was skipped)."""
    headers = ["file", "type", "MB", "architecture", "MLPs padded", "padding params", "llama.cpp check"]
    if not section.get("written"):
        return OutputTable("gguf/", headers, [], [f"not written: {section.get('reason', 'no reason given')}"])
    rows = []
    for kind, entry in section.get("files", {}).items():
        padded = entry.get("padded_mlp") or []
        rows.append(
            [
                entry.get("file", f"model-{kind}.gguf"),
                kind,
                round(entry.get("bytes", 0) / 1e6, 1),
                entry.get("arch", "—"),
                len(padded),
                entry.get("padding_params", 0),
                _gguf_check(kind, entry.get("check") or {}),
            ]
        )
    notes = [text for text in (section.get("arch_reason"), section.get("check_input")) if text]
    return OutputTable("gguf/", headers, rows, notes)


def _gguf_check(kind: str, check: dict[str, Any]) -> str:
    """f32 has a verdict against its bound; quantized types have numbers; an unchecked file says why."""
    if not check.get("checked"):
        return f"not checked: {check.get('reason') or check.get('error') or 'no reason given'}"
    if "passed" in check:
        verdict = "PASSED" if check["passed"] else "FAILED"
        return f"{verdict}: max rel. error {check['max_rel_diff']:.2g} (bound {check['bound']:g})"
    return f"{kind} (approximate): top-1 {check['top1_agreement']:.1%}, KL {check['kl']:.3g}"


def check_text(check: dict[str, Any] | None) -> str:
    """A genai/ or hf/ check in words: the error and token equality, or an approximate output's error."""
    if not check:
        return "not checked"
    if check.get("status") == "not checked":
        return f"not checked: {check.get('reason')}"
    if check.get("status") == "approximate":
        text = f"approximate: KL {check['kl_mean']:.3g}"
        if "top1_agreement" in check:
            text += f", top-1 {check['top1_agreement']:.1%}"
        return text
    parts = []
    if "max_rel_diff" in check:
        parts.append(f"max rel. error {check['max_rel_diff']:.2e}")
    if "greedy_tokens_equal" in check:
        parts.append(f"greedy tokens equal: {'yes' if check['greedy_tokens_equal'] else 'no'}")
    return ", ".join(parts) or "not checked"
