"""compile() end to end on tiny models: structure changes, numbers stay, outputs are complete."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from prune2deploy import api
from prune2deploy.errors import BadInputError, MaskError, OutputExistsError
from prune2deploy.io import sha256_file
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import TinyResNet, tiny_bert, tiny_llama
from tests.fixtures.results import pass_record
from tests.fixtures.zeroing import llama_mlp_masks, save_masks

FAST = {"profile": False}


def _matmul_widths(path) -> list[tuple[int, ...]]:
    model = ir.load(str(path))
    return [
        tuple(n.inputs[1].shape) for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    ]


def test_llama_masks_file_removes_mlp_channels_exactly(tmp_path, rng):
    module = tiny_llama()
    masks, kept = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    result = api.compile(module, tmp_path / "out", CompileOptions(masks=tmp_path / "masks.safetensors", **FAST))
    widths = _matmul_widths(tmp_path / "out" / "model.onnx")
    assert (64, kept[0]) in widths and (kept[0], 64) in widths  # gate/up [64, k], down [k, 64]
    assert result.report["verification"]["passed"]
    assert result.report["verification"]["outputs"]["logits"]["max_rel"] < 1e-5
    record = pass_record(result.report, "remove-channels")
    assert record["channels_removed"] == sum(96 - k for k in kept.values())
    assert result.report["model"]["compiled"]["params"] < result.report["model"]["reference"]["params"]
    for name in ("model.onnx", "reference.onnx", "report.json", "report.html", "manifest.json"):
        assert (tmp_path / "out" / name).is_file()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"]["model.onnx"] == sha256_file(tmp_path / "out" / "model.onnx")
    assert manifest["masks"]["sha256"] == sha256_file(tmp_path / "masks.safetensors")
    assert "onnxruntime" in manifest["libraries"]


def test_bert_with_biases_and_layernorm(tmp_path, rng):
    module = tiny_bert()
    with torch.no_grad():
        for layer in module.encoder.layer:
            drop = torch.from_numpy(rng.choice(80, 30, replace=False))
            layer.intermediate.dense.weight[drop] = 0
            layer.intermediate.dense.bias[drop] = 0  # GELU(0) = 0: the neuron is dead
    result = api.compile(module, tmp_path / "out", CompileOptions(**FAST))
    assert pass_record(result.report, "remove-channels")["channels_removed"] == 60
    assert (64, 50) in _matmul_widths(tmp_path / "out" / "model.onnx")
    assert all(o["max_rel"] < 1e-5 for o in result.report["verification"]["outputs"].values())


def test_bias_alone_is_a_constant_that_folds(tmp_path):
    """A zero weight row with a non-zero bias is a constant (GELU(0.5)), not a dead neuron: it goes only
    because its contribution is folded into the output projection's bias."""
    module = tiny_bert()
    with torch.no_grad():
        module.encoder.layer[0].intermediate.dense.weight[:10] = 0
        module.encoder.layer[0].intermediate.dense.bias[:10] = 0.5
    result = api.compile(module, tmp_path / "out", CompileOptions(**FAST))
    record = pass_record(result.report, "remove-channels")
    assert record["channels_removed"] == record["constant_channels_folded"] == 10
    assert result.report["verification"]["passed"]
    assert all(o["max_rel"] < 1e-4 for o in result.report["verification"]["outputs"].values())


def test_torch_prune_module(tmp_path):
    """torch.nn.utils.prune (weight_orig × weight_mask) is baked before export; the module is untouched."""
    import torch.nn.utils.prune as prune

    module = tiny_llama()
    for layer in module.model.layers:
        mask = torch.ones_like(layer.mlp.down_proj.weight)
        mask[:, :40] = 0
        prune.custom_from_mask(layer.mlp.down_proj, "weight", mask)
    result = api.compile(module, tmp_path / "out", CompileOptions(**FAST))
    assert pass_record(result.report, "remove-channels")["channels_removed"] == 80
    assert hasattr(module.model.layers[0].mlp.down_proj, "weight_orig")  # caller's module unchanged
    assert result.report["verification"]["passed"]


def test_cnn_residual_depthwise(tmp_path):
    module = TinyResNet()
    with torch.no_grad():
        bn = module.block[4]  # BN after the depthwise conv: SCOP-style zero gamma and beta
        bn.weight[:8] = 0
        bn.bias[:8] = 0
        # zero BN before the depthwise conv: the depthwise conv of a zero channel is its bias, a constant that
        # folds exactly into the 1x1 conv after the next BN (constant channels)
        module.block[1].weight[8:12] = 0
        module.block[1].bias[8:12] = 0
    result = api.compile(module, tmp_path / "out", CompileOptions(**FAST))
    model = ir.load(str(tmp_path / "out" / "model.onnx"))
    convs = [n for n in model.graph if n.op_type == "Conv"]
    depthwise = [n for n in convs if n.attributes.get("group") and n.attributes["group"].value > 1]
    assert depthwise and depthwise[0].attributes["group"].value == 12
    record = pass_record(result.report, "remove-channels")
    assert record["channels_removed"] == 12 and record["constant_channels_folded"] == 4
    assert result.report["verification"]["outputs"]["logits"]["max_rel"] < 1e-5


