"""slice_causal_lm: the sliced copy computes what the masked model does and shares what it did not cut."""

from __future__ import annotations

import copy

import torch

from prune2deploy.outputs.slice import slice_causal_lm


def _masked_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layer 0: half the MLP neurons zero; layer 1 keeps everything
        layer = module.model.layers[0].mlp
        layer.gate_proj.weight[::2] = 0
        layer.up_proj.weight[::2] = 0
        layer.down_proj.weight[:, ::2] = 0
    return module


def test_sliced_copy_is_exact_and_shares_untouched_tensors(monkeypatch):
    from prune2deploy.outputs import slice as slicing

    monkeypatch.setattr(slicing, "_SHARE_MIN_BYTES", 1024)  # this model's projections are 2–6 KB
    module = _masked_llama()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    result = slice_causal_lm(module)
    sliced = result.module

    assert [w.intermediate for w in result.layers] == [24, 48]
    assert sliced.model.layers[0].mlp.down_proj.in_features == 24
    # What was not cut is the masked model's own storage, not a copy (a copy would hold a 1B model twice).
    assert sliced.model.embed_tokens.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
    assert sliced.lm_head.weight.data_ptr() == module.lm_head.weight.data_ptr()
    assert sliced.model.layers[1].mlp.up_proj.weight.data_ptr() == module.model.layers[1].mlp.up_proj.weight.data_ptr()
    # Smaller tensors are copied: shared, they would keep a memory-mapped checkpoint shard resident.
    norm, masked_norm = sliced.model.layers[1].input_layernorm.weight, module.model.layers[1].input_layernorm.weight
    assert norm.data_ptr() != masked_norm.data_ptr() and torch.equal(norm, masked_norm)
    # The masked model itself is left as it was: same widths, same values.
    assert module.model.layers[0].mlp.down_proj.in_features == 48
    assert module.config.intermediate_size == 48
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(input_ids=ids, use_cache=False).logits
        got = sliced(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_consumed_slicing_empties_the_masked_layers_and_computes_the_same():
    module = _masked_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(input_ids=ids, use_cache=False).logits
    kept = slice_causal_lm(module).module  # not consumed: the masked module still computes
    sliced = slice_causal_lm(module, consume=True).module
    assert all(p.numel() == 0 for layer in module.model.layers for p in layer.parameters())  # let go, layer by layer
    assert module.model.embed_tokens.weight.numel() > 0  # outside the layers nothing is emptied
    with torch.no_grad():
        got = sliced(input_ids=ids, use_cache=False).logits
        also = kept(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and torch.equal(got, also)


def test_consuming_slice_copies_every_layer_tensor_and_lets_the_masked_ones_go(monkeypatch):
    """A consumed module's layer tensors are copied whatever their size (else they stay alive, with the pages
    of their checkpoint shard, until slicing ends: 13 GB at 8B) and dropped layer by layer; the embedding and
    lm_head are still shared."""
    import weakref

    from prune2deploy.outputs import slice as slicing

    monkeypatch.setattr(slicing, "_SHARE_MIN_BYTES", 1024)  # every projection counts as large
    module = _masked_llama()
    want = slice_causal_lm(copy.deepcopy(module)).module
    untouched = module.model.layers[1].mlp.up_proj.weight
    gone = weakref.ref(untouched)
    first_layer = module.model.layers[0].mlp.gate_proj.weight
    alive_at_second_layer = []
    empty = slicing._empty

    def emptying(layer):
        empty(layer)
        alive_at_second_layer.append(gone() is not None)

    monkeypatch.setattr(slicing, "_empty", emptying)
    del untouched
    result = slice_causal_lm(module, consume=True)
    sliced = result.module
    assert sliced.model.embed_tokens.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
    assert first_layer.numel() > 0 and module.model.layers[0].mlp.gate_proj.weight.numel() == 0  # emptied
    assert alive_at_second_layer == [True, False]  # layer 1's masked tensor freed as soon as layer 1 is copied
    for (name, got), expected in zip(sliced.named_parameters(), want.parameters(), strict=True):
        assert torch.equal(got, expected), name
