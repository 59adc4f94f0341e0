"""``OUT/genai/``: an onnxruntime-genai package (genai_config.json, KV-cache decoder, tokenizer).

The decoder is built from the physically sliced model (:mod:`prune2deploy.outputs.slice`) in the layout
onnxruntime-genai's own model builder emits for Llama-style models: ``SimplifiedLayerNormalization`` /
``SkipSimplifiedLayerNormalization``, one packed QKV MatMul and ``com.microsoft.GroupQueryAttention`` with
fused rotary per layer, SwiGLU, tied or untied LM head, and genai's I/O names (``input_ids``,
``attention_mask``, ``past_key_values.{i}.key/value`` → ``logits``, ``present.{i}.key/value``).

Why not fuse the exported graph instead: onnxscript's ORT fusions fuse the torch-exported KV-cache decoder's
norms and rotary, and its attention only into ``MultiHeadAttention`` fed by the *expanded* K/V (the
Unsqueeze → Expand → Reshape repeat of ``repeat_kv`` stays: their GQA rule does not match that export), so
the cache read per step would still be the query-head count's. GroupQueryAttention reads the un-expanded
cache; building it directly also lets every layer carry its own ``num_heads`` / ``kv_num_heads``
(non-uniform pruning), which no fusion rule or the builder (one config for all layers) can express.

Exactness is checked, not assumed: :func:`check_decoder` runs prefill + decode steps of this graph on ONNX
Runtime against the masked torch model, and the driver compares genai's greedy tokens with transformers'.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.limits import genai_context
from prune2deploy.outputs.fp32 import computing_in_fp32
from prune2deploy.outputs.quantize import BOUNDS, GenaiPrecision, OneWeightAtATime, WeightQuant, approximate_error
from prune2deploy.outputs.registry import OutputCheck, OutputContext, OutputSection, OutputSpec, register_output
from prune2deploy.outputs.slice import SliceResult

__all__ = [
    "DecoderReference",
    "GenaiPrecision",
    "build_genai_decoder",
    "check_against_compiled",
    "check_decoder",
    "check_genai_folder",
    "check_memory_shortfall",
    "decoder_bytes",
    "reference_outputs",
    "write_genai_folder",
]

log = logging.getLogger(__name__)

#: ORT's CPU GroupQueryAttention kernel needs head_size % 8 == 0.
_GQA_HEAD_MULTIPLE = 8

#: The decoder is checked against the masked *torch* model (another runtime, fused kernels), not against an
#: ONNX graph, so rounding accumulates over every layer: SmolLM2-135M (30 layers) measures 1.25e-4 of the
#: logits' scale with 24 of 24 greedy tokens equal. The compile tolerance, but never below this floor.
CROSS_RUNTIME_TOLERANCE = 5e-4


class _Graph:
    """Just enough graph building: named constants, nodes, fresh value names."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        array = np.ascontiguousarray(array)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.initializers.append(value)
        return value

    def lazy_const(self, name: str, make: Any, shape: tuple[int, ...], dtype: np.dtype) -> ir.Value:
        """A constant whose array ``make()`` computes only when the model is written (or read): the decoder's
        transposed weights then exist one at a time while ``ir.save`` streams them to the data file, not all at
        once beside the torch modules they come from (3.3 GB at 1B parameters)."""
        element = ir.DataType.from_numpy(np.dtype(dtype))
        tensor = ir.LazyTensor(
            lambda: ir.tensor(np.ascontiguousarray(make()), name=name), dtype=element, shape=ir.Shape(shape), name=name
        )
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(element), const_value=tensor)
        self.initializers.append(value)
        return value

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1, name: str = "", **attrs):
        self._count += 1
        node = ir.node(
            op_type,
            list(inputs),
            attributes=attrs,
            domain=domain,
            num_outputs=outputs,
            name=name or f"/{op_type}_{self._count}",
        )
        for i, value in enumerate(node.outputs):
            value.name = f"{node.name}/output_{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs


def _np(tensor: Any, dtype: np.dtype) -> np.ndarray:
    # no copy when the tensor already is fp32 and fp32 is asked for; half precision via fp32, one tensor
    return tensor.detach().float().numpy().astype(dtype, copy=False)


@dataclass
class _Weights:
    """How the decoder stores its weights: the float type, and the MatMulNBits quantization of the projections
    and of the LM head (None: float MatMul), quantized one weight at a time while the file is written."""

    dtype: Any
    body: WeightQuant | None = None
    head: WeightQuant | None = None
    cache: OneWeightAtATime | None = None

    @classmethod
    def of(cls, precision: GenaiPrecision, cache: OneWeightAtATime | None = None) -> _Weights:
        return cls(precision.dtype, precision.body, precision.head, cache or OneWeightAtATime())


