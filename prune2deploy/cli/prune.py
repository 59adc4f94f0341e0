"""``prune2deploy prune``: score a dense model, write masks and a plan, optionally compile them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prune2deploy.cli.flags import HelpFormatter, positive_int
from prune2deploy.cli.progress import progress
from prune2deploy.cli.render import percent
from prune2deploy.cli.summary import print_compile

__all__ = ["add_parser", "run"]

#: Structure flag → what its ratio removes.
_STRUCTURES = {
    "unstructured": "single weights (unstructured sparsity: no smaller model, only zeros)",
    "mlp": "MLP neurons (intermediate channels) per layer",
    "heads": "attention heads (query heads; whole heads, so the ratio is rounded per layer)",
    "hidden": "hidden-stream channels (the residual width, shared by every layer)",
    "layers": "whole decoder layers (approximate: a depth plan)",
}
_CRITERIA = (
    "magnitude: weight norms, no data; wanda: |weight| × input activation norm (Sun et al. 2023); taylor: "
    "first-order loss change on calibration text; minitron: activation-based widths and depth (Muralidharan et "
    "al. 2024); michel: head importance from the loss gradient (Michel et al. 2019)"
)
_GROUPINGS = (
    "free: any query heads per layer; uniform: the same number kept in every layer; whole-group: only whole "
    "GQA groups (a kv head and its query heads)"
)
DESCRIPTION = (
    "Score a dense model with a published criterion and write masks.safetensors and plan.yaml (then "
    "`prune2deploy compile --plan`, or --compile here)."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "prune", help="score a dense model and write masks + plan (criteria from the papers)",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    q.add_argument("model", help="HF folder, .gguf, or bundled model name")
    q.add_argument("--out", required=True, help="folder for masks.safetensors and plan.yaml")
    q.add_argument("--criterion", default="magnitude", choices=["magnitude", "wanda", "taylor", "minitron", "michel"],
                   help=_CRITERIA)  # fmt: skip
    for name, text in _STRUCTURES.items():
        q.add_argument(f"--{name}", type=float, metavar="RATIO", help=f"fraction of {text} to remove")
    q.add_argument("--nm", metavar="N:M", help="N:M pattern along the input dimension, e.g. 2:4 (sparse tensor cores)")
    q.add_argument("--global", dest="global_", action="store_true", help="rank globally instead of per layer")
    q.add_argument("--global-scale", default="standardize", choices=["standardize", "raw"],
                   help="with --global: standardize ranks each layer's scores after removing their mean and "
                   "dividing by their spread (FLAP), so deep layers' larger activations do not empty the first "
                   "layers; raw ranks the scores as they are")  # fmt: skip
    q.add_argument("--min-keep", type=float, default=0.0, metavar="FRACTION",
                   help="with --global: the fraction of every layer's neurons/heads that always stays "
                   "(default 0: no floor)")  # fmt: skip
    q.add_argument("--round-to", type=positive_int, metavar="K", help="round kept widths to a multiple (8, 16, 64)")
    q.add_argument("--head-grouping", default="free", choices=["free", "uniform", "whole-group"], help=_GROUPINGS)
    q.add_argument("--calibration", type=Path, help="text or token-id file (default: the bundled text)")
    q.add_argument("--samples", type=positive_int, default=24, help="calibration sequences")
    q.add_argument("--seq-len", type=positive_int, default=128, help="tokens per calibration sequence")
    q.add_argument("--compile", action="store_true", help="then compile with the masks into OUT/compiled")
    q.add_argument("--no-profile", action="store_true", help="with --compile: skip latency measurement")
    q.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    q.set_defaults(func=run)


def _nm(text: str | None) -> tuple[int, int] | None:
    from prune2deploy.errors import ConfigError

    if not text:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError as exc:
        raise ConfigError(f"--nm takes N:M such as 2:4, not '{text}'") from exc
    return n, m


def _check_global(args: argparse.Namespace) -> None:
    """--global-scale and --min-keep shape the global ranking only: without --global they would do nothing."""
    from prune2deploy.errors import ConfigError

    if not args.global_ and (args.global_scale != "standardize" or args.min_keep):
        raise ConfigError("--global-scale and --min-keep apply to the global ranking: add --global, or drop them")


def _print_structures(rows: dict[str, dict[str, Any]]) -> None:
    """Per structure: the ratio asked for and what was removed in whole units, with the kept widths."""
    for name, row in rows.items():
        asked = f"asked {percent(row['asked'])}, " if row.get("asked") is not None else ""
        line = f"  {name}: {asked}removed {percent(row['removed'])}"
        kept, width = row.get("kept"), row.get("width")
        if kept:
            low, high = min(kept), max(kept)
            span = f"{low}" if low == high else f"{low}–{high}"
            where = " per layer" if len(kept) > 1 else ""
            line += f" (kept {span} of {max(width)}{where})"
        print(line)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    say = progress(args.quiet)
    say(f"scoring {args.model} with {args.criterion}")
    structures = {name: getattr(args, name) for name in _STRUCTURES if getattr(args, name) is not None}
    _check_global(args)
    result = api.prune(
        args.model, args.out, criterion=args.criterion, structures=structures, per_layer=not args.global_,
        round_to=args.round_to, nm=_nm(args.nm), calibration=args.calibration, num_samples=args.samples,
        seq_len=args.seq_len, overwrite=args.overwrite, head_grouping=args.head_grouping,
        global_scale=args.global_scale, min_keep=args.min_keep,
    )  # fmt: skip
    print(f"masks → {result.masks_path}\nplan  → {result.plan_path}")
    for key, value in result.summary.items():
        if key != "structures":
            print(f"  {key}: {value}")
    _print_structures(result.summary.get("structures") or {})
    compiled_dir = Path(args.out) / "compiled"
    if not args.compile:
        say.close()
        specs = api.pass_specs()
        flags = "".join(f" {specs[name].switch[0]}" for name in api.plan_passes(result.plan) if specs[name].switch)
        print(f"next: prune2deploy compile {args.model} --plan {result.plan_path} --out {compiled_dir}{flags}")
        return 0
    options = api.plan_options(result, overwrite=args.overwrite, profile=not args.no_profile)
    try:
        compiled = api.compile(args.model, compiled_dir, options, progress=say)
    finally:
        say.close()
    print_compile(compiled.report, compiled_dir)
    return 0
