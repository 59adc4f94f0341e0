"""What the benchmark scripts share: their common flags, cached exports, timing and the markdown tables.

Scripts import it as ``from _common import ...`` when run as ``python benchmarks/bench_x.py`` (the script's
folder is on ``sys.path``) and as ``benchmarks._common`` when imported as a package module.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Stopwatch",
    "add_cache",
    "add_profile_grid",
    "add_threads",
    "add_timing",
    "dense_onnx",
    "kv_onnx",
    "machine",
    "markdown_table",
    "parser",
    "peak_rss_mb",
    "quiet_logging",
    "speedup_rows",
]

# -- flags ---------------------------------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` prints the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_cache(parser: argparse.ArgumentParser, help: str = "folder for the exports") -> None:
    """``--cache``: where exports are written once and reused by later runs."""
    parser.add_argument("--cache", type=Path, default=Path(".p2d-cache"), help=help)


def add_threads(parser: argparse.ArgumentParser, help: str = "ORT intra-op threads (default: ORT's)") -> None:
    parser.add_argument("--threads", type=int, default=None, help=help)


def add_profile_grid(parser: argparse.ArgumentParser, *, budget: float) -> None:
    """``--batch``, ``--seq``, ``--threads`` and ``--budget`` of compile's side-by-side latency profile."""
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, nargs="+", default=[128])
    add_threads(parser)
    parser.add_argument("--budget", type=float, default=budget, help="timing budget per grid point (s)")


def add_timing(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    """``--repeats`` and ``--warmup`` of a decode-latency measurement."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)


def quiet_logging(*loud: str) -> None:
    """Warnings only, as bare messages; the named loggers (the script's own, ``prune2deploy``) at INFO."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in loud:
        logging.getLogger(name).setLevel(logging.INFO)


# -- exports -----------------------------------------------------------------------------------------------------


def dense_onnx(cache: Path, name: str) -> Path:
    """The dense no-cache graph, exported once (api.load_source: the same export compile does)."""
    from prune2deploy import api
    from prune2deploy.frontends.onnx import save_onnx
    from prune2deploy.spec import CompileOptions

    path = cache / f"{name}.onnx"
    if not path.exists():
        start = time.perf_counter()
        save_onnx(api.load_source(name, CompileOptions(passes=[], profile=False)).model, path)
        print(f"exported {name} to {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def kv_onnx(cache: Path, model: str) -> Path:
    """The KV-cache decoder graph of ``model`` (a bundled name or HF folder), exported once."""
    from prune2deploy.frontends.decoder import export_decoder
    from prune2deploy.frontends.hf import load_hf_model

    path = cache / f"{Path(model).name}-kv.onnx"
    if not path.exists():
        start = time.perf_counter()
        export_decoder(load_hf_model(model), path)
        print(f"exported {model} with KV cache to {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


# -- timing ------------------------------------------------------------------------------------------------------


class Stopwatch:
    """Wall-clock seconds since creation (``seconds``), or of a ``with`` block (``lap``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def lap(self) -> Iterator[dict[str, float]]:
        result: dict[str, float] = {}
        start = time.perf_counter()
        try:
            yield result
        finally:
            result["s"] = time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, str]:
    """Where a measurement ran, for the JSON results."""
    return {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}


# -- tables ------------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: the header, its ``|---|`` rule, and one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def speedup_rows(report: dict, *, digits: int = 3, runs: bool = True, percent: bool = True) -> list[list[str]]:
    """Cells of compile's side-by-side latency: batch, seq, reference and compiled median ms, [runs
    reference/compiled], measured and ideal (FLOP-ratio) speedup, [measured as % of ideal]."""
    latency = {(r["model"], r["batch"], r["seq"]): r for r in report["latency"]}
    rows = []
    for s in report["speedup"]:
        ref, new = latency[("reference", s["batch"], s["seq"])], latency[("compiled", s["batch"], s["seq"])]
        row = [str(s["batch"]), str(s["seq"]), f"{ref['median_ms']:.1f}", f"{new['median_ms']:.1f}"]
        if runs:
            row.append(f"{ref['runs']}/{new['runs']}")
        row += [f"{s['measured']:.{digits}f}x", f"{s['ideal_speedup']:.{digits}f}x"]
        if percent:
            row.append(f"{100 * s['measured'] / s['ideal_speedup']:.0f}%")
        rows.append(row)
    return rows
