"""One answer per question: the compile report's predictions and ``predict`` on its files are the same rows;
a fused graph costs the FLOPs of the unfused one, so fusion is never credited as pruning."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from prune2deploy import api
from prune2deploy.analysis.contrib_cost import fused_op_counts
from prune2deploy.analysis.cost import model_cost
from prune2deploy.passes.fuse_ort import FuseOrtPass
from prune2deploy.profiling.costmodel import ENGINES
from prune2deploy.profiling.prediction import Priced, compare_costs, compare_models
from prune2deploy.profiling.roofline import load_catalog
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama

GPUS = ["h100", "l4"]


@pytest.fixture(scope="module")
def unfused_and_fused():
    from prune2deploy.frontends.torch import export_module, hf_export_spec

    module = tiny_llama()
    unfused = export_module(module, hf_export_spec("causal-lm", batch=2, seq=8, vocab_size=module.config.vocab_size))
    fused = unfused.clone()
    assert FuseOrtPass()(fused).modified
    return unfused, fused


def test_fused_llama_costs_the_flops_of_the_unfused_one(unfused_and_fused):
    unfused, fused = unfused_and_fused
    ops = fused_op_counts(fused)
    assert ops["MultiHeadAttention"] == 2 and ops["RotaryEmbedding"] == 4 and not fused_op_counts(unfused)
    before, after = model_cost(unfused, batch=2, seq=16), model_cost(fused, batch=2, seq=16)
    assert after.flops == pytest.approx(before.flops, rel=1e-3)  # was 7% low: attention and rotary cost 0
    attention = [n for n in after.nodes if n.op_type == "MultiHeadAttention"]
    assert all(n.flops > 0 and n.shapes_known for n in attention)


def test_fused_graph_prices_like_the_unfused_one_on_tensorrt(unfused_and_fused):
    """TensorRT fuses norms, rotary and attention itself: the graph arriving fused changes little (was 0.86x
    for the demo: rotary kernels of their own, attention with no FLOPs)."""
    unfused, fused = unfused_and_fused
    rows = compare_costs(
        Priced(model_cost(unfused, batch=1, seq=128), {}), Priced(model_cost(fused, batch=1, seq=128), {}),
        gpus=GPUS, precision="fp16", engine="tensorrt",
    )  # fmt: skip
    catalog = load_catalog()
    for row in rows:
        # what stays: fuse-ort's rotary writes its angles as a tiny MatMul and a ReduceMax (two more kernels),
        # and the skip norms read the residual they add: within three per-kernel costs of the unfused graph
        launch_ms = ENGINES["tensorrt"].launch_s(catalog[row["gpu"]]) * 1e3
        assert 0 <= row["compiled_ms"] - row["reference_ms"] < 3 * launch_ms
        assert row["ideal_speedup"] == pytest.approx(1.0, abs=1e-3)


def test_fusion_is_not_credited_as_pruning(unfused_and_fused):
    """Fused compiled vs unfused reference of the same weights: the reference is fused here too, so the
    speedup is 1 and what fusion adds is a separate number."""
    unfused, fused = unfused_and_fused
    rows = compare_models(unfused.clone(), fused, batch=1, seq=64, gpus=GPUS, precision="fp16", engine="onnxruntime")
    for row in rows:
        assert row["fusion_level"] == "reference fused here"
        assert row["speedup"] == pytest.approx(1.0, rel=1e-6)
        assert row["ideal_speedup"] == pytest.approx(1.0, rel=1e-6)
        assert row["fusion_speedup"] > 1.0  # fewer ORT kernels: fusion's gain, reported apart
        assert row["reference_fused_ops"] == row["fused_ops"]


def test_report_predictions_equal_predict_on_its_files(tmp_path):
    """Compile (ONNX Runtime, fp32: fuse-ort runs), then ``predict model.onnx --against reference.onnx`` with
    the report's engine, GPUs and shape: the same rows, number for number."""
    out = tmp_path / "out"
    options = CompileOptions(profile=False, genai=False, keep_reference=True, gpus=GPUS)
    result = api.compile(tiny_llama(), out, options)
    report = json.loads((out / "report.json").read_text())
    rows = report["predictions"]
    assert [r["gpu"] for r in rows] == ["h100-sxm", "l4"]
    assert fused_op_counts(ir.load(str(out / "model.onnx")))  # the written model is the fused one
    shape = report["model"]["cost_shape"]
    again = api.predict(
        out / "model.onnx", against=out / "reference.onnx", gpus=GPUS, precision=rows[0]["precision"],
        batch=shape["batch"], seq=shape["seq"], engine=rows[0]["engine"],
    )  # fmt: skip
    keys = ("compiled_ms", "reference_ms", "speedup", "lower_bound_ms", "ideal_speedup", "binding", "fusion_level")
    for ours, theirs in zip(rows, again, strict=True):
        for key in keys:
            want = theirs[key]
            assert ours[key] == (pytest.approx(want, rel=1e-9) if isinstance(want, float) else want), key
        assert ours["fused_ops"] == theirs["fused_ops"]
    assert result.report["predictions"][0]["ideal_speedup"] == pytest.approx(1.0, rel=1e-6)  # nothing pruned
    assert all(r["speedup"] == pytest.approx(1.0, rel=1e-6) for r in rows)


def test_predict_rows_carry_the_schema_keys_only(tiny_llama_onnx):
    rows = api.predict(tiny_llama_onnx, against=tiny_llama_onnx, gpus=["a100"], seq=16)
    row = rows[0]
    assert not {"predicted_ms", "latency_ms", "reference_predicted_ms", "predicted_speedup"} & set(row)
    assert row["speedup"] == pytest.approx(1.0) and row["reference_ms"] == pytest.approx(row["compiled_ms"])
    assert row["ideal_speedup"] == 1.0 and row["fusion_level"] == "as given" and "fusion_speedup" not in row
    assert row["lower_bound_ms"] <= row["compiled_ms"]
