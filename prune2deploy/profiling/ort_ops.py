"""Where ONNX Runtime spends its time: per op type and per node, from its own profiling trace.

A whole-model speedup that falls short of the FLOP reduction is explained by the ops that did not
shrink (attention softmax, norms, layout copies). ONNX Runtime's profiler records every kernel call; this
module runs a session with profiling on, drops the warm-up runs and aggregates the kernel times.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from prune2deploy.errors import ConfigError

__all__ = ["ort_op_breakdown", "parse_ort_profile"]

log = logging.getLogger(__name__)

_KERNEL_SUFFIX = "_kernel_time"


def parse_ort_profile(events: Sequence[Mapping], *, skip_runs: int = 0, top: int = 20) -> dict:
    """Aggregates an ONNX Runtime trace (the list of Chrome-trace events) per op type and per node.

    Only kernel events (``cat == "Node"``, name ending in ``_kernel_time``) that fall inside a
    ``model_run`` event are counted, and the first ``skip_runs`` model runs are dropped, so that
    warm-up (arena growth, kernel selection) and session setup do not inflate the numbers. A node's time
    is the median over the kept runs of its time in that run, so one preempted kernel on a shared machine
    does not make its op type look slow; op types and totals are sums of these medians.

    Returns:
        ``{"runs", "model_run_ms", "kernel_ms", "by_op_type", "top_nodes"}``: ``model_run_ms`` is the median
        wall time of one run as ORT saw it, ``kernel_ms`` the kernel time of one run (less than
        ``model_run_ms`` by the framework overhead, more with parallel kernels). ``by_op_type`` rows are
        ``{"op_type", "calls_per_run", "ms_per_run", "share"}`` sorted by time; ``top_nodes`` rows are
        ``{"node", "op_type", "provider", "ms_per_run", "share"}``, the ``top`` slowest nodes. ``share``
        is the fraction of ``kernel_ms``.
    """
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    kept = runs[skip_runs:]
    if not kept:
        raise ConfigError(f"the profile has {len(runs)} model runs; none left after skipping {skip_runs}")
    starts = [e["ts"] for e in kept]
    ends = [e["ts"] + e["dur"] for e in kept]
    n = len(kept)

    def run_index(ts: float) -> int | None:
        index = bisect.bisect_right(starts, ts) - 1
        return index if index >= 0 and ts <= ends[index] else None

    per_run_us: dict[str, np.ndarray] = {}
    calls: dict[str, int] = defaultdict(int)
    info: dict[str, tuple[str, str]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        index = run_index(event["ts"])
        if index is None:
            continue
        node = name[: -len(_KERNEL_SUFFIX)]
        args = event.get("args", {})
        per_run_us.setdefault(node, np.zeros(n))[index] += event["dur"]
        calls[node] += 1
        info[node] = (args.get("op_name", "?"), args.get("provider", ""))

    node_us = {node: float(np.median(times)) for node, times in per_run_us.items()}
    op_us: dict[str, float] = defaultdict(float)
    op_calls: dict[str, int] = defaultdict(int)
    for node, us in node_us.items():
        op_us[info[node][0]] += us
        op_calls[info[node][0]] += calls[node]
    total_us = sum(node_us.values())

    def share(us: float) -> float:
        return us / total_us if total_us else 0.0

    by_op = [
        {"op_type": op, "calls_per_run": op_calls[op] / n, "ms_per_run": us / 1e3, "share": share(us)}
        for op, us in sorted(op_us.items(), key=lambda item: (-item[1], item[0]))
    ]
    nodes = [
        {
            "node": node,
            "op_type": info[node][0],
            "provider": info[node][1],
            "ms_per_run": us / 1e3,
            "share": share(us),
        }
        for node, us in sorted(node_us.items(), key=lambda item: (-item[1], item[0]))[:top]
    ]
    return {
        "runs": n,
        "model_run_ms": float(np.median([e["dur"] for e in kept])) / 1e3,
        "kernel_ms": total_us / 1e3,
        "by_op_type": by_op,
        "top_nodes": nodes,
    }


def ort_op_breakdown(
    model: Path | str | bytes,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    top: int = 20,
    providers: list[str] | None = None,
) -> dict:
    """Profiles ``runs`` runs of ``model`` in ONNX Runtime after ``warmup`` runs (see parse_ort_profile).

    The session is created with profiling on, so its trace (a JSON file ONNX Runtime writes into the
    working folder) is read and deleted here. The node names are those of ORT's optimised graph: fused
    nodes appear under their fused op types (e.g. ``FusedMatMul``, ``SkipLayerNormalization``).
    """
    from prune2deploy.ort_session import make_session

    if runs < 1 or warmup < 0:
        raise ConfigError(f"need runs >= 1 and warmup >= 0 for an op breakdown, got {runs} and {warmup}")
    source = model if isinstance(model, (bytes, bytearray)) else Path(model)
    session = make_session(source, threads=threads, providers=providers, profile=True)
    outputs = [o.name for o in session.get_outputs()]
    trace_path = None
    try:
        for _ in range(warmup + runs):
            session.run(outputs, dict(feeds))
    finally:
        trace_path = Path(session.end_profiling())
    try:
        events = json.loads(trace_path.read_text())
    finally:
        trace_path.unlink(missing_ok=True)
    result = parse_ort_profile(events, skip_runs=warmup, top=top)
    log.debug("ORT op breakdown: %d runs, %.3f ms kernel time per run", result["runs"], result["kernel_ms"])
    return result
