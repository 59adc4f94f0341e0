"""The CLI's entry point: options checked first, outputs written atomically, real models end to end."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prune2deploy.errors import ConfigError, OutputExistsError
from prune2deploy.pruning import apply_masks, load_plan, prune_model
from prune2deploy.quality import encoder_quality, lm_quality


@pytest.fixture
def ids_file(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 64, size=(6, 16)))
    return path


def test_writes_masks_and_plan(tiny_llama_tied32, ids_file, tmp_path):
    out = tmp_path / "out"
    result = prune_model(
        tiny_llama_tied32,
        criterion="wanda",
        structures={"mlp": 0.5, "heads": 0.5},
        calibration=ids_file,
        num_samples=4,
        seq_len=16,
        round_to=8,
        out_dir=out,
    )
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "plan.yaml"]
    masks = load_file(str(result.masks_path))
    params = dict(tiny_llama_tied32.named_parameters())
    for name, mask in masks.items():  # the contract: parameter names, own shapes, 0/1 float32
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    plan = load_plan(result.plan_path)
    assert plan == result.plan
    assert plan.masks["sha256"] == hashlib.sha256(result.masks_path.read_bytes()).hexdigest()
    assert plan.calibration["num_samples"] == 4 and plan.calibration["source"] == str(ids_file)
    assert result.summary["masked_tensors"] == len(masks)


def test_refuses_existing_output_unless_overwrite(tiny_llama_tied32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="overwrite"):
        prune_model(tiny_llama_tied32, criterion="magnitude", structures={"mlp": 0.5}, out_dir=out)
    result = prune_model(tiny_llama_tied32, criterion="magnitude", structures={"mlp": 0.5}, out_dir=out, overwrite=True)
    assert result.plan.calibration is None  # magnitude without depth pruning reads no data
    assert (out / "keep.txt").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "wanda", "structures": {"mlp": 1.0}}, "structures.mlp"),
        ({"criterion": "wanda", "structures": {"neurons": 0.5}}, "unknown 'neurons'"),
        ({"criterion": "wanda", "structures": {"unstructured": 0.5}, "nm": (2, 4)}, "not both"),
        ({"criterion": "wanda", "structures": {}, "nm": (4, 2)}, "0 < N < M"),
        ({"criterion": "wanda", "structures": {"mlp": 0.5}, "round_to": 0}, "round_to"),
        ({"criterion": "sparsegpt", "structures": {"mlp": 0.5}}, "criterion"),
        ({"criterion": "michel", "structures": {"mlp": 0.5}}, "cannot rank"),
        ({"criterion": "wanda", "structures": {"heads": 0.5}, "head_grouping": "any"}, "head_grouping"),
        ({"criterion": "wanda", "structures": {}}, "nothing to prune"),
        ({"criterion": "wanda", "structures": {"mlp": 0.0}}, "nothing to prune"),
        ({"criterion": "wanda", "structures": {"mlp": 0.5}, "global_scale": "max"}, "global_scale"),
        ({"criterion": "wanda", "structures": {"mlp": 0.5}, "min_keep": -0.1}, "min_keep"),
        ({"criterion": "wanda", "structures": {"mlp": 0.5}, "min_keep": 0.75}, "lower --min-keep"),
    ],
)
def test_bad_options_fail_before_loading(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        prune_model(tmp_path / "no-such-model", out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_global_options_without_global(tmp_path, capsys):
    from prune2deploy.cli import main

    code = main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--mlp", "0.5", "--min-keep", "0.2"])
    assert code == 2 and "add --global" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_wanda_gqa_uniform(smollm2, tmp_path):
    result = prune_model(
        smollm2,
        criterion="wanda",
        structures={"heads": 1 / 3, "mlp": 0.25},
        head_grouping="uniform",
        round_to=64,
        num_samples=4,
        seq_len=64,
        out_dir=tmp_path / "out",
    )
    plan = result.plan
    assert plan.model["num_heads"] == 9 and plan.model["num_kv_heads"] == 3 and len(plan.layers) == 30
    for choice in plan.layers:
        assert len(choice.heads.kept) == 6 and choice.kv_heads.removed == []
        assert sorted(h // 3 for h in choice.heads.kept) == [0, 0, 1, 1, 2, 2]  # two per kv group
        assert len(choice.mlp.kept) == 1152  # 1536 * 0.75, a multiple of 64
    masks = load_file(str(result.masks_path))
    assert masks["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert masks["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert "model.layers.0.self_attn.k_proj.weight" not in masks  # no kv head lost its whole group
    masked = apply_masks(copy.deepcopy(smollm2.module), masks)
    q = lm_quality(smollm2.module, masked, tokenizer=smollm2.tokenizer, window=64, max_windows=2)
    assert 1.0 < q.ppl_reference < 100.0  # the dense model reads English
    assert q.kl_mean > 0.01 and q.ppl_candidate > q.ppl_reference and 0.0 < q.top1_agreement < 1.0


@pytest.mark.slow
def test_minilm_minitron_heads(tmp_path):
    from prune2deploy.frontends.hf import load_hf_model

    minilm = load_hf_model("minilm-l6")
    result = prune_model(
        minilm,
        criterion="minitron",
        structures={"heads": 0.25, "mlp": 0.25},
        num_samples=4,
        seq_len=64,
        round_to=64,
        out_dir=tmp_path / "out",
    )
    assert all(len(c.heads.kept) == 9 and len(c.mlp.kept) == 1152 for c in result.plan.layers)
    masked = apply_masks(copy.deepcopy(minilm.module), load_file(str(result.masks_path)))
    q = encoder_quality(minilm.module, masked, tokenizer=minilm.tokenizer, max_sentences=16)
    assert 0.5 < q.cosine_mean < 1.0