def test_hf_folder_and_onnx_file_with_masks(tmp_path, rng):
    """A saved HF folder (masks applied in torch) and its ONNX (masks mapped through metadata) agree."""
    module = tiny_llama()
    module.save_pretrained(tmp_path / "hf")
    masks, _ = llama_mlp_masks(module, 0.25, rng)
    save_masks(masks, tmp_path / "m.safetensors")
    before = sha256_file(tmp_path / "hf")
    hf_result = api.compile(tmp_path / "hf", tmp_path / "a", CompileOptions(masks=tmp_path / "m.safetensors", **FAST))
    assert sha256_file(tmp_path / "hf") == before  # input untouched
    # now the unmasked ONNX of the same model, with the mask file mapped onto its initializers
    plain = api.compile(tmp_path / "hf", tmp_path / "plain", CompileOptions(**FAST))
    onnx_in = tmp_path / "plain" / "reference.onnx"
    onnx_before = sha256_file(onnx_in)
    onnx_result = api.compile(onnx_in, tmp_path / "b", CompileOptions(masks=tmp_path / "m.safetensors", **FAST))
    assert sha256_file(onnx_in) == onnx_before
    assert pass_record(plain.report, "remove-channels")["channels_removed"] == 0
    assert (
        pass_record(hf_result.report, "remove-channels")["channels_removed"]
        == pass_record(onnx_result.report, "remove-channels")["channels_removed"]
    )
    assert sorted(_matmul_widths(tmp_path / "a" / "model.onnx")) == sorted(
        _matmul_widths(tmp_path / "b" / "model.onnx")
    )


def test_mask_errors_are_clear(tmp_path, rng):
    module = tiny_llama()
    masks, _ = llama_mlp_masks(module, 0.5, rng)
    wrong = {"model.layers.0.mlp.up_proj.weight": masks["model.layers.0.mlp.up_proj.weight"].T.copy()}
    save_masks(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(MaskError, match=r"has shape \(64, 96\) but the parameter is \(96, 64\)"):
        api.compile(module, tmp_path / "o1", CompileOptions(masks=tmp_path / "wrong.safetensors", **FAST))
    missing = {"model.layers.7.mlp.up_proj.weight": np.ones((96, 64), np.float32)}
    save_masks(missing, tmp_path / "missing.safetensors")
    with pytest.raises(MaskError, match="names no parameter"):
        api.compile(module, tmp_path / "o2", CompileOptions(masks=tmp_path / "missing.safetensors", **FAST))
    save_masks({"model.norm.weight": np.full(64, 0.5, np.float32)}, tmp_path / "frac.safetensors")
    with pytest.raises(MaskError, match=r"other than 0 and 1"):
        api.compile(module, tmp_path / "o3", CompileOptions(masks=tmp_path / "frac.safetensors", **FAST))
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no half-written staging folders


def test_bad_inputs(tmp_path):
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    digest = sha256_file(corrupt)
    with pytest.raises(BadInputError, match=r"bad\.onnx: not a valid ONNX model"):
        api.compile(corrupt, tmp_path / "out", CompileOptions(**FAST))
    assert sha256_file(corrupt) == digest
    with pytest.raises(BadInputError, match="no such"):
        api.compile(tmp_path / "nope.onnx", tmp_path / "out", CompileOptions(**FAST))
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        api.compile(tiny_llama(), tmp_path / "exists", CompileOptions(**FAST))
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"


def test_profile_section_and_options_file(tmp_path, rng):
    from prune2deploy.spec import load_config

    (tmp_path / "c.yaml").write_text(
        "compile:\n  profile_batches: [1, 2]\n  profile_seqs: [16]\n  profile_budget_s: 1\n"
    )
    options = CompileOptions.from_dict(load_config(tmp_path / "c.yaml"))
    module = tiny_llama()
    masks, _ = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "m.safetensors")
    options.masks = tmp_path / "m.safetensors"
    report = api.compile(module, tmp_path / "out", options).report
    grid = {(r["model"], r["batch"], r["seq"]) for r in report["latency"]}
    assert grid == {(m, b, 16) for m in ("reference", "compiled") for b in (1, 2)}
    assert all(r["median_ms"] > 0 for r in report["latency"])
    assert {s["batch"] for s in report["speedup"]} == {1, 2}
    assert report["predictions"] and all(p["speedup"] >= 1.0 for p in report["predictions"])


def test_unknown_option_is_an_error():
    from prune2deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown option"):
        CompileOptions.from_dict({"pases": ["remove-channels"]})


def test_a_prune_plan_asks_for_the_sparse_weights_pass_only_in_a_sparse_core_pattern(tmp_path):
    """The prune → compile policy lives in the API: 2:4 and 1:4 masks ask for the registry's sparse_weights pass."""
    from types import SimpleNamespace

    from prune2deploy.pruning.plan import Plan

    sparse = [name for name, spec in api.pass_specs().items() if spec.sparse_weights]
    for nm, wanted in (((2, 4), sparse), ((1, 4), sparse), ((2, 8), []), (None, [])):
        plan = Plan(method="m", criterion="magnitude", ratios={}, nm=nm)
        assert api.plan_passes(plan) == wanted, nm
    result = SimpleNamespace(plan=Plan(method="m", criterion="magnitude", ratios={}, nm=(2, 4)), plan_path=tmp_path)
    options = api.plan_options(result, overwrite=True)
    assert options.plan == tmp_path and options.overwrite and set(sparse) <= set(options.passes)
    assert set(options.requested_passes) == {*CompileOptions().requested_passes, *sparse}
