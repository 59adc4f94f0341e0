"""``--baseline DENSE``: an already-pruned input (physically smaller, 2:4) compared with the dense model it came from.

One tiny Llama, saved dense and physically smaller (its MLP cut to the first 32 of 80 neurons: the same model,
pruned), each exported once into a shared export cache; a 2:4 version is made from the dense export's weights.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from prune2deploy import api
from prune2deploy.cli import main
from prune2deploy.driver.baseline import profile_fits
from prune2deploy.errors import BadInputError
from prune2deploy.profiling.report import validate_report
from prune2deploy.spec import CompileOptions
from tests.fixtures import producers as P
from tests.fixtures.models import tiny_llama

FAST = {"genai": False, "profile": False, "quality_windows": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dense folder, physically smaller folder); their exports go to the session's export cache (conftest)."""
    root = tmp_path_factory.mktemp("baseline")
    dense = tiny_llama(0)
    smaller = tiny_llama(0, intermediate_size=32)
    with torch.no_grad():  # the dense model's first 32 neurons of every MLP, everything else as it is
        params = dense.state_dict()
        for name, value in smaller.state_dict().items():
            value.copy_(params[name][tuple(slice(0, n) for n in value.shape)])
    return P.save_llama(dense, root / "dense"), P.save_llama(smaller, root / "smaller")


