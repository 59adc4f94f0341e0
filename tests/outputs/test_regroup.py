"""outputs/regroup: the pooling regroup-gqa does, on the sliced torch model; what it refuses, with the reason.
(The compile-level check that genai/ then equals model.onnx is in test_lm_outputs.py.)"""

from __future__ import annotations

import pytest
import torch

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.regroup import regroup_sliced
from prune2deploy.outputs.slice import slice_causal_lm
from tests.fixtures.models import tiny_llama


def test_adjacent_mean_pools_each_groups_kv_heads():
    module = tiny_llama()
    sliced = slice_causal_lm(module)
    heads, kv, d = sliced.layers[0].num_heads, sliced.layers[0].kv_heads, sliced.head_dim
    before = sliced.module.model.layers[0].self_attn.k_proj.weight.detach().clone().reshape(kv, d, -1)
    record = regroup_sliced(sliced, 1)
    assert record["layers"]["model.layers.0"] == [kv, 1] and sliced.layers[0].kv_heads == 1
    after = sliced.module.model.layers[0].self_attn.k_proj.weight.detach()
    per_query = before[[h // (heads // kv) for h in range(heads)]]  # each query head brings its kv head
    torch.testing.assert_close(after, per_query.double().mean(dim=0).float(), rtol=0, atol=1e-7)
    assert sliced.module.config.num_key_value_heads == 1
    with torch.no_grad():  # the regrouped module runs (transformers reads the new per-layer group size)
        sliced.module(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_similarity_grouping_and_evened_out_groups_are_refused():
    sliced = slice_causal_lm(tiny_llama())
    with pytest.raises(UnsupportedModelError, match="similarity grouping"):
        regroup_sliced(sliced, 1, grouping="similarity")
    sliced.padded["model.layers.0.self_attn.kv1"] = "kept 1 zero query head"
    with pytest.raises(UnsupportedModelError, match="gathers kv heads"):
        regroup_sliced(sliced, 1)
