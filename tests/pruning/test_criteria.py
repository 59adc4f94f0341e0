"""Importance criteria against hand-computed scores and against direct autograd / finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from prune2deploy.errors import ConfigError
from prune2deploy.pruning.criteria import (
    _SeqBatchAggregate,
    block_importance,
    check_criterion,
    collect_statistics,
    magnitude_scores,
    taylor_scores,
    wanda_scores,
)
from prune2deploy.pruning.sparsity import unstructured_mask
from prune2deploy.pruning.structures import detect_structure, unit_scores
from tests.fixtures.models import LLAMA_32_TIED, tiny_llama

from .conftest import calibration


def test_element_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert magnitude_scores(w).tolist() == [[1.0, 2.0], [3.0, 0.5]]
    assert wanda_scores(w, torch.tensor([2.0, 0.5])).tolist() == [[2.0, 1.0], [6.0, 0.25]]
    assert taylor_scores(w, torch.tensor([[0.5, 0.25], [-1.0, 4.0]])).tolist() == [[0.5, 0.5], [3.0, 2.0]]
    with pytest.raises(ValueError):
        wanda_scores(w, torch.ones(3))


def test_wanda_row_groups_differ_from_magnitude():
    # Same weights; feature 0 has a large input norm and feature 3 a tiny one.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([4.0, 1.0, 1.0, 0.25])
    wanda = unstructured_mask(wanda_scores(w, norms), 0.5, group="row")  # [[4,2,3,1],[16,3,2,.25]]
    magnitude = unstructured_mask(magnitude_scores(w), 0.5, group="layer")
    assert wanda.tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert magnitude.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    # Per row, every row keeps exactly half even when one row holds all the large scores.
    skewed = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(skewed, 0.5, group="row").sum(dim=1).tolist() == [2, 2]
    assert unstructured_mask(skewed, 0.5, group="layer").tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_seq_batch_aggregation_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[..., None]  # [B=2, S=3, K=1]
    agg = _SeqBatchAggregate("mean", "l2")  # the Minitron default: mean over seq, L2 over batch
    agg.add(values[:1])
    agg.add(values[1:])  # two calibration batches accumulate like one
    assert agg.result().item() == pytest.approx(math.sqrt(2.0**2 + 5.0**2))
    agg = _SeqBatchAggregate("l2", "mean")
    agg.add(values)
    assert agg.result().item() == pytest.approx((math.sqrt(14.0) + math.sqrt(77.0)) / 2)


def test_block_importance_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert block_importance(x, y).tolist() == pytest.approx([1.0, 0.0])


def test_identity_block_has_zero_importance_and_is_dropped_first(llama_calib):
    model = tiny_llama(random_norms=True, num_hidden_layers=3, **LLAMA_32_TIED)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    structure = detect_structure(model)
    stats = collect_statistics(model, structure, llama_calib.batches(3), criterion="magnitude", structures=["layers"])
    assert stats.layers[1].item() == pytest.approx(0.0, abs=1e-12)
    assert stats.layers[0].item() > 1e-3 and stats.layers[2].item() > 1e-3


def _capture_inputs(model, name):
    seen = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().double())
    )
    return seen, handle


def test_wanda_input_norms_and_minitron_match_direct_computation(tiny_llama_tied32, llama_calib):
    structure = detect_structure(tiny_llama_tied32)
    down = "model.layers.1.mlp.down_proj"
    o_proj = "model.layers.0.self_attn.o_proj"
    seen_down, h1 = _capture_inputs(tiny_llama_tied32, down)
    seen_o, h2 = _capture_inputs(tiny_llama_tied32, o_proj)
    stats = collect_statistics(
        tiny_llama_tied32, structure, llama_calib.batches(4), criterion="wanda", structures=["mlp"]
    )
    h1.remove()
    h2.remove()
    x = torch.cat(seen_down)  # [N, S, I] activation after the gate product
    assert torch.allclose(stats.input_norms[down].double(), x.pow(2).sum(dim=(0, 1)).sqrt(), rtol=1e-5)

    stats = collect_statistics(
        tiny_llama_tied32, structure, llama_calib.batches(4), criterion="minitron", structures=["mlp", "heads"]
    )
    # Neurons: mean over the sequence of |activation|, then L2 over the calibration examples.
    expected = x.abs().mean(dim=1).pow(2).sum(dim=0).sqrt()
    assert torch.allclose(stats.mlp[1], expected, rtol=1e-6)
    heads = torch.cat(seen_o[-2:]).reshape(6, 12, 4, 8).norm(dim=-1)  # per-token L2 of each head's output
    assert torch.allclose(stats.heads[0], heads.mean(dim=1).pow(2).sum(dim=0).sqrt(), rtol=1e-6)


def test_taylor_gradients_accumulate_over_batches(tiny_llama_tied32, llama_calib):
    structure = detect_structure(tiny_llama_tied32)
    batches = llama_calib.batches(3)
    stats = collect_statistics(tiny_llama_tied32, structure, batches, criterion="taylor", structures=["mlp"])
    name = "model.layers.0.mlp.up_proj.weight"
    param = dict(tiny_llama_tied32.named_parameters())[name]
    total = sum(tiny_llama_tied32(input_ids=b, labels=b).loss for b in batches)
    (grad,) = torch.autograd.grad(total, param)
    assert torch.allclose(stats.grads[name], grad, atol=1e-6)
    assert all(p.grad is None for p in tiny_llama_tied32.parameters())  # the model is left as it was
    # The MLP neuron score is the sum of |W·G| over gate row, up row and down column.
    neuron = unit_scores(
        structure.mlp_family(structure.layers[0]),
        lambda p: taylor_scores(structure.params[p], stats.grads[p]),
    )
    g, u, d = (f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down"))
    by_hand = sum(
        (structure.params[p][idx] * stats.grads[p][idx]).abs().sum()
        for p, idx in ((g, (5, slice(None))), (u, (5, slice(None))), (d, (slice(None), 5)))
    )
    assert neuron[5].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_michel_head_gradient_matches_finite_differences():
    model = tiny_llama(3, random_norms=True, **LLAMA_32_TIED).double()
    structure = detect_structure(model)
    calib = calibration(64, samples=2, seq=10, seed=1)
    stats = collect_statistics(model, structure, calib.batches(2), criterion="michel", structures=["heads"])
    o_proj = model.model.layers[1].self_attn.o_proj
    eps = 1e-3  # central differences: O(eps²) error, well above rounding noise

    def loss_with_gate(ids, head, scale):
        def hook(_m, args):
            x = args[0].clone()
            x[..., head * 8 : (head + 1) * 8] *= scale
            return (x,)

        handle = o_proj.register_forward_pre_hook(hook)
        with torch.no_grad():  # HF's own loss upcasts to float32; compute it in float64 here
            logits = model(input_ids=ids).logits[:, :-1].reshape(-1, 64)
            loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)).item()
        handle.remove()
        return loss

    fd = torch.zeros(4, dtype=torch.float64)
    for ids in calib.input_ids.split(1):  # |∂L/∂ξ_h| is taken per example, then summed
        for head in range(4):
            fd[head] += abs(loss_with_gate(ids, head, 1 + eps) - loss_with_gate(ids, head, 1 - eps)) / (2 * eps)
    assert torch.allclose(stats.heads[1], fd / fd.norm(), atol=1e-4)
    assert stats.heads[1].norm().item() == pytest.approx(1.0)


def test_criterion_checks_name_the_problem():
    with pytest.raises(ConfigError, match="unknown 'obd'"):
        check_criterion("obd", ["mlp"], task="causal-lm")
    with pytest.raises(ConfigError, match="cannot rank"):
        check_criterion("minitron", ["nm"], task="causal-lm")
    with pytest.raises(ConfigError, match="causal language models"):
        check_criterion("taylor", ["mlp"], task="encoder")
