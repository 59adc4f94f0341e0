"""``prune2deploy inspect``: channel groups, layers, attention heads and 2:4 eligibility of an ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prune2deploy.cli.flags import HelpFormatter
from prune2deploy.cli.render import count, table
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "What can be pruned in an ONNX model: its coupled channel groups (prunable or not, and why), residual "
    "blocks, attention heads, and which weights can take 2:4 sparsity."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "inspect", help="channel groups of an ONNX model, prunable or not and why", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    i.add_argument("model", type=Path, help="ONNX file")
    i.add_argument("--tensors", action="store_true", help="list each group's tensor axes and blocking nodes")
    i.add_argument("--json", action="store_true", help="print everything as JSON")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    info = api.inspect(args.model)
    if args.json:
        print(dumps_json(info, indent=2))
        return 0
    cut = info.get("groups_at_fused_ops")
    print(
        f"{info['model']}: {count(info['params'])} parameters, {info['nodes']} nodes, "
        f"{len(info['groups'])} channel groups, {info['prunable']} prunable"
        + (f", {cut} cut at a fused op" if cut is not None else "")
    )
    if info.get("fused"):
        print(f"note: {info['fused']['note']}")
    _print_groups(info)
    _print_layers(info.get("layers", []))
    _print_attention(info.get("attention", []))
    _print_sparsity(info["sparsity_2_4"])
    if args.tensors:
        _print_tensors(info["groups"])
    return 0


def _zero_cell(group: dict[str, Any]) -> str:
    if not group["prunable"]:
        return "-"
    text = str(group["zero_channels"])
    if group.get("zero_weight_nonzero_bias"):
        text += f" (+{group['zero_weight_nonzero_bias']} zero-weight, bias≠0)"
    return text


def _print_groups(info: dict[str, Any]) -> None:
    rows = []
    for g in info["groups"]:
        blocked = g["blocked"][0] if g["blocked"] and not g["prunable"] else None
        why = f"{blocked['reason']} @ {blocked['node']}" if blocked else ""
        rows.append(
            [g["label"], g["width"], _zero_cell(g), "yes" if g["prunable"] else "no", g["num_tensors"], why[:90]]
        )
    print(table(rows, ["group", "width", "zero", "prunable", "tensors", "blocked by"]))
    if info.get("zero_weight_nonzero_bias"):
        print(
            f"note: {info['zero_weight_nonzero_bias']} channels have all-zero weights but a non-zero bias (what "
            "torch.nn.utils.prune.ln_structured leaves): they still output their bias, so they are not counted as "
            "zero. Zero the bias with the weight (a mask file's '.bias' entry) to remove them."
        )


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _fused_cell(row: dict[str, Any]) -> str:
    """The fused ops that hide what a row counts (``hidden_by_fused``), or ``-``."""
    return ", ".join(row.get("hidden_by_fused") or []) or "-"


def _print_layers(layers: list[dict[str, Any]]) -> None:
    fused = any(layer.get("hidden_by_fused") for layer in layers)
    rows = []
    for layer in layers:
        subs = " ".join(f"{b['kind']}{'=0' if b['zero'] else ''}" for b in layer["sub_blocks"])
        why = layer["blocked_by"] or next((b["blocked_by"] for b in layer["sub_blocks"] if b["blocked_by"]), "")
        rows.append([
            layer["layer"], subs or "-", "yes" if layer["removable"] else "no", _or_dash(layer["hidden_width"]),
            layer["zero_hidden_channels"], *([_fused_cell(layer)] if fused else []), why[:60],
        ])  # fmt: skip
    if rows:
        print("\nlayers (residual blocks):")
        heads = ["layer", "sub-blocks", "removable", "hidden", "zero hidden"]
        print(table(rows, [*heads, *(["hidden by fused"] if fused else []), "why not"]))


def _print_attention(blocks: list[dict[str, Any]]) -> None:
    fused = any(block.get("hidden_by_fused") for block in blocks)
    rows = []
    for block in blocks:
        why = "; ".join(block["reasons"])[:60] if not block["supported"] else ""
        rows.append([
            block["layer"] or block["block"], block["heads"], *([block.get("heads_from") or "-"] if fused else []),
            block["kv_heads"], block["head_dim"], block["gqa"] or "-", ",".join(block["zero_heads"]) or "-",
            *([_fused_cell(block)] if fused else []), "yes" if block["supported"] else "no", why,
        ])  # fmt: skip
    if rows:
        print("\nattention:")
        heads = ["layer", "heads", *(["heads from"] if fused else []), "kv heads", "head_dim", "kv map", "zero heads"]
        print(table(rows, [*heads, *(["hidden by fused"] if fused else []), "ok", "why not"]))


def _print_sparsity(sp: dict[str, Any]) -> None:
    reasons: dict[str, int] = {}
    for w in sp["weights"]:
        if not w["eligible"]:
            reasons[w["reason"]] = reasons.get(w["reason"], 0) + 1
    print(
        f"\n2:4 sparsity: {sp['eligible']} of {sp['nodes']} MatMul/Gemm/Conv weights eligible, "
        f"{sp['already_nm']} already 2:4 ({100 * sp['sparse_flops_fraction']:.1f}% of their FLOPs)"
    )
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  not eligible ({n}): {reason}")


def _print_tensors(groups: list[dict[str, Any]]) -> None:
    for g in groups:
        print(f"\n{g['label']} (width {g['width']}): weights {', '.join(g['weights']) or '-'}")
        more = g["num_tensors"] - len(g["tensors"])
        print(f"  axes: {', '.join(g['tensors'])}" + (f" … (+{more})" if more > 0 else ""))
        for b in g["blocked"]:
            print(f"  blocked: {b['tensor']} at {b['node']}: {b['reason']}")
