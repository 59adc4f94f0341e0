"""Latency statistics, stopping rules and interleaving, checked exactly on a fake clock."""

from __future__ import annotations

import contextlib
import math
import mmap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from prune2deploy.engines.base import Availability, BuildOptions, BuildResult, Engine, Runner
from prune2deploy.errors import ConfigError
from prune2deploy.profiling.measure import (
    LatencyStats,
    compare_models,
    measure_latency,
    measure_side_by_side,
    median_ci,
)
from prune2deploy.profiling.memory import PeakMemory


class FakeClock:
    """Seconds that only move when a fake runner runs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class FakeRunner(Runner):
    """Advances the clock by the next duration (cycling) and logs its name on every run."""

    def __init__(self, name: str, durations_s: list[float], clock: FakeClock, log: list[str]) -> None:
        self.name, self.durations, self.clock, self.log = name, durations_s, clock, log
        self.calls = 0
        self.syncs = 0
        self.shapes: list[tuple[int, ...]] = []

    @property
    def input_names(self) -> list[str]:
        return ["x"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.clock.now += self.durations[self.calls % len(self.durations)]
        self.calls += 1
        self.log.append(self.name)
        self.shapes.append(tuple(feeds["x"].shape))
        return {"y": feeds["x"]}

    def synchronize(self) -> None:
        self.syncs += 1


def _feeds(batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.zeros((batch, 3), dtype=np.float32)}


def test_statistics_are_exact_on_a_fake_clock():
    clock, log = FakeClock(), []
    # Two warm-up runs of 100 s must not be counted; then 1..10 ms in shuffled order.
    timed_ms = [7, 3, 10, 1, 5, 9, 2, 8, 4, 6]
    runner = FakeRunner("m", [100.0, 100.0] + [t / 1e3 for t in timed_ms], clock, log)
    stats = measure_latency(
        runner,
        _feeds(4),
        warmup=2,
        min_runs=10,
        max_runs=10,
        budget_s=1e9,
        rel_ci=0.0,
        clock=clock,
        memory=False,
    )
    assert stats.runs == 10
    assert stats.times_ms == pytest.approx(timed_ms)
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.p90_ms == pytest.approx(9.1)  # linear: rank 0.9 * 9 = 8.1 between 9 and 10
    assert stats.p99_ms == pytest.approx(9.91)
    assert stats.mean_ms == pytest.approx(5.5)
    assert stats.std_ms == pytest.approx(math.sqrt(82.5 / 9))  # sample std of 1..10
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 10.0))
    assert stats.batch == 4  # inferred from the feeds' leading dim
    assert stats.throughput == pytest.approx(4 / 0.0055)
    # The distribution-free 95 % interval of the median of 10 values spans ranks 2..10.
    assert stats.rel_ci == pytest.approx((10 - 2) / (2 * 5.5))
    assert stats.stop_reason == "max_runs"
    # One clock read to start, two per timed run; synchronize before each read of the clock.
    assert clock.reads == 1 + 2 * 10
    assert runner.syncs == 1 + 2 * 10
    assert runner.calls == 12


def test_stops_as_soon_as_the_median_is_stable():
    clock = FakeClock()
    runner = FakeRunner("m", [0.002], clock, [])
    stats = measure_latency(runner, _feeds(), warmup=0, min_runs=7, max_runs=100, clock=clock, rel_ci=0.01)
    assert (stats.runs, stats.stop_reason) == (7, "stable")
    assert stats.median_ms == pytest.approx(2.0)
    assert stats.rel_ci == 0.0
    assert stats.peak_rss_mb is None  # no warm-up, no memory sampling


def test_budget_ends_the_loop_after_min_runs():
    clock = FakeClock()
    runner = FakeRunner("m", [1.0, 2.0], clock, [])  # alternating: never stable at rel_ci=0
    stats = measure_latency(runner, _feeds(), warmup=0, min_runs=2, max_runs=100, budget_s=3.5, rel_ci=0.0, clock=clock)
    assert (stats.runs, stats.stop_reason) == (3, "budget")  # 1 + 2 + 1 = 4 s >= 3.5 s
    assert stats.times_ms == pytest.approx((1000.0, 2000.0, 1000.0))
    assert stats.median_ms == pytest.approx(1000.0)


def test_min_runs_complete_even_past_the_budget():
    clock = FakeClock()
    runner = FakeRunner("m", [1.0, 2.0], clock, [])
    stats = measure_latency(runner, _feeds(), warmup=0, min_runs=6, max_runs=100, budget_s=0.5, rel_ci=0.0, clock=clock)
    assert (stats.runs, stats.stop_reason) == (6, "budget")


def test_median_ci_uses_order_statistics():
    assert median_ci(np.arange(1, 11)) == (2.0, 10.0)
    assert median_ci(np.arange(1, 101)) == (41.0, 61.0)  # ranks floor(50 - 9.8) and ceil(50 + 9.8)
    assert median_ci([3.0]) == (3.0, 3.0)


def test_side_by_side_interleaves_round_robin_with_rotating_start():
    clock, log = FakeClock(), []
    runners = {name: FakeRunner(name, [0.001], clock, log) for name in "ABC"}
    measure_side_by_side(
        {name: (r, _feeds()) for name, r in runners.items()},
        warmup=1,
        min_runs=4,
        max_runs=4,
        rel_ci=0.0,
        clock=clock,
        memory=False,
    )
    warmup, timed = log[:3], log[3:]
    assert warmup == ["A", "B", "C"]
    assert "".join(timed) == "ABC" + "BCA" + "CAB" + "ABC"


def test_side_by_side_reports_each_model_and_waits_for_all_to_be_stable():
    clock, log = FakeClock(), []
    steady = FakeRunner("steady", [0.004], clock, log)
    noisy = FakeRunner("noisy", [0.001, 0.003], clock, log)  # never stable at rel_ci=0.1
    stats = measure_side_by_side(
        {"reference": (steady, _feeds(8)), "compiled": (noisy, _feeds(8))},
        warmup=0,
        min_runs=3,
        max_runs=6,
        rel_ci=0.1,
        clock=clock,
    )
    assert list(stats) == ["reference", "compiled"]
    assert stats["reference"].runs == stats["compiled"].runs == 6
    assert stats["compiled"].stop_reason == "max_runs"
    assert stats["reference"].median_ms == pytest.approx(4.0)
    assert stats["compiled"].median_ms == pytest.approx(2.0)
    assert stats["reference"].throughput == pytest.approx(8 / 0.004)


def test_bad_bounds_are_config_errors():
    clock = FakeClock()
    runner = FakeRunner("m", [0.001], clock, [])
    with pytest.raises(ConfigError, match="min_runs <= max_runs"):
        measure_latency(runner, _feeds(), min_runs=5, max_runs=2, clock=clock)


def test_as_row_drops_raw_times():
    stats = LatencyStats.from_times([0.001, 0.003], batch=2)
    row = stats.as_row()
    assert "times_ms" not in row
    assert row["median_ms"] == pytest.approx(2.0)
    assert row["throughput"] == pytest.approx(1000.0)


def test_peak_memory_sees_an_allocation():
    # An anonymous mapping of its own: always fresh pages. A heap allocation (np.ones) may reuse pages an
    # earlier test freed but the allocator kept resident, and then RSS does not move (seen on CI).
    size = 64 * 1024 * 1024
    with PeakMemory(interval_s=0.001) as memory:
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)  # every page touched
        time.sleep(0.2)  # held long enough for the sampling thread to see it on a busy machine
    block.close()
    assert memory.peak_rss_mb >= memory.start_rss_mb + 60
    assert memory.increase_mb == pytest.approx(memory.peak_rss_mb - memory.start_rss_mb)


# --- compare_models ------------------------------------------------------------------------------------


def _tiny_onnx(path: Path) -> Path:
    """y = relu(x @ W), x: [batch, seq, 8]."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 4], np.linspace(-1, 1, 32, dtype=np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