def _linear(
    g: _Graph,
    x: ir.Value,
    linears: list[Any],
    name: str,
    weights: _Weights,
    quant: WeightQuant | None = None,
    *,
    quantized: tuple[ir.Value, ir.Value] | None = None,
) -> ir.Value:
    """MatMul (or MatMulNBits with ``quant``) with the (row-concatenated) weights of ``linears``, plus their
    bias when any has one. ``quantized``: MatMulNBits initializers made already (a tied LM head's, which the
    embedding's GatherBlockQuantized reads too)."""
    dtype = weights.dtype
    shape = (int(linears[0].in_features), sum(int(lin.out_features) for lin in linears))

    def weight(as_type: Any = dtype) -> np.ndarray:
        return np.concatenate([_np(lin.weight, as_type) for lin in linears], axis=0).T

    if quant is None:
        out = g.op("MatMul", x, g.lazy_const(f"{name}.MatMul.weight", weight, shape, dtype), name=f"{name}/MatMul")
    else:
        key = f"{name}.MatMul.weight"
        packed, scales = quantized or _nbits_initializers(g, key, lambda: weight(np.float32), shape, weights, quant)
        out = g.op("MatMulNBits", x, packed, scales, domain="com.microsoft", name=f"{name}/MatMulNBits",
                   **quant.attributes(*shape))  # fmt: skip
    if any(lin.bias is not None for lin in linears):
        bias = np.concatenate(
            [_np(lin.bias, dtype) if lin.bias is not None else np.zeros(lin.out_features, dtype) for lin in linears]
        )
        out = g.op("Add", out, g.const(f"{name}.Add.bias", bias), name=f"{name}/Add")
    return out


def _nbits_initializers(
    g: _Graph, key: str, weight: Any, shape: tuple[int, int], weights: _Weights, quant: WeightQuant
) -> tuple[ir.Value, ir.Value]:
    """MatMulNBits' packed blocks ``[N, K/block, block·bits/8]`` and scales ``[N, K/block]`` of ``weight()``
    ([K, N] fp32), quantized by ONNX Runtime's kernel when the file is written: packed blocks then scales, both
    from one quantization (:class:`OneWeightAtATime`)."""
    k, n = shape
    blocks, blob = quant.blocks(k), quant.block_size * quant.bits // 8
    assert weights.cache is not None

    def packed() -> np.ndarray:
        return weights.cache.get(key, weight, quant)[0]

    def scales() -> np.ndarray:
        return weights.cache.get(key, weight, quant)[1].astype(weights.dtype, copy=False)

    tag = f"Q{quant.bits}G{quant.block_size}"
    return (
        g.lazy_const(f"{key}_{tag}", packed, (n, blocks, blob), np.uint8),
        g.lazy_const(f"{key}_scale", scales, (n, blocks), weights.dtype),
    )


def _tied(module: Any) -> bool:
    """Whether the LM head is the embedding table (tied word embeddings)."""
    head, embed = module.lm_head.weight, module.model.embed_tokens.weight
    if head is embed:
        return True
    same = head.shape == embed.shape and head.device.type != "meta"
    return bool(same and head.data_ptr() == embed.data_ptr())


def _embedding(
    g: _Graph, io: _DecoderIO, module: Any, weights: _Weights
) -> tuple[ir.Value, tuple[ir.Value, ir.Value] | None]:
    """The token embedding: a Gather on the float table, or — with a quantized LM head — GatherBlockQuantized
    on blocks quantized like the head (one scale per block of the hidden axis). A tied table *is* the head's
    MatMulNBits weight, reshaped (onnxruntime-genai's builder does the same): returns its initializers for the
    head to share. Rows padded to the block are sliced back to the hidden size."""
    embed = module.model.embed_tokens.weight
    vocab, hidden = (int(d) for d in embed.shape)
    quant = weights.head
    if quant is None:
        table = g.lazy_const("model.embed_tokens.weight", lambda: _np(embed, weights.dtype), (vocab, hidden),
                             weights.dtype)  # fmt: skip
        return g.op("Gather", table, io.input_ids, name="/model/embed_tokens/Gather"), None
    tied = _tied(module)
    source = module.lm_head.weight if tied else embed
    key = "lm_head.MatMul.weight" if tied else "model.embed_tokens.weight"
    packed, scales = _nbits_initializers(
        g, key, lambda: _np(source, np.float32).T, (hidden, vocab), weights, quant
    )  # fmt: skip
    flat = quant.blocks(hidden) * quant.block_size * quant.bits // 8
    shape = g.const(f"/model/constants/INT64/[{vocab}, {flat}]", np.array([vocab, flat], dtype=np.int64))
    rows = g.op("Reshape", packed, shape, name="/model/embed_tokens/Reshape")
    out = g.op(
        "GatherBlockQuantized", rows, io.input_ids, scales, domain="com.microsoft",
        name="/model/embed_tokens/GatherBlockQuantized", bits=quant.bits, block_size=quant.block_size,
        gather_axis=0, quantize_axis=1,
    )  # fmt: skip
    if quant.blocks(hidden) * quant.block_size != hidden:
        ints = {v: g.const(f"/model/constants/INT64/[{v}]", np.array([v], dtype=np.int64)) for v in (0, hidden, -1)}
        out = g.op("Slice", out, ints[0], ints[hidden], ints[-1], name="/model/embed_tokens/Slice")
    return out, ((packed, scales) if tied else None)


