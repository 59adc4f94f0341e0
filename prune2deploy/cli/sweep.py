"""``prune2deploy sweep``: a grid of prune × compile variants on Ray, one dense export."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prune2deploy.cli.flags import HelpFormatter, positive_int
from prune2deploy.cli.progress import progress
from prune2deploy.cli.render import count, table
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Compile a grid of prune/compile variants on Ray with one dense export; resumes where it stopped and writes "
    "sweep.json and sweep.html (Pareto fronts). Exit 1 if a variant failed."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "sweep", help="compile a grid of prune/compile variants on Ray (one dense export); exit 1 if a variant failed",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    w.add_argument("sweep", type=Path, help="sweep file (.yaml/.toml/.json): model, grid, prune, compile")
    w.add_argument("--out", required=True, type=Path, help="folder for the variants, sweep.json and sweep.html")
    w.add_argument("--address", help="Ray cluster to join (from `ray start --head`); default: a local cluster")
    w.add_argument(
        "--max-parallel", type=positive_int, help="variants in flight at most (Ray's resources bound it too)"
    )
    w.add_argument("--cache", type=Path, help="dense-export cache folder (default .p2d-cache or $P2D_CACHE_DIR)")
    w.add_argument("--json", action="store_true", help="print sweep.json")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    w.set_defaults(func=run)


def _row(v: dict[str, Any]) -> list[Any]:
    q = v.get("quality") or {}
    quality = f"KL {q['kl_mean']:.4f}" if "kl_mean" in q else (f"cos {q['cosine_mean']:.5f}" if q else "-")
    measured = next((r for r in v.get("latency_ms", []) or [] if r["kind"] == "measured"), None)
    status = "resumed" if v.get("resumed") else ("FAILED" if v["error"] else "done")
    params = (v.get("params") or {}).get("compiled")
    return [
        v["id"], status, count(params) if params else "-", f"{measured['compiled_ms']:.2f}" if measured else "-",
        f"{v['speedup']:.2f}x" if v.get("speedup") else "-", quality, (v["error"] or "")[:70],
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    result = api.sweep(
        args.sweep, args.out, address=args.address, max_parallel=args.max_parallel, cache_dir=args.cache,
        progress=progress(args.quiet or args.json),
    )  # fmt: skip
    record = result.record
    if args.json:
        print(dumps_json(record, indent=2))
        return 1 if result.failed else 0
    print(
        table(
            [_row(v) for v in record["variants"]], ["variant", "status", "params", "ms", "speedup", "quality", "error"]
        )
    )
    print(
        f"{len(result.ran)} ran, {len(result.skipped)} resumed, {len(result.failed)} failed; dense exports: "
        f"{record['exports']}  →  {Path(args.out) / 'sweep.html'}"
    )
    return 1 if result.failed else 0
