"""`benchmarks/gpu/run.sh --dry-run`: the device script's code paths at tiny sizes on a CPU, and its numbers.

The device run spends scarce GPU minutes; this dry run is what keeps it from failing on a typo. It
runs the real script end to end (export, compile with masks, 2:4, torch engine, timing, roofline) and checks
that every planned row is there, with positive medians and ratios computed from the row's own numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
GRID = [(1, 8), (2, 16)]
BIG_GRID = [(2, 16)]
MODEL_VARIANTS = ["dense", "compiled", "compiled_24_dense_kernels", "compiled_24"]
MLP_VARIANTS = [f"{op}.{kind}" for op in ("gate_up", "down", "mlp") for kind in ("dense", "2:4")]


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", module)  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out / "results"), "--work", str(out / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results" / "results.json").read_text())
    return results, (out / "results" / "results.md").read_text(), proc.stdout


def test_every_planned_row_is_measured(dry_run):
    results, _, stdout = dry_run
    assert results["schema"] == "prune2deploy.gpu_bench/1" and results["mode"] == "dry-run"
    expected = {("model", v, b, s) for b, s in GRID for v in MODEL_VARIANTS}
    expected |= {("mlp_gemm", v, b, s) for b, s in GRID for v in MLP_VARIANTS}
    expected |= {("mlp_1b", v, b, s) for b, s in BIG_GRID for v in MLP_VARIANTS}
    rows = [(r["section"], r["variant"], r["batch"], r["seq"]) for r in results["rows"]]
    assert len(rows) == len(set(rows))
    assert set(rows) == expected
    assert {tuple(k) for k in results["plan"]["rows"]} == expected
    assert results["errors"] == [] and results["skipped"] == []
    assert f"{len(expected)} of {len(expected)} planned rows measured" in stdout


def test_rows_hold_medians_spread_and_ratios(dry_run):
    results, _, _ = dry_run
    for row in results["rows"]:
        where = f"{row['section']} {row['variant']} b{row['batch']} s{row['seq']}"
        assert row["runs"] >= 20, where
        assert 0 < row["min_ms"] <= row["p10_ms"] <= row["median_ms"] <= row["p90_ms"], where
        assert row["tokens"] == row["batch"] * row["seq"]
        assert row["timer"] == "perf_counter"  # no CUDA here
        assert 0 < row["predicted_ms"] < row["predicted_launch_ms"], where
        assert row["predicted_launch_ms"] == pytest.approx(row["predicted_ms"] + row["kernels"] * 4e-3)
        assert row["measured_over_predicted"] == pytest.approx(row["median_ms"] / row["predicted_ms"])
        assert row["measured_over_predicted_launch"] == pytest.approx(row["median_ms"] / row["predicted_launch_ms"])
        assert row["gflops"] > 0 and row["gbytes"] > 0
        assert not row["predicted_sparse_used"], where  # 2:4 kernels never ran on a CPU: priced dense
        assert isinstance(row["unknown_shape_nodes"], int) and row["unknown_shape_nodes"] >= 0
        if row["section"] == "model" and (row["batch"], row["seq"]) == GRID[0]:  # ORT sizes what inference cannot
            assert row["predicted_ms_ort_shapes"] >= row["predicted_ms"] * (1 - 1e-9), where
        else:
            assert "predicted_ms_ort_shapes" not in row, where
        if row["variant"].endswith(("2:4", "compiled_24")):
            assert row["kernel"].startswith("dense (fallback: device is cpu"), where
        else:
            assert row["kernel"] == "dense", where
    by = {(r["section"], r["variant"], r["batch"], r["seq"]): r for r in results["rows"]}
    for b, s in GRID:
        dense, compiled = by[("model", "dense", b, s)], by[("model", "compiled", b, s)]
        assert compiled["gflops"] < 0.8 * dense["gflops"]  # half the MLP and a third of the heads are gone
        assert compiled["predicted_ms"] < dense["predicted_ms"]
        pair = by[("model", "compiled_24", b, s)], by[("model", "compiled_24_dense_kernels", b, s)]
        assert pair[0]["predicted_ms"] == pytest.approx(pair[1]["predicted_ms"])
    # the GEMM FLOPs are what the shapes say: 2 * tokens * K * N
    width = results["compile"]["masks"]["mlp_width"]["compiled"]
    row = by[("mlp_gemm", "gate_up.dense", 2, 16)]
    assert row["gflops"] == pytest.approx(2 * 32 * results["model"]["config"]["hidden_size"] * width / 1e9)


def test_speedups_come_from_the_rows(dry_run):
    results, _, _ = dry_run
    by = {(r["section"], r["variant"], r["batch"], r["seq"]): r for r in results["rows"]}
    assert len(results["speedups"]) == 3 * len(GRID) + 3 * len(GRID) + 3 * len(BIG_GRID)
    for item in results["speedups"]:
        base = by[(item["section"], item["baseline"], item["batch"], item["seq"])]
        new = by[(item["section"], item["variant"], item["batch"], item["seq"])]
        assert item["measured"] == pytest.approx(base["median_ms"] / new["median_ms"])
        assert item["predicted"] == pytest.approx(base["predicted_ms"] / new["predicted_ms"])


def test_compile_and_checks(dry_run):
    results, markdown, _ = dry_run
    compiled = results["compile"]
    config = results["model"]["config"]
    layers = config["num_hidden_layers"]
    assert compiled["verification"]["passed"] and compiled["verification"]["exact"]
    assert compiled["masks"]["mlp_width"] == {"dense": 128, "compiled": 64}
    assert compiled["heads"]["heads_removed"] == 3 * layers  # one query head per kv group, every layer
    assert compiled["params"]["compiled"] < compiled["params"]["dense"]
    assert compiled["sparsify_24"]["made_nm"] == 3 * layers  # gate, up, down of every MLP; attention dense
    assert "random" in compiled["source"]["weights"]
    assert results["engines"]["compiled_24"]["dense_24"] == 3 * layers
    assert results["engines"]["compiled_24"]["semi_structured"] == 0
    checks = {(c["section"], c["variant"]): c for c in results["checks"]}
    for variant in MODEL_VARIANTS:  # the fp16 torch engine against ONNX Runtime fp32 on the same graph
        check = checks[("model", variant)]
        assert check["finite"] and check["max_rel_to_scale"] < 1e-2 and check["cosine"] > 0.9999, check
    for section in ("mlp_gemm", "mlp_1b"):
        for op in ("gate_up", "mlp"):
            check = checks[(section, f"{op}.2:4")]
            assert check["max_rel_to_scale"] <= 1e-3 and check["cosine"] > 0.9999, check
    assert "DRY RUN" in markdown
    table = [line for line in markdown.splitlines() if line.startswith(("| model |", "| mlp_gemm |", "| mlp_1b |"))]
    assert len(table) == len(results["rows"]) + len(results["speedups"])


def test_h200_prediction_prices_24_at_the_sparse_peak():
    """The device-only branch of the prediction (2:4 kernels ran) at the 1B MLP shape, checked on CPU."""
    import torch

    bench = _bench_module()
    generator = torch.Generator().manual_seed(0)
    hidden, width = 2048, 8192
    weights = {
        "gate": torch.randn(width, hidden, generator=generator),
        "up": torch.randn(width, hidden, generator=generator),
        "down": torch.randn(hidden, width, generator=generator),
    }
    sparse = {name: bench.impose_24(w) for name, w in weights.items()}
    groups = sparse["down"].reshape(-1, 4)
    assert int((groups != 0).sum(dim=1).max()) == 2
    arrays = {name: w.half().numpy() for name, w in sparse.items()}
    graph = bench.mlp_onnx(hidden, width, arrays, "gate_up")
    cost = bench.graph_cost(graph, 16, 512)
    on_sparse = bench.predict_row(cost, [n.name for n in cost.nodes])
    on_dense = bench.predict_row(cost, ())
    assert on_sparse["predicted_sparse_used"] and not on_dense["predicted_sparse_used"]
    flops = 2 * 16 * 512 * hidden * width
    assert on_dense["gflops"] == pytest.approx(flops / 1e9)
    # 8192 tokens x 2048 x 8192 is compute-bound on an H200: dense at 989.4 TFLOP/s, 2:4 at 1978.9 (catalog)
    assert on_dense["predicted_bound"] == "compute"
    assert on_dense["predicted_ms"] == pytest.approx(flops / 989.4e12 * 1e3, rel=1e-6)
    assert on_sparse["predicted_ms"] == pytest.approx(flops / 1978.9e12 * 1e3, rel=1e-6)
    assert math.isfinite(on_sparse["predicted_launch_ms"])
    assert np.isclose(on_sparse["predicted_launch_ms"] - on_sparse["predicted_ms"], 4e-3)