def _report(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    return report


def test_smaller_input_against_its_dense_baseline(folders, tmp_path, capsys):
    dense, smaller = folders
    out = tmp_path / "out"
    argv = ["compile", str(smaller), "--out", str(out), "--baseline", str(dense), "--no-genai", "--quality-windows"]
    argv += ["1", "--budget", "0.05", "--gpu", "a100", "l4", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = _report(out)

    baseline = report["baseline"]
    assert baseline["source"] == str(dense) and baseline["kind"] == "hf" and baseline["kept"] is False
    assert baseline["model"]["params"] > report["model"]["compiled"]["params"]  # the dense model is bigger
    assert not (out / "baseline.onnx").exists() and "baseline.onnx" not in json.dumps(report)

    # quality vs the dense baseline: the same measures as "vs dense", and > 0 (a third of each MLP is gone)
    masked, vs_dense = report["quality"]["comparisons"]
    assert masked["reference"] == "masked reference" and masked["top1_agreement"] == 1.0
    assert vs_dense["reference"] == "dense baseline (--baseline)"
    assert 1e-6 < vs_dense["kl_mean"] < 1.0 and 0.5 < vs_dense["top1_agreement"] < 1.0
    assert vs_dense["ppl_candidate"] == pytest.approx(masked["ppl_candidate"], rel=1e-6)  # the same compiled model
    assert "dense_skipped" not in report["quality"]  # the baseline is the dense model

    # timed in the same run: the baseline's latency rows, and compiled vs baseline beside compiled vs reference
    models = sorted(row["model"] for row in report["latency"])
    assert models == ["baseline", "compiled", "reference"] and baseline["profiled"] is True
    (over,) = baseline["speedup"]
    by_model = {row["model"]: row["median_ms"] for row in report["latency"]}
    assert over["measured"] == pytest.approx(by_model["baseline"] / by_model["compiled"])
    assert over["ideal_speedup"] == pytest.approx(baseline["model"]["flops"] / report["model"]["compiled"]["flops"])
    assert over["ideal_speedup"] > 1.1

    # predictions against the baseline (the report's own are 1.00×: the reference is the smaller model itself);
    # a model this small is launch-bound on a GPU, so the predicted gain is small but there
    rows = baseline["predictions"]
    assert sorted(r["gpu"] for r in rows) == sorted(r["gpu"] for r in report["predictions"])
    assert all(
        r["speedup"] > 1.002 and r["ideal_speedup"] == pytest.approx(over["ideal_speedup"], rel=1e-3) for r in rows
    )
    assert all(r["reference_gflops"] * 1e9 == pytest.approx(baseline["model"]["flops"], rel=1e-3) for r in rows)
    assert all(r["speedup"] == pytest.approx(1.0, abs=1e-6) for r in report["predictions"])

    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("vs dense baseline") and "FLOPs" in line for line in lines)
    assert any(line.startswith("measured speedup vs dense baseline") for line in lines)
    assert any(line.startswith("predicted speedup vs dense baseline") for line in lines)
    assert "vs baseline" in text and "vs dense baseline (--baseline): KL" in text
    assert "nothing left to remove here" in text and "did you mean --masks" not in text
    html = (out / "report.html").read_text()
    assert "Vs dense baseline" in html and "Predicted speedup vs dense baseline" in html


def test_a_baseline_equal_to_the_input_agrees_and_a_2_4_input_gets_the_tensorrt_estimate(folders, tmp_path):
    dense, _ = folders
    options = CompileOptions(baseline=str(dense), gpus=["a100"], **FAST)
    report = api.compile(dense, tmp_path / "same", options).report
    same = next(c for c in report["quality"]["comparisons"] if c["reference"].startswith("dense baseline"))
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] < 1e-8
    assert report["baseline"]["predictions"][0]["speedup"] == pytest.approx(1.0, abs=1e-6)
    assert "profiled" not in report["baseline"]  # --no-profile: nothing to say
    # three models that would not fit together: the baseline is not timed, and the reason says why
    why = profile_fits([tmp_path / "same" / "reference.onnx"] * 3, [(1, 128)], 1e-6)
    assert why.startswith("the reference, the compiled model and the baseline together need about")
    assert "--memory-limit-gib" in why and profile_fits([tmp_path / "same" / "reference.onnx"], [(1, 8)], 64) == ""

    # A 2:4 input: the dense export's projection weights, two of every four along K zeroed (an .onnx input).
    proto = onnx.load(str(tmp_path / "same" / "reference.onnx"))
    weights = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if init.name in weights and w.ndim == 2 and w.shape[0] % 4 == 0:  # MatMul weights are (K, N)
            groups = np.abs(w.T).reshape(-1, 4)
            keep = np.zeros_like(groups, dtype=bool)
            np.put_along_axis(keep, np.argsort(-groups, axis=1)[:, :2], True, axis=1)
            init.CopyFrom(numpy_helper.from_array(w * keep.reshape(w.T.shape).T, init.name))
    sparse = tmp_path / "sparse24.onnx"
    onnx.save(proto, str(sparse))
    reference = tmp_path / "same" / "reference.onnx"
    fast = {**FAST, "quality_windows": 0}  # this compile is about the predictions
    report = api.compile(sparse, tmp_path / "s24", CompileOptions(baseline=str(reference), gpus=["a100"], **fast))
    rows = report.report["baseline"]["predictions"]
    assert {r["engine"] for r in rows} == {"onnxruntime", "tensorrt"}  # the engine's, and TensorRT's 2:4 estimate
    trt = next(r for r in rows if r["engine"] == "tensorrt")
    # launch-bound at this size: the sparse GEMMs' work hides under the per-kernel cost, and the row says so
    assert trt["sparse_used"] and trt["speedup"] >= 1.0
    assert trt["speedup"] > 1.001 or "launch-bound: their work hides under the per-kernel cost" in trt["cause"]
    assert all(r["speedup"] == pytest.approx(1.0, abs=0.02) for r in report.report["predictions"])  # vs itself


def test_a_baseline_with_another_vocabulary_is_bad_input_before_loading(folders, tmp_path, capsys):
    _, smaller = folders
    other = P.save_llama(tiny_llama(0, vocab_size=96), tmp_path / "other")
    out = tmp_path / "out"
    assert main(["compile", str(smaller), "--out", str(out), "--baseline", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--baseline {other} is not the dense model of the input {smaller}" in err
    assert "vocabulary of 128 tokens vs 96" in err and not out.exists()
    with pytest.raises(BadInputError, match="no such file or folder"):
        api.compile(smaller, out, CompileOptions(baseline=str(tmp_path / "missing"), **FAST))
