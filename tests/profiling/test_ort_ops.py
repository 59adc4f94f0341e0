"""ONNX Runtime per-op breakdown: exact aggregation of a synthetic trace, and a real profiled session."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from prune2deploy.errors import ConfigError
from prune2deploy.profiling.ort_ops import ort_op_breakdown, parse_ort_profile
from prune2deploy.profiling.report import validate_report
from tests.profiling.report_samples import minimal_report


def _node(name: str, op: str, ts: int, dur: int, suffix: str = "_kernel_time") -> dict:
    return {
        "cat": "Node",
        "name": name + suffix,
        "ts": ts,
        "dur": dur,
        "args": {"op_name": op, "provider": "CPUExecutionProvider"},
    }


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _trace() -> list[dict]:
    return [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5},
        _run(10, 100),  # warm-up: skipped
        _node("mm", "MatMul", 20, 500),
        _node("init", "Constant", 150, 1000),  # between runs: not part of any run
        _run(200, 100),
        _node("add", "Add", 205, 20),
        _node("mm", "MatMul", 210, 40),
        _node("mm", "MatMul", 209, 0, suffix="_fence_before"),
        _node("relu", "Relu", 250, 10),
        _run(400, 120),
        _node("mm", "MatMul", 410, 60),
        _node("add", "Add", 430, 20),
        _node("relu", "Relu", 470, 20),
    ]


def test_parse_ort_profile_aggregates_kept_runs_exactly():
    result = parse_ort_profile(_trace(), skip_runs=1, top=2)
    assert result["runs"] == 2
    assert result["model_run_ms"] == pytest.approx(0.110)  # median of 100 and 120 us
    assert result["kernel_ms"] == pytest.approx(0.085)  # (100 + 40 + 30) us over 2 runs
    assert [(r["op_type"], r["calls_per_run"]) for r in result["by_op_type"]] == [
        ("MatMul", 1.0),
        ("Add", 1.0),
        ("Relu", 1.0),
    ]
    assert [r["ms_per_run"] for r in result["by_op_type"]] == pytest.approx([0.050, 0.020, 0.015])
    assert [r["share"] for r in result["by_op_type"]] == pytest.approx([100 / 170, 40 / 170, 30 / 170])
    assert [(n["node"], n["op_type"]) for n in result["top_nodes"]] == [("mm", "MatMul"), ("add", "Add")]
    assert result["top_nodes"][0]["provider"] == "CPUExecutionProvider"


def test_one_slow_kernel_call_does_not_dominate():
    trace = [_run(0, 100), _run(200, 100), _run(400, 5000)]
    trace += [_node("mm", "MatMul", 10, 40), _node("mm", "MatMul", 210, 60), _node("mm", "MatMul", 410, 4000)]
    trace += [
        _node("sm", "Softmax", 20, 10),
        _node("sm", "Softmax", 220, 10),
        _node("sm", "Softmax", 420, 10),
    ]
    trace += [_node("sm", "Softmax", 430, 10)]  # a second call in the last run: 20 us there
    result = parse_ort_profile(trace)
    ops = {r["op_type"]: r for r in result["by_op_type"]}
    assert ops["MatMul"]["ms_per_run"] == pytest.approx(0.060)  # median of 40, 60, 4000 us
    assert ops["Softmax"]["ms_per_run"] == pytest.approx(0.010)  # median of 10, 10, 20 us
    assert ops["Softmax"]["calls_per_run"] == pytest.approx(4 / 3)
    assert result["kernel_ms"] == pytest.approx(0.070)
    assert result["model_run_ms"] == pytest.approx(0.100)


def test_parse_ort_profile_without_runs_left_is_an_error():
    with pytest.raises(ConfigError, match="none left after skipping 3"):
        parse_ort_profile(_trace(), skip_runs=3)


def _tiny_model() -> bytes:
    """y = sigmoid(relu(x @ W)) with names the trace can be checked against."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TensorProto.FLOAT, [32, 64], rng.standard_normal(32 * 64).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Sigmoid", ["r"], ["y"], name="sig"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model.SerializeToString()


def test_ort_op_breakdown_on_a_real_session(tmp_path, monkeypatch, rng):
    monkeypatch.chdir(tmp_path)  # ONNX Runtime writes its trace into the working folder
    feeds = {"x": rng.standard_normal((16, 32)).astype(np.float32)}
    result = ort_op_breakdown(_tiny_model(), feeds, runs=4, warmup=2, threads=1)
    assert result["runs"] == 4
    by_op = {r["op_type"]: r for r in result["by_op_type"]}
    assert set(by_op) == {"MatMul", "Relu", "Sigmoid"}
    assert all(r["calls_per_run"] == 1.0 for r in by_op.values())
    assert sum(r["share"] for r in by_op.values()) == pytest.approx(1.0)
    assert result["kernel_ms"] == pytest.approx(sum(r["ms_per_run"] for r in by_op.values()))
    assert {n["node"] for n in result["top_nodes"]} == {"mm", "relu", "sig"}
    assert result["model_run_ms"] > 0
    assert list(tmp_path.iterdir()) == []  # the trace file was removed
    # The breakdown is what report.json's "ops" section holds.
    validate_report({**minimal_report(), "ops": {"compiled": result}})


def test_ort_op_breakdown_on_a_file(tmp_path, monkeypatch, rng):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.load_model_from_string(_tiny_model()), path)
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    result = ort_op_breakdown(path, feeds, runs=1, warmup=0, top=1)
    assert result["runs"] == 1 and len(result["top_nodes"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]
