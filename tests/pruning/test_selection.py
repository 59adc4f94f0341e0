"""Ratios, rounding, global ranking and GQA head choices against hand-worked examples."""

from __future__ import annotations

import pytest
import torch

from prune2deploy.errors import ConfigError
from prune2deploy.pruning.prune import prune_module
from prune2deploy.pruning.selection import global_keep_counts, kept_count, round_width, select_heads, standardized
from tests.fixtures.models import LLAMA_32_TIED, tiny_llama


def test_kept_counts_and_rounding():
    assert kept_count(1536, 0.5, 64) == 768
    assert kept_count(100, 0.3) == 70
    assert kept_count(100, 0.3, 8) == 72  # 70 / 8 = 8.75 -> 9 multiples
    assert kept_count(100, 0.97, 16) == 16  # never below one multiple
    assert round_width(5, 4, 8) == 4  # a multiple larger than the width cannot apply
    assert kept_count(9, 0.99) == 1


def test_global_ranking_by_hand():
    scores = {0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([10.0, 20.0, 30.0, 40.0])}
    assert global_keep_counts(scores, 0.25, scale="raw") == {0: 2, 1: 4}
    assert global_keep_counts(scores, 0.5, scale="raw") == {0: 1, 1: 4}  # layer 0 would empty; it keeps one
    # standardized, the two layers are the same distribution ten times larger: they shrink alike
    assert global_keep_counts(scores, 0.5) == {0: 2, 1: 2}


def test_standardized_scores_by_hand():
    z = standardized(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # mean 2.5, population std sqrt(1.25)
    assert torch.allclose(z, torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64) / 1.25**0.5)
    assert standardized(torch.full((3,), 7.0)).tolist() == [0.0, 0.0, 0.0]  # no spread: no order, no bias


def test_standardized_ranking_follows_the_shape_not_the_scale():
    # layer 1: three equal low units and one outlier (z = -0.577 x3, 1.732); layer 0 spread evenly
    # (z = -1.342, -0.447, 0.447, 1.342): removing 4 of 8 takes layer 0's lowest and layer 1's three
    scores = {0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([100.0, 100.0, 100.0, 1000.0])}
    assert global_keep_counts(scores, 0.5) == {0: 3, 1: 1}
    assert global_keep_counts(scores, 0.5, scale="raw") == {0: 1, 1: 4}  # raw: layer 0 empties
    # a floor of half of every layer protects each layer's best two units: the four others go
    assert global_keep_counts(scores, 0.5, min_keep=0.5) == {0: 2, 1: 2}
    assert global_keep_counts(scores, 0.5, scale="raw", min_keep=0.25) == {0: 1, 1: 3}  # 1 protected in each


def test_global_ranking_leaves_the_scores_alone_and_refuses_bad_options():
    scores = {0: torch.tensor([1.0, 2.0], dtype=torch.float64), 1: torch.tensor([3.0, 4.0], dtype=torch.float64)}
    global_keep_counts(scores, 0.5, scale="raw", min_keep=0.5)
    assert scores[0].tolist() == [1.0, 2.0] and scores[1].tolist() == [3.0, 4.0]
    with pytest.raises(ConfigError, match="global_scale"):
        global_keep_counts(scores, 0.5, scale="zscore")
    with pytest.raises(ConfigError, match="min_keep"):
        global_keep_counts(scores, 0.5, min_keep=1.5)


def test_gqa_head_choices_by_hand():
    scores = torch.tensor([9.0, 8.0, 7.0, 1.0, 2.0, 3.0, 6.0, 5.0, 4.0])  # 9 heads, 3 kv groups of 3
    assert select_heads(scores, 3, 3, "free") == ([0, 1, 2], [1, 2])
    assert select_heads(scores, 6, 3, "free") == ([0, 1, 2, 6, 7, 8], [1])
    assert select_heads(scores, 3, 3, "uniform") == ([0, 5, 6], [])  # best head of every group
    assert select_heads(scores, 6, 3, "uniform") == ([0, 1, 4, 5, 6, 7], [])
    assert select_heads(scores, 3, 3, "whole-group") == ([0, 1, 2], [1, 2])  # group sums 24, 6, 15
    assert select_heads(scores, 5, 3, "whole-group") == ([0, 1, 2, 6, 7, 8], [1])
    assert select_heads(scores, 4, 9, "uniform") == ([0, 1, 2, 6], [3, 4, 5, 7, 8])  # MHA: free choice


def test_per_layer_and_global_mlp_widths():
    model = tiny_llama(random_norms=True, **(LLAMA_32_TIED | {"intermediate_size": 64}))
    with torch.no_grad():  # layer 1's MLP is ten times smaller: global ranking shrinks it first
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[1].mlp, name).weight.mul_(0.1)
    plan, _ = prune_module(model, criterion="magnitude", structures={"mlp": 0.5}, round_to=8)
    assert [len(c.mlp.kept) for c in plan.layers] == [32, 32]
    plan, _ = prune_module(
        model, criterion="magnitude", structures={"mlp": 0.5}, per_layer=False, round_to=8, global_scale="raw"
    )
    widths = [len(c.mlp.kept) for c in plan.layers]
    assert widths[0] == 64 and widths[1] == 8 and all(w % 8 == 0 for w in widths)
    assert plan.options["global_scale"] == "raw" and plan.options["min_keep"] == 0.0
    # standardized, layer 1's smaller scale no longer decides: both layers keep about half
    plan, _ = prune_module(model, criterion="magnitude", structures={"mlp": 0.5}, per_layer=False, round_to=8)
    widths = [len(c.mlp.kept) for c in plan.layers]
    assert all(24 <= w <= 40 and w % 8 == 0 for w in widths) and plan.options["global_scale"] == "standardize"
    plan, _ = prune_module(
        model, criterion="magnitude", structures={"mlp": 0.5}, per_layer=False, global_scale="raw", min_keep=0.375
    )
    assert [len(c.mlp.kept) for c in plan.layers] == [40, 24]  # layer 1 keeps its floor of 24


def test_min_keep_is_checked_against_the_ratio():
    model = tiny_llama(**LLAMA_32_TIED)
    with pytest.raises(ConfigError, match=r"min_keep 0\.6"):
        prune_module(model, criterion="magnitude", structures={"mlp": 0.5}, per_layer=False, min_keep=0.6)
    with pytest.raises(ConfigError, match="global_scale"):
        prune_module(model, criterion="magnitude", structures={"mlp": 0.5}, per_layer=False, global_scale="max")
    with pytest.raises(ConfigError, match="global ranking only"):  # per layer they would do nothing
        prune_module(model, criterion="magnitude", structures={"mlp": 0.5}, min_keep=0.25)


def test_depth_drops_the_lowest_block_importance():
    model = tiny_llama(random_norms=True, num_hidden_layers=4, **LLAMA_32_TIED)
    with torch.no_grad():
        for index in (1, 2):  # blocks 1 and 2 barely change the residual stream
            model.model.layers[index].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[index].mlp.down_proj.weight.mul_(1e-3)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    from prune2deploy.pruning.calibration import CalibrationData, tokens_sha256

    plan, masks = prune_module(
        model,
        criterion="magnitude",
        structures={"layers": 0.5},
        calibration=CalibrationData(ids, "t", tokens_sha256(ids)),
    )
    assert plan.dropped_layers == [1, 2]
    assert masks == {}  # depth is plan-only
    bi = plan.options["block_importance"]
    assert max(bi[1], bi[2]) < min(bi[0], bi[3])
