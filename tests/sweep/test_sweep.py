"""A real sweep on a real (local, 2-CPU) Ray cluster: one dense export, each variant a Ray task, sweep.json
validated, failures recorded, resume, MLflow runs in a local file store.

The model is a tiny random Llama saved as an HF folder (no tokenizer: quality is measured on seeded random
ids, and calibration criteria cannot score it — which is how the failing variant fails).
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

ray = pytest.importorskip("ray")

from prune2deploy import api  # noqa: E402
from prune2deploy.sweep.report import validate_sweep  # noqa: E402
from prune2deploy.sweep.task import run_variant  # noqa: E402

#: One worker runs this module: its Ray cluster, folder, export cache and 2-variant sweep are module fixtures,
#: made once per worker that runs any of its tests.
pytestmark = pytest.mark.xdist_group("sweep")

FAST = {"batch": [1], "seq": [16], "budget_s": 0.3}
QUALITY = {"window": 16, "windows": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster whose session files (logs, sockets, spilled objects) live in the test's folder."""
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(temp_dir))
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.fixtures.models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("p2d-export-cache")


@pytest.fixture(scope="module")
def two_variants(cluster, tiny_folder, export_cache, tmp_path_factory):
    """The 2-variant sweep, run once for the module, with MLflow logging to a local file store."""
    out = tmp_path_factory.mktemp("sweep-out")
    store = tmp_path_factory.mktemp("mlruns")
    spec = {
        "model": str(tiny_folder),
        "name": "tiny-mlp",
        "grid": {"mlp": [0.25, 0.5]},
        "compile": FAST,
        "quality": QUALITY,
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store.as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        result = api.sweep(spec, out, cache_dir=export_cache)
    return spec, out, store, result


def _record(out):
    record = json.loads((out / "sweep.json").read_text())
    validate_sweep(record)
    return record


def test_two_variants_one_export_both_verified(two_variants):
    _, out, _, result = two_variants
    record = _record(out)
    assert record["exports"] == 1 and record["export"]["exported"] is True
    assert record["executor"]["name"] == "ray" and record["executor"]["version"] == ray.__version__
    assert sum(w["cpus"] for w in record["executor"]["workers"]) == 2
    assert len(result.ran) == 2 and not result.failed and not result.skipped
    removed = {}
    for v in record["variants"]:
        assert v["error"] is None
        assert v["verification"]["passed"] and v["verification"]["exact"] and v["verification"]["worst"] <= 1e-4
        assert (out / v["out"] / "report.json").is_file() and (out / v["out"] / "model.onnx").is_file()
        # tiny Llama: 2 layers, hidden 64; each removed MLP neuron takes a gate row, an up row, a down column
        removed[v["options"]["grid"]["mlp"]] = v["params"]["reference"] - v["params"]["compiled"]
        assert v["flops"]["compiled"] < v["flops"]["reference"]
        measured = [r for r in v["latency_ms"] if r["kind"] == "measured"]
        assert [(r["batch"], r["seq"]) for r in measured] == [(1, 16)] and measured[0]["compiled_ms"] > 0
        assert {r["target"] for r in v["latency_ms"] if r["kind"] == "predicted"} >= {"h100-sxm", "l4"}
        q = v["quality"]
        assert q["kind"] == "lm" and q["tokens"] == 32 and 0 < q["kl_mean"] < 1 and math.isfinite(q["ppl_candidate"])
    assert removed == {0.25: 2 * 3 * 64 * 24, 0.5: 2 * 3 * 64 * 48}
    page = (out / "sweep.html").read_text()
    for v in record["variants"]:
        assert f'href="{v["id"]}/report.html"' in page


def test_mlflow_file_store_has_one_run_per_variant(two_variants):
    import mlflow

    _, out, store, _ = two_variants
    record = _record(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(store.as_uri())
        runs = mlflow.search_runs(experiment_names=["tiny-mlp"], output_format="list")
    mlflow.set_tracking_uri(None)
    by_name = {run.info.run_name: run for run in runs}
    assert sorted(by_name) == sorted(v["id"] for v in record["variants"])
    for v in record["variants"]:
        run = by_name[v["id"]]
        assert run.info.run_id == v["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.params["grid.mlp"] == str(v["options"]["grid"]["mlp"])
        assert run.data.metrics["speedup"] == pytest.approx(v["speedup"])
        assert run.data.metrics["quality.kl_mean"] == pytest.approx(v["quality"]["kl_mean"])
        assert run.data.metrics["params.compiled"] == v["params"]["compiled"]


def test_rerun_resumes_finished_variants(two_variants, export_cache):
    spec, out, _, first = two_variants
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    again = api.sweep(spec, out, cache_dir=export_cache)
    assert sorted(again.skipped) == sorted(first.ran) and not again.ran and not again.failed
    record = _record(out)
    assert record["exports"] == 0  # nothing to run: no export, not even from the cache
    assert all(v["resumed"] for v in record["variants"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")} == stamps


def test_failing_variant_is_recorded_and_the_other_completes(
    cluster, tiny_folder, export_cache, two_variants, tmp_path
):
    """(``two_variants`` first: its sweep caches the module's export, which this one must reuse.)"""
    spec = {
        "model": str(tiny_folder),
        "grid": {"criterion": ["wanda", "magnitude"], "mlp": [0.5]},
        "prune": {"samples": 2, "seq_len": 16},
        "compile": FAST,
        "quality": QUALITY,
    }
    result = api.sweep(spec, tmp_path, cache_dir=export_cache)
    record = _record(tmp_path)
    assert record["exports"] == 0 and record["export"]["exported"] is False  # the module's export, cached
    wanda, magnitude = record["variants"]
    assert wanda["options"]["grid"]["criterion"] == "wanda"
    assert "needs the model's tokenizer" in wanda["error"] and not (tmp_path / wanda["out"]).exists()
    assert magnitude["error"] is None and magnitude["verification"]["passed"]
    assert result.failed == [wanda["id"]] and result.ran == [magnitude["id"]]
    # a re-run retries the failure and skips what finished
    again = api.sweep(spec, tmp_path, cache_dir=export_cache)
    assert again.skipped == [magnitude["id"]] and again.failed == [wanda["id"]]


def test_a_failing_task_returns_its_error(tmp_path):
    entry = run_variant(
        {"id": "v", "dense": str(tmp_path / "missing.onnx"), "out": str(tmp_path / "v"), "plan": None, "compile": {}}
    )
    assert entry["error"].startswith("FileNotFoundError") and "storage every worker mounts" in entry["error"]
    assert entry["node"] and entry["seconds"] >= 0


def test_cli_without_ray_says_how_to_install(monkeypatch, tmp_path, capsys):
    import sys

    from prune2deploy.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("model: minilm-l6\ngrid: {mlp: [0.5]}\n")
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_cli_sweep_resumes_and_prints_a_table(two_variants, export_cache, tmp_path, capsys):
    from prune2deploy.cli import main

    spec, out, _, first = two_variants
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec))
    assert main(["sweep", str(path), "--out", str(out), "--cache", str(export_cache), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert all(re.search(rf"{ident}\s+resumed", text) for ident in first.ran)
    assert "0 ran, 2 resumed, 0 failed; dense exports: 0" in text
