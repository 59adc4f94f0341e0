"""``prune2deploy profile``: ONNX Runtime CPU latency, side by side with a reference in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prune2deploy.cli.flags import HelpFormatter, positive_float, positive_int, thread_count
from prune2deploy.cli.progress import progress
from prune2deploy.cli.render import table
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Measure ONNX Runtime CPU latency (median, p90, p99, throughput) of an ONNX model, optionally side by side "
    "with a reference in the same run, until each median's 95% CI is within ±2% or the budget runs out."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="ONNX Runtime CPU latency, optionally side by side with a reference", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument("model", type=Path, help="ONNX file")
    p.add_argument("--against", type=Path, help="reference ONNX measured in the same run")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="batch sizes")
    p.add_argument(
        "--seq",
        type=positive_int,
        nargs="+",
        help="sequence lengths (default 128, or the model's position-table length)",
    )
    p.add_argument("--threads", type=thread_count, help="ONNX Runtime intra-op threads (default: ONNX Runtime's)")
    p.add_argument(
        "--budget", type=positive_float, default=10.0, metavar="S", help="seconds of timing per shape at most"
    )
    p.add_argument("--ops", action="store_true", help="also ONNX Runtime's per-op-type breakdown")
    p.add_argument(
        "--memory-limit-gib",
        type=positive_float,
        metavar="GIB",
        help="refuse shapes estimated to need more memory (default: half of this machine's)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    steps = progress(args.quiet or args.json)
    models = f"{args.model} against {args.against}" if args.against else str(args.model)
    steps(f"timing {models} on ONNX Runtime CPU: {len(args.batch) * len(args.seq or [128])} shape(s), "
          f"up to {args.budget:g} s each")  # fmt: skip
    try:
        rows = api.profile(
            args.model, against=args.against, batches=args.batch, seqs=args.seq, threads=args.threads,
            budget_s=args.budget, ops=args.ops, memory_limit_gib=args.memory_limit_gib,
        )  # fmt: skip
    finally:
        steps.close()
    if args.json:
        print(dumps_json(rows, indent=2))
        return 0
    _print_latency([r for r in rows if r.get("kind") == "latency"])
    for r in rows:
        if r.get("kind") == "speedup":
            print(f"speedup at batch {r['batch']} seq {r['seq']}: {r['measured']:.2f}x")
    for r in rows:
        if r.get("kind") == "ops":
            print(f"\n{r['model']}: ONNX Runtime time per op type (ms per run, first grid point)")
            cells = [
                [o["op_type"], f"{o['calls_per_run']:g}", f"{o['ms_per_run']:.3f}", f"{100 * o['share']:.1f}%"]
                for o in r["by_op_type"][:12]
            ]
            print(table(cells, ["op", "calls", "ms", "share"]))
    return 0


def _print_latency(rows: list[dict[str, Any]]) -> None:
    cells = [
        [r["model"], r["batch"], r["seq"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
         r["runs"], f"{r['throughput']:.1f}"]
        for r in rows
    ]  # fmt: skip
    print(table(cells, ["model", "batch", "seq", "median ms", "p90 ms", "p99 ms", "runs", "samples/s"]))
    loose = [r for r in rows if r.get("stop_reason") == "budget"]
    if loose:
        print(
            f"not tight: {len(loose)} median(s) stopped at the --budget before their 95% CI reached ±2% "
            f"(widest ±{max(r['rel_ci'] for r in loose):.0%}); raise --budget"
        )
