"""hf/ for per-layer widths: every layer padded to one shape with zero neurons, zero heads and repeated kv heads
(exact), written tensor by tensor in the checkpoint's dtype, and what the padding costs."""

from __future__ import annotations

import json

import pytest
import torch

from prune2deploy.outputs.hf import PaddedShape, padded_shape, write_hf_checkpoint
from prune2deploy.outputs.slice import LayerWidths, slice_causal_lm

D = 16


def _widths(*layers):
    return [LayerWidths(i, h, kv, f) for i, (h, kv, f) in enumerate(layers)]


@pytest.mark.parametrize(
    ("layers", "shape"),
    [
        # 2 groups of 2 and 1 group of 3: the group of 3 is split over two copies of its kv head (4 q / 2 kv)
        (((4, 2, 48), (3, 1, 64)), PaddedShape(2, 2, 64)),
        # MHA layers with different head counts: zero heads fill the narrower one
        (((6, 6, 32), (2, 2, 96)), PaddedShape(6, 1, 96)),
        # one layer kept a single (zero) head: it fits any shape
        (((9, 3, 64), (1, 1, 32), (6, 3, 64)), PaddedShape(3, 3, 64)),
    ],
)
def test_padded_shape_is_the_smallest_that_every_layer_fits(layers, shape):
    assert padded_shape(_widths(*layers)) == shape


def _masked_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    module = LlamaForCausalLM(config).eval()
    module.config.use_cache = False  # what the exporter leaves on the module
    plan = {0: (80, [0, 1]), 1: (24, [3, 4, 5]), 2: (96, [0])}  # neurons kept, query heads removed
    with torch.no_grad():
        for i, (keep, heads) in plan.items():
            layer = module.model.layers[i]
            layer.mlp.down_proj.weight[:, keep:] = 0
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * D : (h + 1) * D] = 0
    return module.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_checkpoint_loads_in_transformers_and_computes_the_masked_model(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    module = _masked_llama(dtype)
    sliced = slice_causal_lm(module)
    assert not sliced.uniform
    section = write_hf_checkpoint(sliced, None, tmp_path / "hf", reference=module)
    padding = section["padding"]
    # layers 0 and 2 keep 6 q / 2 kv (a zero head evens their groups), layer 1 3 q / 1 kv: groups of 3, 2 kv
    assert padding["shape"] == {"num_heads": 6, "kv_heads": 2, "intermediate": 96}
    assert padding["params_added"] > 0 and 0 < padding["params_share"] < padding["flops_share"] < 1
    assert section["check"]["max_rel_diff"] < 1e-5 and section["check"]["greedy_tokens_equal"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["use_cache"] is True and config["intermediate_size"] == 96 and config["head_dim"] == D
    assert config["architectures"] == ["LlamaForCausalLM"]  # runtimes choose the model class from it
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=dtype).eval()
    assert loaded.dtype == dtype and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[3, 17, 99, 4, 56, 7]])
    kwargs = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(loaded.generate(input_ids=ids, **kwargs), module.generate(input_ids=ids, **kwargs))
    # the module the compile goes on with is unchanged (genai/ is built from it after hf/)
    assert sliced.module.config.use_cache is False and sliced.module.model.layers[1].mlp.down_proj.in_features == 24
