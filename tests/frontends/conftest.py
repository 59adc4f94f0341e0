"""Session exports of KV-cache decoders: a tiny random GQA Llama (fast) and SmolLM2-135M (slow)."""

from __future__ import annotations

import pytest

#: Tiny GQA Llama: 4 query heads share 2 kv heads of dim 16.
TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@pytest.fixture(scope="session")
def tiny_llama():
    """A random-weight LlamaForCausalLM (seeded) in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture(scope="session")
def tiny_llama_kv(tiny_llama, cache_dir):
    """(ir.Model, path) of the tiny Llama's KV-cache graph, exported once per session (~10 s)."""
    from prune2deploy.frontends.decoder import export_decoder

    path = cache_dir / "tiny-llama-kv.onnx"
    return export_decoder(tiny_llama, path), path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the bundled GGUF (~20 s); skipped when the package is not installed."""
    from prune2deploy.errors import BadInputError
    from prune2deploy.frontends.hf import load_hf_model

    try:
        return load_hf_model("smollm2-135m")
    except BadInputError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_kv(smollm2, cache_dir):
    """Path of SmolLM2's KV-cache graph, exported once per session (~1 min)."""
    from prune2deploy.frontends.decoder import export_decoder

    path = cache_dir / "smollm2-kv.onnx"
    export_decoder(smollm2, path)
    return path
