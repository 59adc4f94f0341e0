"""``prune2deploy demo``: a bundled real model, 30% of its MLP neurons pruned by activation importance, compiled."""

from __future__ import annotations

import argparse
from pathlib import Path

from prune2deploy.cli.flags import HelpFormatter, positive_float
from prune2deploy.cli.progress import progress
from prune2deploy.cli.summary import print_compile

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Prune a fraction of every MLP's neurons of a bundled real model (chosen by activation importance on the "
    "bundled calibration text, as `prune --criterion minitron` does) and compile it: the whole tool on one "
    "command, with report.html in the output folder and the plan and masks in OUT/inputs/."
)


def api_defaults() -> tuple[float, str]:
    """The demo's ratio and criterion, as the API defines them."""
    from prune2deploy.api import DEMO_CRITERION, DEMO_RATIO

    return DEMO_RATIO, DEMO_CRITERION


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1), not {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo", help="prune and compile a bundled real model (30%% of its MLP neurons)", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    d.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "minilm-l6"], help="bundled model")
    d.add_argument("--ratio", type=_ratio, default=api_defaults()[0], help="fraction of MLP neurons to prune")
    d.add_argument(
        "--criterion", default=api_defaults()[1], choices=["minitron", "wanda", "magnitude", "taylor"],
        help="how the neurons are chosen (prune's criteria; calibrated on the bundled text)",
    )  # fmt: skip
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
        result = api.demo(args.model, out, ratio=args.ratio, criterion=args.criterion, overwrite=args.overwrite,
                          budget_s=args.budget, progress=steps)  # fmt: skip
    finally:
        steps.close()
    print_compile(result.report, out)
    print(f"  report: {out}/report.html  ·  inspect with: prune2deploy inspect {out}/model.onnx")
    return 0
