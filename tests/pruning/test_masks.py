"""Masks follow the contract and apply cleanly: zeroed structures equal physically removed ones."""

from __future__ import annotations

import copy

import pytest
import torch

from prune2deploy.errors import MaskError, UnsupportedModelError
from prune2deploy.pruning.masks import apply_masks
from prune2deploy.pruning.prune import prune_module
from prune2deploy.pruning.sparsity import nm_mask
from prune2deploy.pruning.structures import detect_structure
from tests.fixtures.models import LLAMA_32_TIED, tiny_llama

from .conftest import calibration


def _sliced_llama(model, *, mlp_kept=None, heads_kept=None, kv_kept=None):
    """A new LlamaForCausalLM with the kept neurons/heads copied: the physically pruned model."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    if mlp_kept is not None:
        config.intermediate_size = len(mlp_kept[0])
    if heads_kept is not None:
        config.num_attention_heads = len(heads_kept[0])
        config.num_key_value_heads = len(kv_kept[0])
    small = LlamaForCausalLM(config).eval()
    src = dict(model.named_parameters())
    d = model.config.head_dim
    with torch.no_grad():
        for name, p in small.named_parameters():
            w = src[name]
            layer = int(name.split(".")[2]) if ".layers." in name else None
            if mlp_kept is not None and ("gate_proj" in name or "up_proj" in name):
                w = w[mlp_kept[layer]]
            elif mlp_kept is not None and "down_proj" in name:
                w = w[:, mlp_kept[layer]]
            elif heads_kept is not None and ("q_proj" in name or "o_proj" in name):
                rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads_kept[layer]])
                w = w[rows] if "q_proj" in name else w[:, rows]
            elif heads_kept is not None and ("k_proj" in name or "v_proj" in name):
                w = w[torch.cat([torch.arange(g * d, (g + 1) * d) for g in kv_kept[layer]])]
            p.copy_(w)
    return small


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_zeroed_mlp_neurons_equal_sliced_weights(tiny_llama_tied32, llama_calib):
    plan, masks = prune_module(
        tiny_llama_tied32, criterion="wanda", structures={"mlp": 0.5}, calibration=llama_calib, round_to=8
    )
    kept = {c.index: c.mlp.kept for c in plan.layers}
    assert all(len(k) == 24 for k in kept.values())
    assert sorted(masks) == sorted(
        f"model.layers.{i}.mlp.{n}_proj.weight" for i in range(2) for n in ("gate", "up", "down")
    )
    removed = plan.layers[0].mlp.removed
    assert masks["model.layers.0.mlp.up_proj.weight"][removed].abs().sum() == 0
    assert masks["model.layers.0.mlp.down_proj.weight"][:, removed].abs().sum() == 0
    assert masks["model.layers.0.mlp.down_proj.weight"][:, kept[0]].min() == 1
    sliced = _sliced_llama(tiny_llama_tied32, mlp_kept=kept)
    masked = apply_masks(copy.deepcopy(tiny_llama_tied32), masks)
    ids = calibration(64, samples=3, seq=9, seed=7).input_ids
    torch.testing.assert_close(_logits(masked, ids), _logits(sliced, ids), rtol=1e-5, atol=1e-5)


def test_uniform_gqa_heads_equal_a_smaller_gqa_model(tiny_llama_tied32, llama_calib):
    plan, masks = prune_module(
        tiny_llama_tied32,
        criterion="minitron",
        structures={"heads": 0.5},
        calibration=llama_calib,
        head_grouping="uniform",
    )
    for choice in plan.layers:  # one query head kept per kv group, both kv heads kept
        assert len(choice.heads.kept) == 2
        assert sorted(h // 2 for h in choice.heads.kept) == [0, 1]
        assert choice.kv_heads.removed == []
    heads = {c.index: c.heads.kept for c in plan.layers}
    kv = {c.index: c.kv_heads.kept for c in plan.layers}
    sliced = _sliced_llama(tiny_llama_tied32, heads_kept=heads, kv_kept=kv)
    masked = apply_masks(copy.deepcopy(tiny_llama_tied32), masks)
    ids = calibration(64, samples=3, seq=9, seed=7).input_ids
    torch.testing.assert_close(_logits(masked, ids), _logits(sliced, ids), rtol=1e-5, atol=1e-5)


def test_free_heads_remove_kv_only_with_whole_group():
    # groups {0,1,2} and {3,4,5}
    model = tiny_llama(random_norms=True, **(LLAMA_32_TIED | {"hidden_size": 48, "num_attention_heads": 6}))
    with torch.no_grad():  # make heads 3, 4 and 5 negligible in layer 0 so their group empties
        model.model.layers[0].self_attn.o_proj.weight[:, 24:48] *= 1e-3
    plan, masks = prune_module(model, criterion="magnitude", structures={"heads": 0.5})
    layer0 = plan.layers[0]
    assert layer0.heads.kept == [0, 1, 2] and layer0.kv_heads.removed == [1]
    k = masks["model.layers.0.self_attn.k_proj.weight"]
    assert k[8:16].abs().sum() == 0 and k[:8].min() == 1
    q = masks["model.layers.0.self_attn.q_proj.weight"]
    assert q[24:].abs().sum() == 0 and q[:24].min() == 1
    o = masks["model.layers.0.self_attn.o_proj.weight"]
    assert o[:, 24:].abs().sum() == 0 and o[:, :24].min() == 1
    for choice in plan.layers:  # consistency holds in every layer, whatever was chosen
        kept_groups = {h // 3 for h in choice.heads.kept}
        removed_kv = set(choice.kv_heads.removed) if choice.kv_heads else set()
        assert removed_kv == {0, 1} - kept_groups


def test_hidden_channels_stay_zero_through_the_residual_stream(tiny_llama_tied32, llama_calib):
    plan, masks = prune_module(
        tiny_llama_tied32, criterion="minitron", structures={"hidden": 0.25}, calibration=llama_calib
    )
    removed = plan.hidden.removed
    assert len(removed) == 8 and len(plan.hidden.kept) == 24
    assert "model.embed_tokens.weight" in masks and "model.norm.weight" in masks
    masked = apply_masks(copy.deepcopy(tiny_llama_tied32), masks)
    with torch.no_grad():
        out = masked(input_ids=llama_calib.input_ids, output_hidden_states=True)
    for hidden in out.hidden_states:
        assert hidden[..., removed].abs().max().item() == 0.0
    assert out.hidden_states[-1][..., plan.hidden.kept].abs().max().item() > 0


def test_bert_heads_and_neurons_are_zero_where_removed(tiny_bert32):
    ids = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(3))
    calib = calibration(50, samples=4, seq=10)
    plan, masks = prune_module(
        tiny_bert32,
        criterion="minitron",
        structures={"heads": 0.5, "mlp": 0.25},
        calibration=calib,
        task="encoder",
    )
    assert "encoder.layer.0.attention.self.value.bias" in masks  # MHA: k, v rows and biases go with q
    assert "encoder.layer.0.intermediate.dense.bias" in masks
    masked = apply_masks(copy.deepcopy(tiny_bert32), masks)
    seen = {}
    modules = dict(masked.named_modules())
    hooks = [
        modules["encoder.layer.1.attention.output.dense"].register_forward_pre_hook(
            lambda _m, a: seen.__setitem__("heads", a[0])
        ),
        modules["encoder.layer.1.output.dense"].register_forward_pre_hook(lambda _m, a: seen.__setitem__("mlp", a[0])),
    ]
    with torch.no_grad():
        masked(input_ids=ids)
    for h in hooks:
        h.remove()
    heads = seen["heads"].reshape(4, 10, 4, 8)
    removed = plan.layers[1].heads.removed
    assert len(removed) == 2
    assert heads[:, :, removed].abs().max().item() == 0.0
    assert heads[:, :, plan.layers[1].heads.kept].abs().max().item() > 0
    assert seen["mlp"][..., plan.layers[1].mlp.removed].abs().max().item() == 0.0  # GELU(0) = 0


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_masks_have_exactly_n_of_m_along_the_input(tiny_llama_tied32, llama_calib, n, m):
    plan, masks = prune_module(tiny_llama_tied32, criterion="wanda", structures={}, nm=(n, m), calibration=llama_calib)
    structure = detect_structure(tiny_llama_tied32)
    assert sorted(masks) == sorted(structure.linear_weights())
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m)  # [out, in/m, m]: groups along the input dimension
        assert (groups.sum(dim=-1) == n).all(), name
    assert plan.sparsity["kind"] == f"{n}:{m}" and plan.sparsity["achieved"] == pytest.approx(1 - n / m)


def test_nm_mask_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[1, 1, 0, 0]]  # ties: lower index wins
    with pytest.raises(Exception, match="multiple of M=4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_structured_plus_nm_keeps_at_most_n(tiny_llama_tied32, llama_calib):
    _, masks = prune_module(
        tiny_llama_tied32, criterion="magnitude", structures={"mlp": 0.5}, nm=(2, 4), calibration=llama_calib
    )
    down = masks["model.layers.0.mlp.down_proj.weight"]
    assert (down.reshape(32, -1, 4).sum(dim=-1) <= 2).all()


def test_apply_masks_refuses_bad_masks(tiny_llama_tied32):
    with pytest.raises(MaskError, match="has shape \\(32, 48\\) but the parameter is \\(48, 32\\)"):
        apply_masks(tiny_llama_tied32, {"model.layers.0.mlp.up_proj.weight": torch.ones(32, 48)})
    with pytest.raises(MaskError, match="names no parameter"):
        apply_masks(tiny_llama_tied32, {"model.layers.9.mlp.up_proj.weight": torch.ones(48, 32)})
    with pytest.raises(MaskError, match="other than 0 and 1"):
        apply_masks(tiny_llama_tied32, {"model.layers.0.mlp.up_proj.weight": torch.full((48, 32), 0.5)})


def test_unknown_architecture_is_refused():
    with pytest.raises(UnsupportedModelError, match="no transformers config"):
        detect_structure(torch.nn.Linear(2, 2))


def test_qwen2_biases_follow_their_heads():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).eval()
    plan, masks = prune_module(model, criterion="magnitude", structures={"heads": 0.5}, head_grouping="whole-group")
    choice = plan.layers[0]
    assert len(choice.kv_heads.removed) == 1
    g = choice.kv_heads.removed[0]
    for name in ("k_proj.bias", "v_proj.bias"):
        mask = masks[f"model.layers.0.self_attn.{name}"]
        assert mask[g * 8 : (g + 1) * 8].sum() == 0 and mask.sum() == 8
    q_bias = masks["model.layers.0.self_attn.q_proj.bias"]
    assert q_bias.reshape(4, 8).sum(dim=1).tolist() == [8.0 if h in choice.heads.kept else 0.0 for h in range(4)]
