"""Tiny random-weight transformers for pruning tests (seeded; built in milliseconds)."""

from __future__ import annotations

import pytest
import torch

from prune2deploy.pruning.calibration import CalibrationData, tokens_sha256


def make_llama(
    seed: int = 0,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 32,
    intermediate: int = 48,
    vocab: int = 64,
    head_dim: int = 8,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm scales start at 1; random scales make channel scores differ
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def make_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def calibration(vocab: int, samples: int = 6, seq: int = 12, seed: int = 0) -> CalibrationData:
    ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))
    return CalibrationData(ids, "test", tokens_sha256(ids))


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def tiny_bert():
    return make_bert()


@pytest.fixture
def llama_calib():
    return calibration(64)