def _rotary_caches(module: Any, head_dim: int, length: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [length, head_dim/2] from the model's own rotary module (its scaling included)."""
    import torch

    rotary = getattr(getattr(module, "model", None), "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModelError(f"{type(module).__name__}: no model.rotary_emb (rotary position embedding)")
    positions = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    if cos.shape[-1] != head_dim:
        raise UnsupportedModelError(
            f"{type(module).__name__}: rotary covers {cos.shape[-1]} of {head_dim} head dims (partial rotary "
            "is not supported by this decoder builder)"
        )
    half = head_dim // 2
    return cos[0, :, :half].float().numpy().astype(dtype), sin[0, :, :half].float().numpy().astype(dtype)


def _check_supported(module: Any, head_dim: int) -> None:
    config = module.config.get_text_config(decoder=True)
    act = str(getattr(config, "hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{type(module).__name__}: MLP activation '{act}' (only SiLU/SwiGLU)")
    if head_dim % _GQA_HEAD_MULTIPLE:
        raise UnsupportedModelError(
            f"head_dim {head_dim} is not a multiple of {_GQA_HEAD_MULTIPLE}, which ONNX Runtime's CPU "
            "GroupQueryAttention requires"
        )
    for i, layer in enumerate(module.model.layers):
        attn = layer.self_attn
        for extra in ("q_norm", "k_norm"):
            if getattr(attn, extra, None) is not None:
                raise UnsupportedModelError(f"layer {i}: per-head {extra} is not supported by this decoder builder")
        if getattr(config, "layer_types", None) and config.layer_types[i] != "full_attention":
            raise UnsupportedModelError(f"layer {i}: {config.layer_types[i]} layers are not supported")


def decoder_bytes(sliced: SliceResult, precision: GenaiPrecision | None = None) -> int:
    """Bytes of the decoder :func:`build_genai_decoder` writes for ``sliced`` in ``precision`` (weights only):
    MatMulNBits weights by their packed blocks and scales (K padded to the block), everything else in the
    decoder's float type.

    The embedding table is stored like the LM head: a float table counts once more beside a float head (the
    decoder holds a Gather table and an lm_head weight, tied or not); a quantized tied table *is* the head's
    MatMulNBits weight (counted once), an untied one has blocks of its own.
    """
    precision = precision or GenaiPrecision()
    body, head = precision.body, precision.head
    item = np.dtype(precision.dtype).itemsize
    module = sliced.module
    projections = set()
    if body is not None:
        for layer in module.model.layers:
            projections |= {id(lin.weight) for lin in (*_projections(layer.self_attn), *_projections(layer.mlp))}
    tied = _tied(module)
    total = 0
    for name, p in module.named_parameters(remove_duplicate=False):
        if name == "model.embed_tokens.weight" or name.startswith("lm_head."):
            quant = head if p.dim() == 2 else None
            if quant is not None and tied and name == "model.embed_tokens.weight":
                continue  # the head's blocks, read by GatherBlockQuantized
        else:
            quant = body if id(p) in projections else None
        if quant is not None:
            n, k = (int(d) for d in p.shape)  # a Linear's weight is [out, in] = [N, K]; the table [vocab, hidden]
            total += quant.nbytes(k, n, item)
        else:  # norms, biases, float weights
            total += item * p.numel()
    return total


def _projections(block: Any) -> list[Any]:
    """The Linear modules of an attention or MLP block that the decoder writes as MatMuls."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [getattr(block, n) for n in names if getattr(block, n, None) is not None]


def check_memory_shortfall(
    sliced: SliceResult,
    precision: GenaiPrecision | None = None,
    *,
    available: int | None = None,
    total: int | None = None,
) -> str:
    """Why genai/ cannot be checked on this machine ('' when it can), decided before it is written.

    The check loads the decoder into ONNX Runtime and then into onnxruntime-genai (one at a time), so it needs
    about the decoder's bytes once (:func:`decoder_bytes`: int4/int8 projections by their packed size) plus a
    fifth for arenas and activations. It runs after the masked and sliced modules are freed, so what the sliced
    copy holds now counts as free then. A decoder that cannot be checked here could not run here either (a CPU
    model), so it is not written: an 8B model's fp32 decoder is ~21 GB after half its MLP is pruned, its int4
    one about a fifth of that. An fp16 decoder is for CUDA and is not run here: it is not refused.
    """
    import psutil

    precision = precision or GenaiPrecision()
    if precision.provider != "cpu":
        return ""
    memory = psutil.virtual_memory()
    available = memory.available if available is None else available
    total = memory.total if total is None else total
    weights = decoder_bytes(sliced, precision)
    needed = int(weights * 1.2)
    held = sum(p.numel() * p.element_size() for p in sliced.module.parameters())
    budget = min(int(total * 0.9), available + held)
    if needed <= budget:
        return ""
    smaller = " (or --genai-precision int4)" if precision.name != "int4" else ""
    return (
        f"genai/'s {precision.name} decoder would be {weights / 1e9:.1f} GB; checking it (ONNX Runtime, then "
        f"onnxruntime-genai) needs about {needed / 1e9:.1f} GB and this machine has about {budget / 1e9:.1f} GB for "
        f"it ({available / 1e9:.1f} GB available now of {total / 1e9:.1f} GB): compile with --no-genai{smaller}, "
        "or on a machine with more memory"
    )


def build_genai_decoder(
    sliced: SliceResult,
    *,
    context_length: int | None = None,
    precision: GenaiPrecision | None = None,
    quantized: OneWeightAtATime | None = None,
) -> ir.Model:
    """The GroupQueryAttention KV-cache decoder of a sliced Llama-style model (per-layer head counts).

    ``precision`` (default fp32): fp16 makes every float tensor fp16 (for CUDA); int8/int4 keep fp32
    activations and make the projections (and the LM head, per ``precision.lm_head``) MatMulNBits, quantized
    one weight at a time when the model is written (``ir.save``), never as a float copy of the decoder; each
    checked as it is quantized (``quantized.report()`` after the save).

    Raises:
        UnsupportedModelError: the architecture has something this builder does not emit (non-SiLU MLP,
            per-head norms, sliding-window layers, partial rotary, head_dim % 8 != 0).
    """
    module = sliced.module
    d = sliced.head_dim
    _check_supported(module, d)
    config = module.config.get_text_config(decoder=True)
    # fp32 for ONNX Runtime's and onnxruntime-genai's CPU kernels (the builder's -e cpu writes fp32 too), fp16
    # for CUDA; the weights of a half-precision model are converted one tensor at a time while the file is written
    weights = _Weights.of(precision or GenaiPrecision(), quantized)
    dtype = weights.dtype
    length = genai_context(context_length, getattr(config, "max_position_embeddings", None))
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    g = _Graph()
    io = _DecoderIO(dtype)
    inputs = [io.input_ids, io.mask]

    one = g.const("/model/constants/INT64/[1]", np.array([1], dtype=np.int64))
    seqlens = g.op("ReduceSum", io.mask, one, keepdims=0, name="/model/attn_mask/ReduceSum")
    seqlens = g.op("Cast", g.op("Sub", seqlens, one, name="/model/attn_mask/Sub"), to=ir.DataType.INT32)
    total_len = g.op("Gather", g.op("Shape", io.mask), g.const("/model/constants/INT64/1", np.array(1, dtype=np.int64)))
    total_len = g.op("Cast", total_len, to=ir.DataType.INT32, name="/model/attn_mask/total/Cast")
    cos, sin = _rotary_caches(module, d, length, dtype)
    attention = _Attention(seqlens, total_len, g.const("cos_cache", cos), g.const("sin_cache", sin), d, eps)

    residual, tied_head = _embedding(g, io, module, weights)
    layers = list(module.model.layers)
    x = g.op("SimplifiedLayerNormalization", residual, g.const("model.layers.0.input_layernorm.weight",
             _np(layers[0].input_layernorm.weight, dtype)), axis=-1, epsilon=eps, stash_type=1)  # fmt: skip
    outputs = []
    for i, layer in enumerate(layers):
        is_last = i == len(layers) - 1
        norm = module.model.norm if is_last else layers[i + 1].input_layernorm
        norm_name = "model.norm.weight" if is_last else f"model.layers.{i + 1}.input_layernorm.weight"
        x, residual, past, present = _decoder_layer(g, io, attention, weights, layer, i, x, residual, (norm_name, norm))
        inputs += past
        outputs += present
    logits = _linear(g, x, [module.lm_head], "lm_head", weights, weights.head, quantized=tied_head)
    io.name(logits, "logits", [io.batch, io.seq, int(module.lm_head.out_features)])
    # present values alternate key, value per layer; genai finds them by name
    graph = ir.Graph(
        inputs,
        [logits, *outputs],
        nodes=g.nodes,
        initializers=g.initializers,
        opset_imports={"": 18, "com.microsoft": 1},
        name="prune2deploy_genai_decoder",
    )
    return ir.Model(graph, ir_version=10, producer_name="prune2deploy")


class _DecoderIO:
    """The decoder's symbolic dimensions and genai's I/O names (float values in the decoder's float type)."""

    def __init__(self, dtype: Any = np.float32) -> None:
        self.float = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
        self.batch, self.seq = ir.SymbolicDim("batch_size"), ir.SymbolicDim("sequence_length")
        self.total, self.past = ir.SymbolicDim("total_sequence_length"), ir.SymbolicDim("past_sequence_length")
        int64 = ir.TensorType(ir.DataType.INT64)
        self.input_ids = ir.Value(name="input_ids", shape=ir.Shape([self.batch, self.seq]), type=int64)
        self.mask = ir.Value(name="attention_mask", shape=ir.Shape([self.batch, self.total]), type=int64)

    def past_kv(self, i: int, kv: int, d: int) -> list[ir.Value]:
        dims = [self.batch, kv, self.past, d]
        return [
            ir.Value(name=f"past_key_values.{i}.{kind}", shape=ir.Shape(dims), type=self.float)
            for kind in ("key", "value")
        ]

    def name(self, value: ir.Value, name: str, shape: list[Any]) -> None:
        value.name = name
        value.shape = ir.Shape(shape)
        value.type = self.float


@dataclass(frozen=True)
class _Attention:
    """What every layer's GroupQueryAttention shares: sequence lengths, rotary caches, head size, norm eps."""

    seqlens: ir.Value
    total_len: ir.Value
    cos_cache: ir.Value
    sin_cache: ir.Value
    head_dim: int
    eps: float


def _decoder_layer(
    g: _Graph, io: _DecoderIO, shared: _Attention, weights: _Weights, layer: Any, i: int, x: ir.Value,
    residual: ir.Value, next_norm: tuple[str, Any],
) -> tuple[ir.Value, ir.Value, list[ir.Value], list[ir.Value]]:  # fmt: skip
    """One layer: packed QKV, GroupQueryAttention on the un-expanded cache, SkipRMSNorm, SwiGLU, and the next
    layer's (or the final) norm fused with the residual add. Returns (x, residual, past inputs, presents)."""
    dtype, d, eps, quant = weights.dtype, shared.head_dim, shared.eps, weights.body
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    prefix = f"model.layers.{i}"
    qkv = _linear(g, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{prefix}.attn.qkv_proj", weights, quant)
    past_k, past_v = io.past_kv(i, kv, d)
    attn_out, present_k, present_v = g.op(
        "GroupQueryAttention", qkv, None, None, past_k, past_v, shared.seqlens, shared.total_len,
        shared.cos_cache, shared.sin_cache, domain="com.microsoft", outputs=3,
        name=f"/{prefix}/attn/GroupQueryAttention", num_heads=heads, kv_num_heads=kv, scale=float(attn.scaling),
        do_rotary=1, rotary_interleaved=0, local_window_size=-1,
    )  # fmt: skip
    for value, kind in ((present_k, "key"), (present_v, "value")):
        io.name(value, f"present.{i}.{kind}", [io.batch, kv, io.total, d])
    attn_out = _linear(g, attn_out, [attn.o_proj], f"{prefix}.attn.o_proj", weights, quant)
    x, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization", residual, attn_out,
        g.const(f"{prefix}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight, dtype)),
        domain="com.microsoft", outputs=4, epsilon=eps, name=f"/{prefix}/post_attention_layernorm",
    )  # fmt: skip
    gate = _linear(g, x, [mlp.gate_proj], f"{prefix}.mlp.gate_proj", weights, quant)
    up = _linear(g, x, [mlp.up_proj], f"{prefix}.mlp.up_proj", weights, quant)
    act = g.op("Mul", gate, g.op("Sigmoid", gate))
    down = _linear(g, g.op("Mul", act, up), [mlp.down_proj], f"{prefix}.mlp.down_proj", weights, quant)
    norm_name, norm = next_norm
    x, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization", residual, down, g.const(norm_name, _np(norm.weight, dtype)),
        domain="com.microsoft", outputs=4, epsilon=eps, name=f"/{prefix}/next_norm",
    )  # fmt: skip
    return x, residual, [past_k, past_v], [present_k, present_v]


def _genai_config(
    sliced: SliceResult, context_length: int, filename: str, precision: GenaiPrecision | None = None
) -> dict[str, Any]:
    """genai_config.json as onnxruntime-genai's builder writes it; for CUDA (fp16) with the builder's provider
    options (``{"cuda": {"enable_cuda_graph": "0"}}``) and a KV cache shared between past and present."""
    precision = precision or GenaiPrecision()
    providers = [{"cuda": {"enable_cuda_graph": "0"}}] if precision.provider == "cuda" else []
    module = sliced.module
    config = module.config.get_text_config(decoder=True)
    generation = getattr(module, "generation_config", None)

    def token(name: str) -> Any:
        value = getattr(generation, name, None) if generation is not None else None
        return value if value is not None else getattr(config, name, None)

    eos = token("eos_token_id")
    pad = token("pad_token_id")
    first = sliced.layers[0]
    model_type = type(module).__name__
    model_type = model_type[: model_type.find("For")] if "For" in model_type else model_type
    return {
        "model": {
            "bos_token_id": token("bos_token_id"),
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": filename,
                "head_size": sliced.head_dim,
                "hidden_size": int(config.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                # genai sizes each layer's cache from the graph's inputs; these describe layer 0
                "num_attention_heads": first.num_heads,
                "num_hidden_layers": len(sliced.layers),
                "num_key_value_heads": first.kv_heads,
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos or 0),
            "type": model_type.lower(),
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


@dataclass(frozen=True)
class DecoderReference:
    """What the masked model computes on the check inputs: all a ``genai/`` check needs of it.

    Taken before the folder is written, so that the masked torch module (4.9 GB at 1B parameters, beside the
    sliced one and then beside ONNX Runtime's copy of the decoder) can be freed first.
    """

    ids: np.ndarray  # [1, prompt + steps] token ids fed to the decoder's prefill and decode steps
    logits: np.ndarray  # the masked model's logits on ``ids``, float32
    prompt: int
    steps: int
    greedy_prompt: list[int]  # the prompt of the onnxruntime-genai check
    greedy_tokens: list[int]  # transformers' greedy continuation of it


def reference_outputs(
    reference: Any, *, prompt: int = 7, steps: int = 4, greedy_prompt: int = 8, new_tokens: int = 12
) -> DecoderReference:
    """Runs the masked model once on the check inputs (fixed seeds): logits for the ONNX Runtime check, and
    greedy tokens for the onnxruntime-genai one."""
    import torch

    reference = getattr(reference, "module", reference)
    vocab = int(reference.config.get_text_config(decoder=True).vocab_size)
    ids = torch.randint(0, vocab, (1, prompt + steps), generator=torch.Generator().manual_seed(0))
    start = torch.randint(0, vocab, (1, greedy_prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = reference(input_ids=ids, use_cache=False).logits.float().numpy()
        greedy = reference.generate(
            input_ids=start, attention_mask=torch.ones_like(start), max_new_tokens=new_tokens, do_sample=False,
            min_new_tokens=new_tokens, pad_token_id=0,
        )[0, greedy_prompt:].tolist()  # fmt: skip
    return DecoderReference(ids.numpy(), logits, prompt, steps, start[0].tolist(), greedy)


def check_decoder(decoder_path: Path, reference: DecoderReference, *, prepack: bool = False) -> dict[str, Any]:
    """Prefill + decode steps of the ONNX decoder against the masked model's logits (:func:`reference_outputs`):
    relative error, KL, top-1 agreement (:func:`~prune2deploy.outputs.quantize.approximate_error`).

    ``prepack``: quantized decoders are checked with ONNX Runtime's pre-packed MatMulNBits kernels, the ones
    onnxruntime-genai serves them with (accuracy level 4 quantizes activations to int8 only on that path).
    """
    from prune2deploy.ort_session import make_session

    session = make_session(Path(decoder_path), prepack=prepack)
    inputs = {i.name: i for i in session.get_inputs()}
    want, ids = reference.logits, reference.ids
    dtype = np.float16 if "float16" in next(v.type for k, v in inputs.items() if k.startswith("past")) else np.float32
    feeds: dict[str, np.ndarray] = {}
    for name, arg in inputs.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, arg.shape[1], 0, arg.shape[3]), dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    got = []
    position = 0
    for length in [reference.prompt] + [1] * reference.steps:
        feeds["input_ids"] = ids[:, position : position + length]
        feeds["attention_mask"] = np.ones((1, position + length), dtype=np.int64)
        out = dict(zip(names, session.run(names, feeds), strict=True))
        got.append(out["logits"].astype(np.float32))
        for name in list(feeds):
            if name.startswith("past_key_values."):
                feeds[name] = out[name.replace("past_key_values", "present")]
        position += length
    got_all = np.concatenate(got, axis=1)
    return {**approximate_error(want, got_all), "prefill_tokens": reference.prompt, "decode_steps": reference.steps}


#: ONNX Runtime's CPU GroupQueryAttention refuses other head sizes at run time ("head_size shall be a multiple of
#: 16"), after minutes of writing: checked first.
GQA_CPU_HEAD_MULTIPLE = 16


def write_genai_folder(
    sliced: SliceResult,
    tokenizer: Any,
    out: Path,
    *,
    reference: Any = None,
    context_length: int | None = None,
    tolerance: float = 1e-4,
    precision: GenaiPrecision | None = None,
) -> dict[str, Any]:
    """Writes ``out`` (genai_config.json, model.onnx + model.onnx.data, tokenizer) and checks it.

    With ``reference`` (the masked model) the decoder's logits are compared on ONNX Runtime (prefill and
    decode steps) and, when onnxruntime-genai is installed, genai's greedy tokens with transformers'.
    """
    precision = precision or GenaiPrecision()
    if precision.provider == "cpu" and sliced.head_dim % GQA_CPU_HEAD_MULTIPLE:
        raise UnsupportedModelError(
            f"head size {sliced.head_dim} is not a multiple of {GQA_CPU_HEAD_MULTIPLE}, which ONNX Runtime's CPU "
            "GroupQueryAttention kernel requires ('head_size shall be a multiple of 16'); genai/ cannot run it"
        )
    module = sliced.module
    config = module.config.get_text_config(decoder=True)
    length = genai_context(context_length, getattr(config, "max_position_embeddings", None))
    expected = decoder_bytes(sliced, precision)
    weights = sum(p.numel() for _, p in module.named_parameters(remove_duplicate=False))  # tied: table and head
    quantized = OneWeightAtATime()
    decoder = build_genai_decoder(sliced, context_length=length, precision=precision, quantized=quantized)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ir.save(decoder, out / "model.onnx", external_data="model.onnx.data")  # quantizes (and checks) one at a time
    del decoder  # its weights are a copy of the sliced model's: gone before the checks load the file again
    gc.collect()
    config_json = _genai_config(sliced, length, "model.onnx", precision)
    (out / "genai_config.json").write_text(json.dumps(config_json, indent=4) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    size = sum((out / name).stat().st_size for name in ("model.onnx", "model.onnx.data") if (out / name).exists())
    item = np.dtype(precision.dtype).itemsize
    section: dict[str, Any] = {
        "path": "genai",
        **precision.describe(),
        "attention": "com.microsoft.GroupQueryAttention (K/V never expanded)",
        "per_layer_heads": [[w.num_heads, w.kv_heads] for w in sliced.layers],
        "per_layer_intermediate": [w.intermediate for w in sliced.layers],
        "padded": dict(sliced.padded),
        "kv_cache_bytes_per_token": sum(2 * w.kv_heads * sliced.head_dim for w in sliced.layers) * item,
        "context_length": length,
        "decoder_bytes": size,  # model.onnx + model.onnx.data (rotary caches included)
        "weight_bytes": expected,
        "bits_per_weight": round(8 * expected / weights, 3),
        "files": sorted(p.name for p in out.iterdir()),
    }
    if precision.body is not None:
        section["projection_bits_per_weight"] = precision.body.bits_per_weight
    if precision.body is not None or precision.head is not None:
        section["quantized_weights"] = quantized.report()
    if reference is None:
        return section
    return check_genai_folder(out, reference, section, tolerance=tolerance, precision=precision)


def check_against_compiled(
    decoder_path: Path, compiled_path: Path, ids: np.ndarray, *, prepack: bool = False
) -> dict[str, Any]:
    """Prefill logits of the decoder against the compiled ``model.onnx`` on the same ids (both ONNX Runtime).

    For genai/ built after an approximate pass repeated in torch (``outputs.regroup``): the decoder is then
    checked against the torch model it was built from *and* against the graph the compile verified, so a
    torch-side repetition that differs from the pass cannot go unnoticed.
    """
    import onnx

    from prune2deploy.ort_session import make_session

    # The graph's signature first (no weights read): a bf16/fp16 graph cannot even be loaded on ONNX Runtime's
    # CPU provider, which lacks their kernels, and a graph without these inputs cannot be fed the same ids.
    graph = onnx.load(str(compiled_path), load_external_data=False).graph
    names = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    logits = next((o.type.tensor_type.elem_type for o in graph.output if o.name == "logits"), None)
    del graph
    if names != {"input_ids", "attention_mask"}:
        return {"checked": False, "reason": f"model.onnx takes {sorted(names)}, not input_ids and attention_mask"}
    if logits != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(logits).lower() if logits is not None else "no"
        return {"checked": False, "reason": f"model.onnx computes {kind} logits, which ONNX Runtime's CPU cannot run"}
    compiled = make_session(Path(compiled_path), prepack=False)
    mask = np.ones_like(ids)
    want = compiled.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
    del compiled
    decoder = make_session(Path(decoder_path), prepack=prepack)
    inputs = {i.name: i for i in decoder.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask}
    for name, arg in inputs.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((ids.shape[0], arg.shape[1], 0, arg.shape[3]), dtype=np.float32)
    got = decoder.run(["logits"], feeds)[0].astype(np.float32)
    return {"checked": True, **approximate_error(want, got), "tokens": int(ids.shape[1])}


def check_genai_folder(
    out: Path,
    reference: DecoderReference | Any,
    section: dict[str, Any],
    *,
    tolerance: float = 1e-4,
    compiled_model: Path | None = None,
    precision: GenaiPrecision | None = None,
) -> dict[str, Any]:
    """Checks a written ``genai/`` folder against the masked model and adds the results to ``section``.

    ``reference`` is the masked model's :func:`reference_outputs` (or the module itself): separate from
    writing so that a caller can free the masked and sliced modules first — at 1B parameters 4.9 and 3.3 GB,
    held for nothing while ONNX Runtime and onnxruntime-genai each load the decoder again. With
    ``compiled_model`` the decoder is also compared with that graph (:func:`check_against_compiled`).

    An fp32 decoder must match within the tolerance (``check.passed``) and its greedy tokens must equal
    transformers'. A quantized one is approximate: its error is reported (relative error, KL, top-1 agreement;
    ``check.status`` ``approximate``) and must stay within :data:`~prune2deploy.outputs.quantize.BOUNDS`
    (``check.within_bounds``), and genai's greedy tokens are compared as an agreement, not an equality. An fp16
    decoder is written for CUDA and is not run here (``check.checked`` False, with the reason).
    """
    precision = precision or GenaiPrecision()
    if not isinstance(reference, DecoderReference):
        reference = reference_outputs(reference)
    exact = precision.exact
    try:
        check = check_decoder(out / "model.onnx", reference, prepack=not exact)
    except Exception as exc:  # an fp16 graph on a CPU build that lacks one of its kernels
        if precision.provider == "cpu":
            raise
        reason = f"ONNX Runtime's CPU cannot run the {precision.name} decoder ({str(exc)[:200]}); needs a GPU"
        section["check"] = {"checked": False, "status": "not checked", "reason": reason}
        section["genai"] = {"checked": False, "reason": reason}
        return section
    if exact:
        check["status"] = "exact"
        check["tolerance"] = max(tolerance, CROSS_RUNTIME_TOLERANCE)
        check["passed"] = check["max_rel_diff"] <= check["tolerance"]
    else:
        describe = precision.describe()
        check["status"] = "approximate"
        check["approximate"] = (
            f"{describe['projections']} projections, {describe['lm_head']} lm_head: the "
            f"{'quantization' if precision.coarsest != 'fp16' else 'fp16 rounding'}'s error, bounded, never exact"
        )
        check["bounds"] = dict(BOUNDS[precision.coarsest])
        check["within_bounds"] = _within(check, check["bounds"])
    if precision.provider != "cpu":
        check["runtime"] = (
            f"ONNX Runtime's CPU kernels: the {precision.provider.upper()} provider the folder is written for is "
            "not checked here (needs a GPU)"
        )
    if compiled_model is not None:
        ids = reference.ids[:, : reference.prompt]
        against = check_against_compiled(out / "model.onnx", compiled_model, ids, prepack=not exact)
        check["vs_model_onnx"] = against
        if against["checked"] and exact:
            check["passed"] = check["passed"] and against["max_rel_diff"] <= check["tolerance"]
            check["max_rel_diff"] = max(check["max_rel_diff"], against["max_rel_diff"])
        elif against["checked"]:
            check["within_bounds"] = check["within_bounds"] and _within(against, check["bounds"])
    section["check"] = check
    if precision.provider != "cpu":
        section["genai"] = {
            "checked": False,
            "reason": f"written for onnxruntime-genai's {precision.provider.upper()} provider: not run on this machine",
        }
        return section
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        section["genai"] = {
            "checked": False,
            "reason": "onnxruntime-genai is not installed (pip install onnxruntime-genai)",
        }
        return section
    from prune2deploy.generate import genai_tokens

    want = reference.greedy_tokens
    got, tokens_per_s = genai_tokens(out, reference.greedy_prompt, len(want), min_new_tokens=len(want))
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    section["genai"] = {
        "checked": True,
        "greedy_tokens_equal": got == want,
        "tokens_compared": len(want),
        "matching": sum(a == b for a, b in zip(got, want, strict=False)),
        "first_difference": first,  # greedy sequences part at their first different token
        "tokens_per_s": round(tokens_per_s, 1),  # a 12-token check, prefill included: not a benchmark
    }
    if not exact:
        section["genai"]["token_agreement"] = section["genai"]["matching"] / max(len(want), 1)
    return section


def _within(check: dict[str, Any], bounds: dict[str, float]) -> bool:
    return bool(check["finite"] and check["kl_mean"] <= bounds["kl_mean"]
                and check["mean_rel_diff"] <= bounds["mean_rel_diff"])  # fmt: skip


def _decoder_reference(target: Any) -> DecoderReference:
    with computing_in_fp32(target):  # the decoder is checked against the masked model in fp32
        return reference_outputs(target)


def _references(context: OutputContext) -> None:
    """The masked model's outputs on the check inputs, taken before any writer slices the module."""
    context.torch.reference("genai", _decoder_reference)


def _write(context: OutputContext) -> OutputSection:
    """The genai/ writer: decoder from the sliced module, checked against the masked model (ONNX Runtime, then
    onnxruntime-genai's greedy tokens) and, after a plan repeated in torch, against ``model.onnx``.

    The masked model's outputs on the check inputs are taken first; the masked module is freed before the
    folder is written and the sliced one before the checks load the written decoder.
    """
    models, say = context.torch, context.progress
    precision = GenaiPrecision.from_options(context.options)
    shortfall = check_memory_shortfall(models.sliced(), precision)
    if shortfall:
        log.warning(shortfall)
        return OutputSection({"written": False, "reason": shortfall})
    expected = models.reference("genai", _decoder_reference)  # taken before slicing (_references)
    models.release_masked()  # its last use: the sliced copy shares only what slicing left unchanged
    say(f"writing genai/ (GroupQueryAttention decoder, {precision.name})")
    length = context.options.genai_context_length
    section = write_genai_folder(
        models.sliced(), models.tokenizer, context.folder, context_length=length, precision=precision
    )
    section["written"] = True
    models.release_sliced()  # the checks load the written decoder; the sliced weights are not needed any more
    say("checking genai/ against the masked model (ONNX Runtime, then onnxruntime-genai)")
    section = check_genai_folder(
        context.folder,
        expected,
        section,
        tolerance=context.options.tolerance,
        compiled_model=context.model_path if models.changed else None,
        precision=precision,
    )
    models.note(section)
    if models.half:
        kind = "fp32 decoder" if precision.name == "fp32" else f"{precision.name} decoder"
        section["precision_note"] = f"{kind} built from a half-precision checkpoint (converted per tensor)"
    return OutputSection(section, check=_verdict(section))


def _verdict(section: dict[str, Any]) -> OutputCheck | None:
    """fp32: the decoder's logits within tolerance, and onnxruntime-genai's greedy tokens equal transformers'.

    int8/int4: every quantized weight must come back from ONNX Runtime's MatMulNBits within one quantization
    step (``quantized_weights``, checked while writing) and the logits must be finite. The logits' distance to
    the masked model is then the quantization's, whatever it is: beyond :data:`BOUNDS` it is a warning in the
    section (a model that weight-only quantization hurts), not a failure. Where the weights were not checked
    (a folder checked after it was written elsewhere) the bounds are the verdict. fp16: the bounds, on ONNX
    Runtime's CPU kernels where they run it, else no verdict. genai's tokens are an agreement, reported.
    """
    check = section["check"]
    if check["status"] == "not checked":
        return None
    if check["status"] == "approximate":
        weights = section.get("quantized_weights")
        if weights is not None and not weights["passed"]:
            return OutputCheck(
                False,
                f"genai/'s quantized weights {', '.join(weights['failed'])} differ from the model's by up to "
                f"{weights['max_error_steps']:.3g} quantization steps through ONNX Runtime's MatMulNBits (at most 1)",
                "This is a bug.",
            )
        bounds = check["bounds"]
        distance = (
            f"KL {check['kl_mean']:.3g} nats (bound {bounds['kl_mean']:g}), mean relative logit error "
            f"{check['mean_rel_diff']:.3g} (bound {bounds['mean_rel_diff']:g}), top-1 agreement "
            f"{check['top1_agreement']:.2f}"
        )
        if not check["finite"]:
            return OutputCheck(False, f"genai/'s {section.get('precision')} decoder computes non-finite logits")
        if check["within_bounds"]:
            return OutputCheck(True)
        if weights is not None:
            section["warning"] = (
                f"the {section.get('precision')} decoder's weights are quantized correctly, but the model moves "
                f"further than usual from the masked one: {distance}; try --genai-lm-head float or "
                "--genai-precision int8"
            )
            log.warning("genai/: %s", section["warning"])
            return OutputCheck(True)
        return OutputCheck(
            False,
            f"genai/'s {section.get('precision')} decoder is further from the masked model than a correct "
            f"quantization: {distance}",
            "This is a bug in the quantized weights (or a model that does not survive weight-only quantization: "
            "compare --genai-precision int8).",
        )
    if not check["passed"]:
        return OutputCheck(
            False,
            f"genai/ decoder differs from the masked model by {check['max_rel_diff']:.3g} (relative), more than "
            f"its tolerance {check['tolerance']:g}",
            "This is a bug.",
        )
    tokens = section.get("genai", {})
    if tokens.get("checked") and not tokens["greedy_tokens_equal"]:
        return OutputCheck(
            False,
            "onnxruntime-genai's greedy tokens on genai/ differ from transformers' on the masked model "
            f"({tokens['matching']} of {tokens['tokens_compared']} equal)",
        )
    return OutputCheck(True)


register_output(
    OutputSpec(
        name="genai",
        folder="genai",
        order=20,  # last of the torch writers: it frees the masked and sliced modules
        summary="onnxruntime-genai package: GroupQueryAttention KV-cache decoder, genai_config.json, tokenizer",
        write=_write,
        causal_lm=True,
        torch_module=True,
        option="genai",
        references=_references,
        default=True,
    )
)
