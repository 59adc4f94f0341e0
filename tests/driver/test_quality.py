"""The report's quality section: compiled vs masked reference (≈ 0 for an exact compile), vs dense (> 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prune2deploy import api
from prune2deploy.errors import ConfigError
from prune2deploy.profiling.report import validate_report
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_bert, tiny_llama
from tests.fixtures.zeroing import llama_mlp_masks, save_masks


def _bert_mlp_masks(module, ratio: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Zero ``ratio`` of every BERT intermediate neuron (rows of intermediate.dense, columns of output.dense)."""
    masks = {}
    for i, layer in enumerate(module.encoder.layer):
        width = layer.intermediate.dense.weight.shape[0]
        keep = np.ones(width, dtype=np.float32)
        keep[rng.choice(width, round(ratio * width), replace=False)] = 0
        prefix = f"encoder.layer.{i}."
        masks[prefix + "intermediate.dense.weight"] = np.repeat(keep[:, None], layer.intermediate.dense.in_features, 1)
        masks[prefix + "intermediate.dense.bias"] = keep.copy()
        masks[prefix + "output.dense.weight"] = np.repeat(keep[None, :], layer.output.dense.out_features, 0)
    return masks


def test_lm_quality_is_zero_against_the_reference_and_positive_against_dense(tmp_path, rng):
    module = tiny_llama()
    masks, _ = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    options = CompileOptions(masks=tmp_path / "masks.safetensors", profile=False, genai=False, quality_windows=2)
    result = api.compile(module, tmp_path / "out", options)
    quality = result.report["quality"]
    assert quality["computed"] and quality["kind"] == "lm" and quality["windows"] == 2
    assert "random token ids" in quality["text"]  # a bare module has no tokenizer
    vs_reference, vs_dense = quality["comparisons"]
    assert vs_reference["reference"] == "masked reference" and vs_dense["reference"].startswith("dense")
    assert vs_reference["tokens"] == 2 * quality["window"]
    assert vs_reference["kl_mean"] < 1e-8 and vs_reference["top1_agreement"] == 1.0
    assert vs_reference["ppl_candidate"] == pytest.approx(vs_reference["ppl_reference"], rel=1e-6)
    assert vs_dense["kl_mean"] > 1e-6 and vs_dense["top1_agreement"] < 1.0  # half of every MLP is gone
    assert vs_dense["ppl_candidate"] == pytest.approx(vs_reference["ppl_candidate"], rel=1e-6)  # same compiled
    assert vs_dense["ppl_reference"] != pytest.approx(vs_dense["ppl_candidate"], rel=1e-6)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    validate_report(saved)
    assert saved["quality"]["comparisons"][1]["kl_mean"] == vs_dense["kl_mean"]
    assert "dense (before the masks)" in (tmp_path / "out" / "report.html").read_text()
    assert result.passed  # quality is information: the verdict is verification's


def test_encoder_quality_is_an_embedding_cosine(tmp_path, rng):
    module = tiny_bert()
    save_masks(_bert_mlp_masks(module, 0.5, rng), tmp_path / "masks.safetensors")
    options = CompileOptions(masks=tmp_path / "masks.safetensors", profile=False, quality_windows=1)
    quality = api.compile(module, tmp_path / "out", options).report["quality"]
    assert quality["kind"] == "encoder" and quality["sentences"] == 8
    vs_reference, vs_dense = quality["comparisons"]
    assert vs_reference["cosine_min"] > 1 - 1e-9
    assert vs_dense["cosine_mean"] < 1 - 1e-6  # the masks changed the embeddings


def test_without_masks_there_is_no_dense_model_and_zero_windows_turn_it_off(tmp_path):
    quality = api.compile(tiny_llama(), tmp_path / "a", CompileOptions(profile=False, genai=False)).report["quality"]
    assert len(quality["comparisons"]) == 1 and "no masks were applied" in quality["dense_skipped"]
    off = CompileOptions(profile=False, genai=False, quality_windows=0)
    quality = api.compile(tiny_llama(), tmp_path / "b", off).report["quality"]
    assert quality == {"computed": False, "reason": "turned off (quality_windows 0 / --quality-windows 0)"}


def test_quality_windows_is_validated():
    with pytest.raises(ConfigError, match="quality_windows"):
        CompileOptions(quality_windows=-1)
