"""Optional steps (profiling, quality, an engine's check) never destroy finished outputs.

A bf16 checkpoint used to exit 2 at profiling ("Could not find an implementation for Mul(14)": ONNX Runtime's
CPU provider has no bf16 elementwise kernels) after genai/ was written and checked, and the output folder was
gone. Half-precision graphs are now profiled and measured through fp32 copies when two fp32 models fit, or
the step says why not; a step that breaks records its error and the outputs stay.
"""

from __future__ import annotations

import json
import logging

import onnx_ir as ir
import pytest
import torch

from prune2deploy import api
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama
from tests.fixtures.zeroing import llama_mlp_masks, save_masks

GRID = {"profile_batches": [1], "profile_seqs": [8], "profile_budget_s": 0.2, "quality_windows": 1}


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    import numpy as np

    folder = tmp_path_factory.mktemp("bf16")
    module = tiny_llama().to(torch.bfloat16)
    module.save_pretrained(folder / "hf")
    masks, _ = llama_mlp_masks(module, 0.5, np.random.default_rng(0))
    save_masks(masks, folder / "masks.safetensors")
    return folder / "hf", folder / "masks.safetensors"


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _weight_types(path) -> set:
    return {v.const_value.dtype for v in ir.load(str(path)).graph.initializers.values() if v.const_value.size > 64}


def test_bf16_compile_is_profiled_and_measured_through_fp32_copies(tmp_path, bf16_checkpoint):
    checkpoint, masks = bf16_checkpoint
    options = CompileOptions(masks=masks, genai=False, **GRID)
    result = api.compile(checkpoint, tmp_path / "out", options)
    report = result.report
    assert result.passed and report["input"]["dtype"] == "bfloat16"
    assert report["profile"] == {"measured": True, "precision": "fp32 copies of the half-precision graphs"}
    rows = {(r["model"], r["batch"], r["seq"]) for r in report["latency"]}
    assert rows == {("reference", 1, 8), ("compiled", 1, 8)} and report["speedup"][0]["measured"] > 0
    quality = report["quality"]
    assert quality["computed"] and "fp32 copies" in quality["precision"]
    against_reference, against_dense = quality["comparisons"]
    assert against_reference["kl_mean"] < 1e-6 and against_reference["top1_agreement"] == 1.0  # exact compile
    assert against_dense["reference"].startswith("dense") and against_dense["kl_mean"] > against_reference["kl_mean"]
    # the copies were scratch: model.onnx stays bf16 and no fp32 folder is left in the output
    assert ir.DataType.BFLOAT16 in _weight_types(tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out" / "fp32").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["profile"]["measured"]


def test_bf16_compile_verified_block_by_block_skips_profiling_and_says_why(tmp_path, bf16_checkpoint):
    checkpoint, masks = bf16_checkpoint
    options = CompileOptions(masks=masks, genai=False, verify_mode="blockwise", **GRID)
    report = api.compile(checkpoint, tmp_path / "out", options).report
    assert report["verification"]["mode"] == "blockwise" and report["verification"]["passed"]
    assert not report["profile"]["measured"] and "block by block" in report["profile"]["reason"]
    assert "latency" not in report and not report["quality"]["computed"]
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_a_profiling_failure_keeps_the_outputs_and_says_what_to_do(tmp_path, bf16_checkpoint, monkeypatch):
    import prune2deploy.driver.compile as driver

    def broken(*args, **kwargs):
        raise RuntimeError("Could not find an implementation for Mul(14) node with name '/model/Mul'")

    monkeypatch.setattr(driver, "profile_section", broken)
    checkpoint, masks = bf16_checkpoint
    warnings = _Records(level=logging.WARNING)
    logging.getLogger(driver.__name__).addHandler(warnings)
    try:
        result = api.compile(checkpoint, tmp_path / "out", CompileOptions(masks=masks, **GRID))
    finally:
        logging.getLogger(driver.__name__).removeHandler(warnings)
    out = tmp_path / "out"
    error = result.report["profile"]["error"]
    assert not result.report["profile"]["measured"] and "Mul(14)" in error and "--no-profile" in error
    assert any("--no-profile" in r.getMessage() for r in warnings.records)
    # everything finished before profiling is there: model.onnx verified, genai/ written and checked
    assert result.passed and (out / "model.onnx").is_file()
    assert result.report["genai"]["written"] and (out / "genai" / "genai_config.json").is_file()
    assert json.loads((out / "report.json").read_text())["profile"]["error"] == error


def test_bf16_llama_with_2_4_zeros_compiles_by_default_and_up_to_the_gpu_for_tensorrt(tmp_path, capsys):
    """The first-hour case: a bf16 Llama whose Linear weights are 2:4 compiles with the default options (exit 0,
    the zeros found already 2:4), and `--engine tensorrt --sparse-2-4` goes as far as this machine allows: its
    options validate (no fuse-ort) and, without TensorRT, it stops with exit 2 and the install line."""
    from prune2deploy.cli import main

    module = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "layers" in name and name.endswith("proj.weight"):
                groups = param.view(param.shape[0], -1, 4)
                groups[:, :, 2:] = 0  # the last two of every four along K
    module.save_pretrained(tmp_path / "hf")
    common = ["--no-profile", "--quality-windows", "0", "--no-genai", "--quiet"]
    assert main(["compile", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), *common]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["passed"] and report["input"]["dtype"] == "bfloat16"
    capsys.readouterr()
    options = CompileOptions(engine="tensorrt", passes=["sparsify-2:4"], precision="fp16")
    assert "fuse-ort" not in options.passes and "sparsify-2:4" in options.passes
    argv = ["compile", str(tmp_path / "hf"), "--out", str(tmp_path / "trt"), "--engine", "tensorrt", "--sparse-2-4"]
    code = main([*argv, "--precision", "fp16", *common])
    from prune2deploy.engines.registry import engine_class

    if engine_class("tensorrt").available().can_build:
        assert code in (0, 2)  # a GPU machine builds; a TensorRT without a GPU stops at the build with exit 2
    else:
        assert code == 2 and "pip install" in capsys.readouterr().err
