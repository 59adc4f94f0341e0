"""The compile driver: every engine that runs here is verified against the masked reference."""

from __future__ import annotations

import json

from prune2deploy import api
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama
from tests.fixtures.zeroing import llama_mlp_masks, save_masks


def test_torch_engine_is_verified_against_the_reference(tmp_path, rng):
    module = tiny_llama()
    masks, _ = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    options = CompileOptions(
        masks=tmp_path / "masks.safetensors", engine="torch", engine_options={"device": "cpu"}, profile=False
    )
    result = api.compile(module, tmp_path / "out", options)
    engine = result.report["engine"]
    assert engine["engine"] == "torch" and engine["info"]["device"] == "cpu"
    check = engine["verification"]
    assert check["exact"] and check["passed"] and check["worst"] < 1e-4
    assert set(check["outputs"]) == {"logits"} and len(check["feeds"]) == 2
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["engine"]["verification"]["passed"]


def test_half_precision_engine_is_reported_as_approximate(tmp_path):
    options = CompileOptions(engine="torch", engine_options={"device": "cpu"}, precision="fp16", profile=False)
    result = api.compile(tiny_llama(), tmp_path / "out", options)
    check = result.report["engine"]["verification"]
    assert not check["exact"] and check["passed"]  # approximate: its error is reported, not held to 1e-4
    assert 0 < check["worst"] < 5e-2
    assert result.report["engine"]["info"]["precision"]["source"] == "converted by convert-precision"


def test_fused_graph_that_ort_cannot_load_falls_back_to_the_unfused_one(tmp_path):
    from prune2deploy.passes.registry import default_passes
    from tests.fixtures.models import tiny_gpt2

    # onnxscript's attention fusion leaves GPT-2's c_proj Gemm with a rank-3 input: ORT refuses the graph.
    options = CompileOptions(passes=[*default_passes(), "fuse-ort"], profile=False, genai=False)
    result = api.compile(tiny_gpt2(), tmp_path / "out", options)
    entry = next(p for p in result.report["passes"] if p["pass"] == "fuse-ort")
    assert entry["record"]["fell_back"] and not entry["modified"]
    assert "model.onnx is the unfused graph" in entry["refused"]["model"] and "Gemm" in entry["refused"]["model"]
    assert result.passed and result.report["verification"]["worst"] < 1e-4
    import onnx

    ops = {n.domain for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node}
    assert "com.microsoft" not in ops  # the file on disk is the unfused graph


def test_fused_graph_that_verifies_is_kept(tmp_path):
    from prune2deploy.passes.registry import default_passes

    options = CompileOptions(passes=[*default_passes(), "fuse-ort"], profile=False, genai=False)
    result = api.compile(tiny_llama(), tmp_path / "out", options)
    entry = next(p for p in result.report["passes"] if p["pass"] == "fuse-ort")
    assert entry["modified"] and "fell_back" not in entry["record"] and result.passed
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node}
    assert "SkipSimplifiedLayerNormalization" in ops


def test_blockwise_verification_keeps_the_graph_unfused_and_says_why(tmp_path):
    # By default (ONNX Runtime, fp32) fuse-ort runs; a block-by-block verification needs each layer's residual
    # output, which SkipRMSNorm computes inside itself, so the driver leaves the graph unfused.
    options = CompileOptions(profile=False, genai=False, verify_mode="blockwise")
    assert "fuse-ort" in options.passes
    result = api.compile(tiny_llama(), tmp_path / "out", options)
    entry = next(p for p in result.report["passes"] if p["pass"] == "fuse-ort")
    assert entry["record"]["skipped"] and not entry["modified"]
    assert "block by block" in entry["refused"]["model"]
    assert result.passed and result.report["verification"]["mode"] == "blockwise"
    import onnx

    ops = {n.domain for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node}
    assert "com.microsoft" not in ops
