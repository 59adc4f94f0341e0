"""transformers families from tiny configs (2 layers, hidden 64, random weights), exported once per process.

The family matrix: decoders with separate, fused (per-head interleaved, multi-query) and Conv1D
projections, q scaling before the head split, per-head and all-heads q/k norms, partial rotary, ALiBi;
two encoders and a ViT. Exports go through prune2deploy's own frontend (``export_module`` +
``hf_export_spec``) and are cached as bytes, so a test may edit its fresh copy freely.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["FAMILIES", "fresh", "module", "run"]

_VERSION = 2
_COMMON = {"vocab_size": 128, "num_hidden_layers": 2}


def _decoder(name: str):
    import transformers as t

    heads = {"num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 96}
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**_COMMON, **heads, num_key_value_heads=2))
    if name == "qwen2":  # q/k/v biases
        return t.Qwen2ForCausalLM(t.Qwen2Config(**_COMMON, **heads, num_key_value_heads=2))
    if name == "phi":  # partial rotary, q/k/v biases, dense + fc1/fc2, parallel block
        return t.PhiForCausalLM(t.PhiConfig(**_COMMON, **heads, partial_rotary_factor=0.5))
    if name == "qwen3":  # per-head q/k RMSNorm over head_dim
        return t.Qwen3ForCausalLM(t.Qwen3Config(**_COMMON, **heads, num_key_value_heads=2, head_dim=16))
    if name == "olmo2":  # q/k RMSNorm over all heads' channels
        return t.Olmo2ForCausalLM(t.Olmo2Config(**_COMMON, **heads, num_key_value_heads=2))
    if name == "gptneox":  # fused QKV, per-head interleaved [heads, 3, head_dim], partial rotary
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**_COMMON, **heads, rotary_pct=0.5, max_position_embeddings=64))
    if name == "falcon":  # fused multi-query QKV, parallel attention
        config = t.FalconConfig(
            vocab_size=128,
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            multi_query=True,
            new_decoder_architecture=False,
            parallel_attn=True,
            bias=True,
        )
        return t.FalconForCausalLM(config)
    if name == "bloom":  # ALiBi, fused QKV interleaved per head
        return t.BloomForCausalLM(t.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4))
    if name == "opt":  # q scaled by head_dim**-0.5 between the projection and the head split; LayerNorm
        config = t.OPTConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=96,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        )
        return t.OPTForCausalLM(config)
    if name == "mpt":  # ALiBi as a per-head [heads, 1, positions] bias, fused QKV chunked [3, heads, head_dim]
        config = t.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64, expansion_ratio=2)
        return t.MptForCausalLM(config)
    if name == "gpt2":  # Conv1D, learned positions (64 rows)
        config = t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return t.GPT2LMHeadModel(config)
    raise KeyError(name)


def _encoder(name: str):
    import transformers as t

    sizes = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 80, "num_hidden_layers": 2}
    if name == "bert":
        return t.BertModel(t.BertConfig(vocab_size=100, max_position_embeddings=64, **sizes))
    if name == "roberta":
        return t.RobertaModel(t.RobertaConfig(vocab_size=100, max_position_embeddings=66, **sizes))
    if name == "distilbert":
        config = t.DistilBertConfig(
            vocab_size=100, dim=64, n_heads=4, hidden_dim=80, n_layers=2, max_position_embeddings=64
        )
        return t.DistilBertModel(config)
    if name == "vit":
        return t.ViTModel(t.ViTConfig(image_size=16, patch_size=4, num_channels=3, **sizes))
    raise KeyError(name)


DECODERS = ("llama", "qwen2", "phi", "qwen3", "olmo2", "gptneox", "falcon", "bloom", "gpt2", "opt", "mpt")
ENCODERS = ("bert", "roberta", "distilbert", "vit")
FAMILIES = DECODERS + ENCODERS


@functools.cache
def module(name: str):
    """The family's torch module (seeded; non-zero biases so the exporter keeps them)."""
    import torch

    torch.manual_seed(0)
    built = _decoder(name) if name in DECODERS else _encoder(name)
    built.eval()
    with torch.no_grad():
        for pname, param in built.named_parameters():
            if pname.endswith("bias"):
                param.normal_(0, 0.1)
    built.config.use_cache = False
    return built


def _cache_path(name: str) -> Path | None:
    """Exports also persist across sessions in ``P2D_TEST_CACHE`` (keyed by ``_VERSION`` and the libraries:
    bump ``_VERSION`` when a builder changes)."""
    folder = os.environ.get("P2D_TEST_CACHE")
    if not folder:
        return None
    import torch
    import transformers

    key = hashlib.sha256(f"{_VERSION}{torch.__version__}{transformers.__version__}".encode())
    return Path(folder) / f"family-{name}-{key.hexdigest()[:16]}.onnx"


@functools.cache
def _exported(name: str) -> bytes:
    cached = _cache_path(name)
    if cached is not None and cached.is_file():
        return cached.read_bytes()
    data = _export(name)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(data)
    return data


def _export(name: str) -> bytes:
    import torch

    from prune2deploy.frontends.torch import ExportSpec, export_module, hf_export_spec

    built = module(name)
    if name == "vit":
        spec = ExportSpec(
            inputs={"pixel_values": torch.randn(2, 3, 16, 16)},
            dynamic_axes={"pixel_values": {0: "batch"}},
            output_names=["last_hidden_state", "pooler_output"],
        )
    elif name in DECODERS:
        spec = hf_export_spec("causal-lm", vocab_size=128)
    else:
        spec = hf_export_spec("encoder", vocab_size=100)
        if name == "distilbert":
            spec.output_names = ["last_hidden_state"]
    return ir.to_proto(export_module(built, spec)).SerializeToString()


def fresh(name: str) -> ir.Model:
    """A new copy of the family's export."""
    return ir.from_proto(onnx.ModelProto.FromString(_exported(name)))


def run(model: ir.Model | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from prune2deploy.ort_session import make_session

    data = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    session = make_session(data)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