class FakeEngine(Engine):
    """Builds nothing; its runners advance a shared fake clock by a per-model time."""

    name = "fake"

    def __init__(self, clock: FakeClock, ms: dict[str, float]) -> None:
        self.clock, self.ms, self.log, self.runners = clock, ms, [], {}

    @classmethod
    def available(cls) -> Availability:
        return Availability(True, True)

    def build(self, model_path: Path, options: BuildOptions) -> BuildResult:
        return BuildResult(self.name, model_path, {"threads": options.threads})

    @contextlib.contextmanager
    def runner(self, built: BuildResult) -> Iterator[Runner]:
        name = built.artifact.stem
        self.runners[name] = FakeRunner(name, [self.ms[name] / 1e3], self.clock, self.log)
        yield self.runners[name]


def test_compare_models_rows_and_speedup_on_a_fake_engine(tmp_path):
    clock = FakeClock()
    ref = _tiny_onnx(tmp_path / "reference.onnx")
    engine = FakeEngine(clock, {"reference": 4.0, "compiled": 2.5})
    rows = compare_models(
        {"reference": ref, "compiled": ref.read_bytes()},  # bytes are written to a temp file as compiled.onnx
        [(1, 16), (8, 32)],
        engine=engine,
        warmup=1,
        min_runs=5,
        max_runs=50,
        clock=clock,
    )
    latency = [r for r in rows if r["kind"] == "latency"]
    speedup = [r for r in rows if r["kind"] == "speedup"]
    assert [(r["model"], r["batch"], r["seq"]) for r in latency] == [
        ("reference", 1, 16),
        ("compiled", 1, 16),
        ("reference", 8, 32),
        ("compiled", 8, 32),
    ]
    assert [r["median_ms"] for r in latency] == pytest.approx([4.0, 2.5, 4.0, 2.5])
    assert [r["runs"] for r in latency] == [5, 5, 5, 5]
    assert [r["throughput"] for r in latency] == pytest.approx([250.0, 400.0, 2000.0, 3200.0])
    assert all(r["engine"] == "fake" for r in rows)
    assert [(r["batch"], r["seq"]) for r in speedup] == [(1, 16), (8, 32)]
    assert [r["measured"] for r in speedup] == pytest.approx([1.6, 1.6])
    # Feeds follow the grid: (batch, seq, 8) for the dynamic input.
    assert set(engine.runners["compiled"].shapes) == {(1, 16, 8), (8, 32, 8)}


def test_compare_models_on_onnxruntime(tmp_path):
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    rows = compare_models(
        {"reference": model, "compiled": model}, [(2, 4)], threads=1, warmup=1, min_runs=5, max_runs=5
    )
    ref, new, speed = rows
    assert (ref["model"], new["model"], speed["kind"]) == ("reference", "compiled", "speedup")
    for row in (ref, new):
        assert row["engine"] == "onnxruntime" and row["runs"] == 5
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput"] == pytest.approx(2 / (row["median_ms"] / 1e3))
        assert row["peak_rss_mb"] > 0
    assert speed["measured"] == pytest.approx(ref["median_ms"] / new["median_ms"])


def test_compare_models_rejects_an_unknown_reference(tmp_path):
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(ConfigError, match="reference model 'dense'"):
        compare_models({"a": model, "b": model}, [(1, 1)], reference="dense")
