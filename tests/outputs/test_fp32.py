"""computing_in_fp32: a bf16 module's forward computes what its fp32 copy does, and is left as it was."""

from __future__ import annotations

import copy

import torch

from prune2deploy.outputs.fp32 import computing_in_fp32, is_half_precision
from tests.fixtures.models import tiny_llama


def test_bf16_module_computes_like_its_fp32_copy_and_keeps_its_tensors():
    module = tiny_llama().to(torch.bfloat16)
    before = {name: p.data_ptr() for name, p in module.named_parameters()}
    upcast = copy.deepcopy(module).float()
    ids = torch.randint(0, module.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = upcast(input_ids=ids, use_cache=False).logits
        with computing_in_fp32(module):
            got = module(input_ids=ids, use_cache=False).logits
        plain = module(input_ids=ids, use_cache=False).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert plain.dtype == torch.bfloat16  # outside the block the module is bf16 again
    assert is_half_precision(module)
    assert all(p.data_ptr() == before[name] for name, p in module.named_parameters())  # the same storage, no copy
    assert module.lm_head.weight is module.model.embed_tokens.weight or not module.config.tie_word_embeddings


def test_fp32_module_is_left_alone():
    module = tiny_llama()
    assert not is_half_precision(module)
    with computing_in_fp32(module) as same:
        assert same is module and not module._forward_pre_hooks
