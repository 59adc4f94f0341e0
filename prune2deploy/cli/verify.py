"""``prune2deploy verify``: a compiled ONNX model against its reference on ONNX Runtime CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from prune2deploy.cli.flags import HelpFormatter, relative_tolerance
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Compare a compiled ONNX model with its reference on ONNX Runtime CPU, on random feeds and your own; exit 1 "
    "when an output differs by more than the tolerance."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "verify", help="compare a compiled ONNX with its reference on ONNX Runtime CPU", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    v.add_argument("model", type=Path, help="the compiled ONNX file")
    v.add_argument("--reference", type=Path, required=True, help="the ONNX file it must match (reference.onnx)")
    v.add_argument("--feeds", type=Path, nargs="+", help=".npz/.safetensors feeds besides the random ones")
    v.add_argument("--tolerance", type=relative_tolerance, default=1e-4, help="relative error allowed")
    v.add_argument("--json", action="store_true", help="print the comparison as JSON")
    v.set_defaults(func=run)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    result = api.verify(args.model, args.reference, feeds=args.feeds, tolerance=args.tolerance)
    if args.json:
        print(dumps_json(result.as_dict(), indent=2))
        return 0 if result.passed else 1
    for name, o in result.outputs.items():
        print(
            f"{name}: max_abs {_num(o['max_abs'], '.3e')}  max_rel {_num(o['max_rel'], '.3e')}  "
            f"cosine {_num(o['cosine'], '.6f')}"
        )
    print(api.verdict_line(result.as_dict()))
    for note in api.verification_notes(result.as_dict()):
        print(f"note: {note}")
    return 0 if result.passed else 1
