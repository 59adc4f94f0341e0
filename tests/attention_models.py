"""Exported attention models shared by the head tests (each exported once per test process).

Exports are cached as serialized bytes and handed out as fresh ``ir.Model`` copies, so a test may edit
its copy freely. Heads are zeroed in the ONNX graph itself (output-projection rows or value columns found
by the attention analysis), which keeps the tests at one export per model.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir

from prune2deploy.analysis.attention import analyze_attention

#: name -> (heads, kv heads) of the tiny configs.
TINY_HEADS = {"llama-gqa": (4, 2), "llama-mha": (4, 4), "bert": (4, 4)}


def _tiny_llama(kv_heads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_gpt2():
    """GPT-2: fused c_attn (Conv1D → flatten, Gemm, unflatten, Split), c_proj Gemm, non-zero biases."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    module = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # zero biases would be folded away by the exporter
        for name, param in module.named_parameters():
            if name.endswith("attn.c_attn.bias") or name.endswith("attn.c_proj.bias"):
                param.normal_(0, 0.1)
    return module


@functools.cache
def _exported(name: str) -> bytes:
    from prune2deploy.frontends.torch import export_module, hf_export_spec

    if name == "llama-gqa-kv":
        from prune2deploy.frontends.decoder import export_decoder

        return ir.to_proto(export_decoder(_tiny_llama(2))).SerializeToString()
    if name == "smollm2":
        from prune2deploy.frontends.hf import load_hf_model

        loaded = load_hf_model("smollm2-135m")
        module = loaded.module
        module.config.use_cache = False
        spec = hf_export_spec("causal-lm", vocab_size=module.config.vocab_size)
        return ir.to_proto(export_module(module, spec)).SerializeToString()
    if name == "bert":
        from tests.models import tiny_bert

        module = tiny_bert()
        task, vocab = "encoder", 100
    elif name == "gpt2":
        module, task, vocab = _tiny_gpt2(), "causal-lm", 128
    else:
        module = _tiny_llama(TINY_HEADS[name][1])
        task, vocab = "causal-lm", 128
    module.config.use_cache = False
    return ir.to_proto(export_module(module, hf_export_spec(task, vocab_size=vocab))).SerializeToString()


def fresh(name: str) -> ir.Model:
    """A new copy of an exported model: ``llama-gqa``, ``llama-mha``, ``bert``, ``gpt2``, ``llama-gqa-kv``,
    ``smollm2``."""
    return ir.from_proto(onnx.ModelProto.FromString(_exported(name)))


def copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(onnx.ModelProto.FromString(ir.to_proto(model).SerializeToString()))


def _replace(model: ir.Model, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    name = f"{old.name}_zeroed"
    while name in model.graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=old.type)
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    model.graph.register_initializer(value)
    node.replace_input_with(index, value)


def zero_heads(model: ir.Model, heads: dict[str, list[int]], where: str = "o") -> None:
    """Zeroes query heads' output-projection rows (``where="o"``), or a projection's head columns and bias
    (``where="q"``/``"k"``/``"v"``; for k and v, ``heads`` names kv heads), on fresh initializers."""
    blocks = {b.name: b for b in analyze_attention(model).blocks}
    for name, indices in heads.items():
        block = blocks[name]
        d = block.head_dim
        projection = block.projections[where]
        weight = projection.weight_array().copy()
        for h in indices:
            if where == "o":
                weight[h * d : (h + 1) * d] = 0
            else:
                weight[:, projection.offset + h * d : projection.offset + (h + 1) * d] = 0
        _replace(model, projection.matmul, 1, weight)
        if where != "o" and projection.bias is not None:
            bias = projection.bias_array().copy()
            for h in indices:
                bias[projection.offset + h * d : projection.offset + (h + 1) * d] = 0
            _replace(model, projection.bias_add, list(projection.bias_add.inputs).index(projection.bias), bias)


def blocks_by_name(model: ir.Model) -> dict:
    return {b.name: b for b in analyze_attention(model).blocks}


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from prune2deploy.engines.onnxruntime import make_session

    session = make_session(ir.to_proto(model).SerializeToString())
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def decoder_feeds(ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    """Feeds of one KV-cache step: ``ids`` after ``past_len`` cached tokens."""
    batch, seq = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    feeds.update(past)
    return feeds


def fused_qkv_module(heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int = 32):
    """One attention block with a fused, biased QKV projection split into q/k/v (Phi-3 / GPT-NeoX style)."""
    import torch
    from torch import nn

    from prune2deploy.frontends.torch import ExportSpec

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim)
            self.o_proj = nn.Linear(heads * head_dim, hidden)

        def forward(self, x):
            b, s, _ = x.shape
            sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
            q, k, v = self.qkv_proj(x).split(sizes, dim=-1)
            q = q.view(b, s, -1, head_dim).transpose(1, 2)
            k = k.view(b, s, -1, head_dim).transpose(1, 2)
            v = v.view(b, s, -1, head_dim).transpose(1, 2)
            rep = heads // kv_heads
            k = k[:, :, None].expand(b, kv_heads, rep, s, head_dim).reshape(b, heads, s, head_dim)
            v = v[:, :, None].expand(b, kv_heads, rep, s, head_dim).reshape(b, heads, s, head_dim)
            out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.attn = Attention()

        def forward(self, x):
            return x + self.attn(x)

    module = Model().eval()
    spec = ExportSpec(
        inputs={"x": torch.randn(2, 5, hidden)},
        dynamic_axes={"x": {0: "batch", 1: "sequence"}},
        output_names=["y"],
    )
    return module, spec


@functools.cache
def _fused() -> bytes:
    from prune2deploy.frontends.torch import export_module

    module, spec = fused_qkv_module()
    return ir.to_proto(export_module(module, spec)).SerializeToString()


def fresh_fused() -> ir.Model:
    """The fused-QKV block exported (4 query heads, 2 kv heads, head_dim 8, biases)."""
    return ir.from_proto(onnx.ModelProto.FromString(_fused()))
