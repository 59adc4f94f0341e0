"""``prune2deploy demo``: a bundled real model, half its MLP neurons masked by magnitude, compiled."""

from __future__ import annotations

import argparse
from pathlib import Path

from prune2deploy.cli.flags import HelpFormatter, positive_float
from prune2deploy.cli.progress import progress
from prune2deploy.cli.summary import print_compile

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Compile a bundled real model with a fraction of every MLP's neurons masked by weight magnitude: the "
    "whole tool on one command, with report.html in the output folder."
)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1), not {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo", help="compile a bundled real model with 50%% of its MLP channels masked", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    d.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "minilm-l6"], help="bundled model")
    d.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of MLP neurons to mask (by magnitude)")
    d.add_argument("--out", default="build/demo", help="output folder")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    d.add_argument(
        "--budget", type=positive_float, default=20.0, metavar="S", help="seconds of timing at batch 1, seq 128 at most"
    )
    d.add_argument("--quiet", action="store_true", help="only the result: no progress lines, library bars or warnings")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    out = Path(args.out)
    steps = progress(args.quiet)
    try:
        result = api.demo(args.model, out, ratio=args.ratio, overwrite=args.overwrite, budget_s=args.budget,
                          progress=steps)  # fmt: skip
    finally:
        steps.close()
    print_compile(result.report, out)
    print(f"  report: {out}/report.html  ·  inspect with: prune2deploy inspect {out}/model.onnx")
    return 0
