"""Latency measurement for any :class:`~prune2deploy.engines.base.Runner`, alone or side by side.

A single timing is noise; a speedup from two timings taken minutes apart is noise squared (turbo clocks,
other tenants, thermal state). So every model is warmed up, then timed until the median is known to a
chosen relative precision, and models compared against each other are timed in ONE loop, interleaved
round-robin, so that whatever the machine does hits all of them alike. The clock is injectable: tests
drive it by hand and check the statistics exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prune2deploy.engines.base import BuildOptions, Engine, Runner
from prune2deploy.errors import BadInputError, ConfigError
from prune2deploy.profiling.memory import PeakMemory

__all__ = [
    "Clock",
    "LatencyStats",
    "compare_models",
    "measure_latency",
    "measure_side_by_side",
    "median_ci",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.perf_counter`` unless a test injects its own)."""

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of one model's timed runs at one input shape.

    Percentiles interpolate linearly between order statistics (numpy's default), ``std_ms`` is the sample
    standard deviation (0 for one run), ``throughput`` is samples per second at the median
    (``batch / median``). ``rel_ci`` is the half width of the distribution-free 95 % confidence interval of
    the median divided by the median: the precision the stopping rule aimed for. ``stop_reason`` is
    ``"stable"``, ``"max_runs"`` or ``"budget"``, so a report can say when a number is less certain.
    Memory is the process RSS high-water while this model ran its warm-up (see :class:`PeakMemory`).
    """

    times_ms: tuple[float, ...]
    batch: int
    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput: float
    rel_ci: float
    stop_reason: str = ""
    peak_rss_mb: float | None = None
    rss_increase_mb: float | None = None
    peak_cuda_mb: float | None = None

    @classmethod
    def from_times(
        cls,
        times_s: Sequence[float],
        *,
        batch: int = 1,
        stop_reason: str = "",
        memory: PeakMemory | None = None,
    ) -> LatencyStats:
        """Summarises run times given in seconds."""
        if not times_s:
            raise ValueError("no timed runs to summarise")
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        median = float(np.median(ms))
        lo, hi = median_ci(ms)
        return cls(
            times_ms=tuple(float(t) for t in ms),
            batch=batch,
            runs=int(ms.size),
            median_ms=median,
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
            mean_ms=float(ms.mean()),
            std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            throughput=batch / (median / 1e3) if median > 0 else math.inf,
            rel_ci=(hi - lo) / (2 * median) if median > 0 else math.inf,
            stop_reason=stop_reason,
            peak_rss_mb=memory.peak_rss_mb if memory else None,
            rss_increase_mb=memory.increase_mb if memory else None,
            peak_cuda_mb=memory.peak_cuda_mb if memory else None,
        )

    def as_row(self) -> dict:
        """The statistics without the raw times: one row of a table or of report.json's ``latency``."""
        row = asdict(self)
        del row["times_ms"]
        return row


def median_ci(values: Sequence[float] | np.ndarray, z: float = _Z95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    Latencies are skewed (a long right tail), so a normal interval around the mean would mislead; the
    binomial interval of the median needs no assumption. With few samples the ranks clamp to the minimum
    and maximum, which is wide and therefore conservative.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = ordered.size
    if n == 0:
        raise ValueError("no values")
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    return float(ordered[lo]), float(ordered[hi])


def _infer_batch(runner: Runner, feeds: Mapping[str, np.ndarray]) -> int:
    """The leading dim of the first graph input that has one (what ``random_feeds`` puts the batch in)."""
    names = [n for n in runner.input_names if n in feeds] or list(feeds)
    for name in names:
        shape = np.shape(feeds[name])
        if shape:
            return int(shape[0])
    return 1


def _check_bounds(warmup: int, min_runs: int, max_runs: int, budget_s: float, rel_ci: float) -> None:
    if warmup < 0 or min_runs < 1 or max_runs < min_runs or budget_s <= 0 or rel_ci < 0:
        raise ConfigError(
            f"bad measurement bounds: warmup={warmup}, min_runs={min_runs}, max_runs={max_runs}, "
            f"budget_s={budget_s}, rel_ci={rel_ci}. Need warmup >= 0, 1 <= min_runs <= max_runs, "
            "budget_s > 0 and rel_ci >= 0."
        )


def _stable(times: list[float], rel_ci: float) -> bool:
    median = float(np.median(times))
    if median <= 0:
        return True
    lo, hi = median_ci(times)
    return (hi - lo) / (2 * median) <= rel_ci


def measure_side_by_side(
    models: Mapping[str, tuple[Runner, Mapping[str, np.ndarray]]],
    *,
    warmup: int = 3,
    min_runs: int = 10,
    max_runs: int = 1000,
    budget_s: float = 10.0,
    rel_ci: float = 0.02,
    clock: Clock = time.perf_counter,
    batch: int | None = None,
    memory: bool = True,
) -> dict[str, LatencyStats]:
    """Times several models in one interleaved loop so machine noise hits them alike.

    Each model first runs ``warmup`` untimed times (one model after the other, with its RSS sampled).
    Then every repetition runs each model once, rotating the start (repetition ``r`` starts with model
    ``r % len(models)``) so that none always follows the same neighbour's cache footprint. Each run is
    timed as ``synchronize(); t0 = clock(); run(); synchronize(); t1 = clock()``.

    The loop stops when, after ``min_runs`` repetitions, every model's median is known to ``rel_ci``
    (see :func:`median_ci`); or at ``max_runs``; or when the timed phase has used ``budget_s`` of the clock,
    whichever comes first; ``min_runs`` always complete, since a median of fewer runs than asked for is not
    what the caller wanted (the budget bounds the extra runs spent on stability).

    Args:
        models: name -> (runner, feeds), in the order they should be interleaved.
        warmup: untimed runs per model before timing (first runs allocate arenas and pick kernels).
        min_runs: repetitions before the stopping rule is consulted.
        max_runs: repetitions at most.
        budget_s: time budget for the timed phase, in seconds of ``clock``.
        rel_ci: target relative half width of the 95 % confidence interval of each median.
        clock: seconds, monotonic; injectable for tests.
        batch: samples per run for throughput; inferred from the feeds' leading dim when None.
        memory: sample process RSS during warm-up (needs ``warmup >= 1``).

    Returns:
        name -> statistics, in the order of ``models``.
    """
    _check_bounds(warmup, min_runs, max_runs, budget_s, rel_ci)
    if not models:
        raise ConfigError("no models to measure")
    names = list(models)
    memories: dict[str, PeakMemory | None] = {}
    for name in names:
        runner, feeds = models[name]
        sampler = PeakMemory() if memory and warmup > 0 else None
        with sampler if sampler is not None else contextlib.nullcontext():
            for _ in range(warmup):
                runner.run(feeds)
            runner.synchronize()
        memories[name] = sampler

    times: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    reason = "max_runs"
    for rep in range(max_runs):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            runner, feeds = models[name]
            runner.synchronize()
            t0 = clock()
            runner.run(feeds)
            runner.synchronize()
            t1 = clock()
            times[name].append(t1 - t0)
        done = rep + 1
        if done >= min_runs and all(_stable(times[name], rel_ci) for name in names):
            reason = "stable"
            break
        if t1 - start >= budget_s and min_runs <= done < max_runs:
            reason = "budget"
            log.info("budget of %.1f s used after %d runs; medians may be less precise", budget_s, done)
            break

    return {
        name: LatencyStats.from_times(
            times[name],
            batch=batch if batch is not None else _infer_batch(*models[name]),
            stop_reason=reason,
            memory=memories[name],
        )
        for name in names
    }


def measure_latency(
    runner: Runner,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 3,
    min_runs: int = 10,
    max_runs: int = 1000,
    budget_s: float = 10.0,
    rel_ci: float = 0.02,
    clock: Clock = time.perf_counter,
    batch: int | None = None,
    memory: bool = True,
) -> LatencyStats:
    """Times one runner on one set of feeds; the arguments are those of :func:`measure_side_by_side`."""
    stats = measure_side_by_side(
        {"model": (runner, feeds)},
        warmup=warmup,
        min_runs=min_runs,
        max_runs=max_runs,
        budget_s=budget_s,
        rel_ci=rel_ci,
        clock=clock,
        batch=batch,
        memory=memory,
    )
    return stats["model"]


def _load_ir(model: Path | bytes):
    """The model's IR, only to describe its inputs (external weights stay memory-mapped)."""
    import onnx
    import onnx_ir as ir

    try:
        if isinstance(model, (bytes, bytearray)):
            return ir.from_proto(onnx.load_model_from_string(bytes(model)))
        return ir.load(str(model))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError
        where = "<in-memory model>" if isinstance(model, (bytes, bytearray)) else str(model)
        raise BadInputError(f"cannot read ONNX model {where}: {exc}") from exc


def compare_models(
    models: Mapping[str, Path | str | bytes],
    grid: Sequence[tuple[int, int]],
    *,
    engine: Engine | None = None,
    options: BuildOptions | None = None,
    threads: int | None = None,
    reference: str | None = None,
    warmup: int = 3,
    min_runs: int = 10,
    max_runs: int = 1000,
    budget_s: float = 10.0,
    rel_ci: float = 0.02,
    clock: Clock = time.perf_counter,
    seed: int = 0,
    overrides: Mapping[str, int] | None = None,
) -> list[dict]:
    """Measures ONNX models side by side on one engine over a grid of (batch, seq).

    Every model is built once; at each grid point all models get feeds from
    :func:`~prune2deploy.feeds.random_feeds` with the same seed and are timed by
    :func:`measure_side_by_side`.

    Args:
        models: name -> ONNX file or serialized bytes, e.g. ``{"reference": ..., "compiled": ...}``.
        grid: (batch, seq) points.
        engine: engine to build with; ONNX Runtime on CPU when None.
        options: build options; when None, ``BuildOptions(threads=threads)``. TensorRT needs
            ``shape_ranges`` covering the grid.
        threads: intra-op threads, the same for every model so that they are timed alike.
        reference: the model the others are compared with; ``"reference"`` if present, else the first.
        warmup, min_runs, max_runs, budget_s, rel_ci, clock: see :func:`measure_side_by_side`
            (the budget is per grid point).
        seed: feed seed.
        overrides: named dynamic dims for :func:`~prune2deploy.feeds.random_feeds`.

    Returns:
        Rows ``{"kind": "latency", "engine", "model", "batch", "seq", "median_ms", "p90_ms", "p99_ms",
        "mean_ms", "std_ms", "min_ms", "runs", "throughput", "peak_rss_mb", "rel_ci", "stop_reason"}``
        per model and grid point, then per grid point and non-reference model a row
        ``{"kind": "speedup", "engine", "model", "reference", "batch", "seq", "measured"}`` where
        ``measured`` is the reference's median over the model's.
    """
    from prune2deploy.feeds import random_feeds

    if not models:
        raise ConfigError("no models to compare")
    if not grid:
        raise ConfigError("empty (batch, seq) grid: give at least one batch size and sequence length")
    if engine is None:
        from prune2deploy.engines.onnxruntime import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine()
    options = options or BuildOptions(threads=threads)
    names = list(models)
    if reference is None:
        reference = "reference" if "reference" in models else names[0]
    if reference not in models:
        raise ConfigError(f"reference model {reference!r} is not one of {names}")

    timing = {
        "warmup": warmup,
        "min_runs": min_runs,
        "max_runs": max_runs,
        "budget_s": budget_s,
        "rel_ci": rel_ci,
        "clock": clock,
    }
    rows: list[dict] = []
    speedups: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="p2d-measure-") as tmp, contextlib.ExitStack() as stack:
        runners, specs = _build_runners(models, engine, options, Path(tmp), stack)
        for batch, seq in grid:
            side = {}
            for name, spec in specs.items():
                feeds = random_feeds(spec, batch=batch, seq=seq, seed=seed, overrides=overrides)
                side[name] = (runners[name], feeds)
            log.info("timing %s at batch=%d seq=%d", ", ".join(names), batch, seq)
            stats = measure_side_by_side(side, batch=batch, **timing)
            rows += [_latency_row(engine.name, name, batch, seq, stats[name]) for name in names]
            speedups += [
                {
                    "kind": "speedup",
                    "engine": engine.name,
                    "model": name,
                    "reference": reference,
                    "batch": batch,
                    "seq": seq,
                    "measured": stats[reference].median_ms / stats[name].median_ms,
                }
                for name in names
                if name != reference
            ]
    return rows + speedups


def _build_runners(
    models: Mapping[str, Path | str | bytes],
    engine: Engine,
    options: BuildOptions,
    tmp: Path,
    stack: contextlib.ExitStack,
) -> tuple[dict[str, Runner], dict[str, list]]:
    """Builds every model once and opens its runner (closed by ``stack``); returns the runners and each
    model's input specs. Serialized models are written into ``tmp`` first, as engines build from files."""
    from prune2deploy.feeds import feed_specs

    runners: dict[str, Runner] = {}
    specs = {}
    for name, source in models.items():
        if isinstance(source, (bytes, bytearray)):
            path = tmp / f"{name}.onnx"
            path.write_bytes(bytes(source))
        else:
            path = Path(source)
            if not path.exists():
                raise BadInputError(f"model {name!r}: {path} does not exist")
        specs[name] = feed_specs(_load_ir(source if isinstance(source, (bytes, bytearray)) else path))
        log.info("building %s on %s", name, engine.name)
        built = engine.build(path, options)
        runners[name] = stack.enter_context(engine.runner(built))
    return runners, specs


def _latency_row(engine: str, name: str, batch: int, seq: int, s: LatencyStats) -> dict:
    """One model's statistics at one grid point, as a ``"latency"`` row of :func:`compare_models`."""
    return {
        "kind": "latency",
        "engine": engine,
        "model": name,
        "batch": batch,
        "seq": seq,
        "median_ms": s.median_ms,
        "p90_ms": s.p90_ms,
        "p99_ms": s.p99_ms,
        "mean_ms": s.mean_ms,
        "std_ms": s.std_ms,
        "min_ms": s.min_ms,
        "runs": s.runs,
        "throughput": s.throughput,
        "peak_rss_mb": s.peak_rss_mb,
        "rel_ci": s.rel_ci,
        "stop_reason": s.stop_reason,
    }
