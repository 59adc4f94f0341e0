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
from prune2deploy.outputs.fp32 import computing_in_fp32
from prune2deploy.outputs.registry import OutputCheck, OutputContext, OutputSection, OutputSpec, register_output
from prune2deploy.outputs.slice import SliceResult

__all__ = [
    "DecoderReference",
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
    if dtype == np.float32:  # no copy when the tensor already is fp32
        return tensor.detach().float().numpy().astype(dtype, copy=False)
    return tensor.detach().numpy()


def _linear(g: _Graph, x: ir.Value, linears: list[Any], name: str, dtype: np.dtype) -> ir.Value:
    """MatMul with the (row-concatenated) weights of ``linears``, plus their bias when any has one."""
    shape = (int(linears[0].in_features), sum(int(lin.out_features) for lin in linears))

    def weight() -> np.ndarray:
        return np.concatenate([_np(lin.weight, dtype) for lin in linears], axis=0).T

    out = g.op("MatMul", x, g.lazy_const(f"{name}.MatMul.weight", weight, shape, dtype), name=f"{name}/MatMul")
    if any(lin.bias is not None for lin in linears):
        bias = np.concatenate(
            [_np(lin.bias, dtype) if lin.bias is not None else np.zeros(lin.out_features, dtype) for lin in linears]
        )
        out = g.op("Add", out, g.const(f"{name}.Add.bias", bias), name=f"{name}/Add")
    return out


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


def decoder_bytes(sliced: SliceResult) -> int:
    """Bytes of the fp32 decoder :func:`build_genai_decoder` writes for ``sliced`` (weights only).

    Tied embedding and lm_head count twice: the decoder holds a Gather table and an lm_head MatMul weight.
    """
    return 4 * sum(p.numel() for _, p in sliced.module.named_parameters(remove_duplicate=False))


def check_memory_shortfall(sliced: SliceResult, *, available: int | None = None, total: int | None = None) -> str:
    """Why genai/ cannot be checked on this machine ('' when it can), decided before it is written.

    The check loads the fp32 decoder into ONNX Runtime and then into onnxruntime-genai (one at a time, weights
    not pre-packed), so it needs about the decoder's bytes once plus a fifth for arenas and activations. It
    runs after the masked and sliced modules are freed, so what the sliced copy holds now counts as free then.
    A decoder that cannot be checked here could not run here either (it is a CPU model), so it is not written:
    an 8B model's decoder is ~21 GB after half its MLP is pruned.
    """
    import psutil

    memory = psutil.virtual_memory()
    available = memory.available if available is None else available
    total = memory.total if total is None else total
    weights = decoder_bytes(sliced)
    needed = int(weights * 1.2)
    held = sum(p.numel() * p.element_size() for p in sliced.module.parameters())
    budget = min(int(total * 0.9), available + held)
    if needed <= budget:
        return ""
    return (
        f"genai/'s fp32 decoder would be {weights / 1e9:.1f} GB; checking it (ONNX Runtime, then onnxruntime-genai) "
        f"needs about {needed / 1e9:.1f} GB and this machine has about {budget / 1e9:.1f} GB for it "
        f"({available / 1e9:.1f} GB available now of {total / 1e9:.1f} GB): compile with --no-genai, or on a "
        "machine with more memory"
    )


def build_genai_decoder(sliced: SliceResult, *, context_length: int | None = None) -> ir.Model:
    """The GroupQueryAttention KV-cache decoder of a sliced Llama-style model (per-layer head counts).

    Raises:
        UnsupportedModelError: the architecture has something this builder does not emit (non-SiLU MLP,
            per-head norms, sliding-window layers, partial rotary, head_dim % 8 != 0).
    """
    module = sliced.module
    d = sliced.head_dim
    _check_supported(module, d)
    config = module.config.get_text_config(decoder=True)
    # fp32 for ONNX Runtime's and onnxruntime-genai's CPU kernels (the builder's -e cpu writes fp32 too); the
    # weights of a half-precision model are upcast one tensor at a time while the file is written
    dtype = np.float32
    length = int(context_length or getattr(config, "max_position_embeddings", 4096))
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    g = _Graph()
    io = _DecoderIO()
    inputs = [io.input_ids, io.mask]

    one = g.const("/model/constants/INT64/[1]", np.array([1], dtype=np.int64))
    seqlens = g.op("ReduceSum", io.mask, one, keepdims=0, name="/model/attn_mask/ReduceSum")
    seqlens = g.op("Cast", g.op("Sub", seqlens, one, name="/model/attn_mask/Sub"), to=ir.DataType.INT32)
    total_len = g.op("Gather", g.op("Shape", io.mask), g.const("/model/constants/INT64/1", np.array(1, dtype=np.int64)))
    total_len = g.op("Cast", total_len, to=ir.DataType.INT32, name="/model/attn_mask/total/Cast")
    cos, sin = _rotary_caches(module, d, length, dtype)
    attention = _Attention(seqlens, total_len, g.const("cos_cache", cos), g.const("sin_cache", sin), d, eps)

    embed = module.model.embed_tokens.weight
    table = g.lazy_const("model.embed_tokens.weight", lambda: _np(embed, dtype), tuple(embed.shape), dtype)
    residual = g.op("Gather", table, io.input_ids, name="/model/embed_tokens/Gather")
    layers = list(module.model.layers)
    x = g.op("SimplifiedLayerNormalization", residual, g.const("model.layers.0.input_layernorm.weight",
             _np(layers[0].input_layernorm.weight, dtype)), axis=-1, epsilon=eps, stash_type=1)  # fmt: skip
    outputs = []
    for i, layer in enumerate(layers):
        is_last = i == len(layers) - 1
        norm = module.model.norm if is_last else layers[i + 1].input_layernorm
        norm_name = "model.norm.weight" if is_last else f"model.layers.{i + 1}.input_layernorm.weight"
        x, residual, past, present = _decoder_layer(g, io, attention, layer, i, x, residual, (norm_name, norm))
        inputs += past
        outputs += present
    logits = _linear(g, x, [module.lm_head], "lm_head", dtype)
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
    """The decoder's symbolic dimensions and genai's I/O names (fp32 values)."""

    def __init__(self) -> None:
        self.batch, self.seq = ir.SymbolicDim("batch_size"), ir.SymbolicDim("sequence_length")
        self.total, self.past = ir.SymbolicDim("total_sequence_length"), ir.SymbolicDim("past_sequence_length")
        int64 = ir.TensorType(ir.DataType.INT64)
        self.input_ids = ir.Value(name="input_ids", shape=ir.Shape([self.batch, self.seq]), type=int64)
        self.mask = ir.Value(name="attention_mask", shape=ir.Shape([self.batch, self.total]), type=int64)

    def past_kv(self, i: int, kv: int, d: int) -> list[ir.Value]:
        dims, fp32 = [self.batch, kv, self.past, d], ir.TensorType(ir.DataType.FLOAT)
        return [
            ir.Value(name=f"past_key_values.{i}.{kind}", shape=ir.Shape(dims), type=fp32) for kind in ("key", "value")
        ]

    @staticmethod
    def name(value: ir.Value, name: str, shape: list[Any]) -> None:
        value.name = name
        value.shape = ir.Shape(shape)
        value.type = ir.TensorType(ir.DataType.FLOAT)


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
    g: _Graph, io: _DecoderIO, shared: _Attention, layer: Any, i: int, x: ir.Value, residual: ir.Value,
    next_norm: tuple[str, Any],
) -> tuple[ir.Value, ir.Value, list[ir.Value], list[ir.Value]]:  # fmt: skip
    """One layer: packed QKV, GroupQueryAttention on the un-expanded cache, SkipRMSNorm, SwiGLU, and the next
    layer's (or the final) norm fused with the residual add. Returns (x, residual, past inputs, presents)."""
    dtype, d, eps = np.float32, shared.head_dim, shared.eps
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    prefix = f"model.layers.{i}"
    qkv = _linear(g, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{prefix}.attn.qkv_proj", dtype)
    past_k, past_v = io.past_kv(i, kv, d)
    attn_out, present_k, present_v = g.op(
        "GroupQueryAttention", qkv, None, None, past_k, past_v, shared.seqlens, shared.total_len,
        shared.cos_cache, shared.sin_cache, domain="com.microsoft", outputs=3,
        name=f"/{prefix}/attn/GroupQueryAttention", num_heads=heads, kv_num_heads=kv, scale=float(attn.scaling),
        do_rotary=1, rotary_interleaved=0, local_window_size=-1,
    )  # fmt: skip
    for value, kind in ((present_k, "key"), (present_v, "value")):
        io.name(value, f"present.{i}.{kind}", [io.batch, kv, io.total, d])
    attn_out = _linear(g, attn_out, [attn.o_proj], f"{prefix}.attn.o_proj", dtype)
    x, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization", residual, attn_out,
        g.const(f"{prefix}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight, dtype)),
        domain="com.microsoft", outputs=4, epsilon=eps, name=f"/{prefix}/post_attention_layernorm",
    )  # fmt: skip
    gate = _linear(g, x, [mlp.gate_proj], f"{prefix}.mlp.gate_proj", dtype)
    up = _linear(g, x, [mlp.up_proj], f"{prefix}.mlp.up_proj", dtype)
    act = g.op("Mul", gate, g.op("Sigmoid", gate))
    down = _linear(g, g.op("Mul", act, up), [mlp.down_proj], f"{prefix}.mlp.down_proj", dtype)
    norm_name, norm = next_norm
    x, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization", residual, down, g.const(norm_name, _np(norm.weight, dtype)),
        domain="com.microsoft", outputs=4, epsilon=eps, name=f"/{prefix}/next_norm",
    )  # fmt: skip
    return x, residual, [past_k, past_v], [present_k, present_v]


def _genai_config(sliced: SliceResult, context_length: int, filename: str) -> dict[str, Any]:
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
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
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


def check_decoder(decoder_path: Path, reference: DecoderReference) -> dict[str, Any]:
    """Prefill + decode steps of the ONNX decoder against the masked model's logits (:func:`reference_outputs`)."""
    from prune2deploy.ort_session import make_session

    session = make_session(Path(decoder_path), prepack=False)
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
    scale = float(np.abs(want).max()) or 1.0
    diff = float(np.abs(want - got_all).max())
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "top1_agreement": float((want.argmax(-1) == got_all.argmax(-1)).mean()),
        "prefill_tokens": reference.prompt,
        "decode_steps": reference.steps,
    }


def write_genai_folder(
    sliced: SliceResult,
    tokenizer: Any,
    out: Path,
    *,
    reference: Any = None,
    context_length: int | None = None,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Writes ``out`` (genai_config.json, model.onnx + model.onnx.data, tokenizer) and checks it.

    With ``reference`` (the masked model) the decoder's logits are compared on ONNX Runtime (prefill and
    decode steps) and, when onnxruntime-genai is installed, genai's greedy tokens with transformers'.
    """
    module = sliced.module
    config = module.config.get_text_config(decoder=True)
    length = int(context_length or getattr(config, "max_position_embeddings", 4096))
    decoder = build_genai_decoder(sliced, context_length=length)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ir.save(decoder, out / "model.onnx", external_data="model.onnx.data")
    del decoder  # its weights are a copy of the sliced model's: gone before the checks load the file again
    gc.collect()
    (out / "genai_config.json").write_text(json.dumps(_genai_config(sliced, length, "model.onnx"), indent=4) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    section: dict[str, Any] = {
        "path": "genai",
        "attention": "com.microsoft.GroupQueryAttention (K/V never expanded)",
        "per_layer_heads": [[w.num_heads, w.kv_heads] for w in sliced.layers],
        "per_layer_intermediate": [w.intermediate for w in sliced.layers],
        "padded": dict(sliced.padded),
        "kv_cache_bytes_per_token": sum(2 * w.kv_heads * sliced.head_dim for w in sliced.layers) * 4,  # fp32
        "context_length": length,
        "files": sorted(p.name for p in out.iterdir()),
    }
    if reference is None:
        return section
    return check_genai_folder(out, reference, section, tolerance=tolerance)


def check_against_compiled(decoder_path: Path, compiled_path: Path, ids: np.ndarray) -> dict[str, Any]:
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
    decoder = make_session(Path(decoder_path), prepack=False)
    inputs = {i.name: i for i in decoder.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask}
    for name, arg in inputs.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((ids.shape[0], arg.shape[1], 0, arg.shape[3]), dtype=np.float32)
    got = decoder.run(["logits"], feeds)[0].astype(np.float32)
    scale = float(np.abs(want).max()) or 1.0
    diff = float(np.abs(want - got).max())
    return {"checked": True, "max_rel_diff": diff / scale, "tokens": int(ids.shape[1])}


def check_genai_folder(
    out: Path,
    reference: DecoderReference | Any,
    section: dict[str, Any],
    *,
    tolerance: float = 1e-4,
    compiled_model: Path | None = None,
) -> dict[str, Any]:
    """Checks a written ``genai/`` folder against the masked model and adds the results to ``section``.

    ``reference`` is the masked model's :func:`reference_outputs` (or the module itself): separate from
    writing so that a caller can free the masked and sliced modules first — at 1B parameters 4.9 and 3.3 GB,
    held for nothing while ONNX Runtime and onnxruntime-genai each load the decoder again. With
    ``compiled_model`` the decoder is also compared with that graph (:func:`check_against_compiled`).
    """
    if not isinstance(reference, DecoderReference):
        reference = reference_outputs(reference)
    check = check_decoder(out / "model.onnx", reference)
    check["tolerance"] = max(tolerance, CROSS_RUNTIME_TOLERANCE)
    check["passed"] = check["max_rel_diff"] <= check["tolerance"]
    if compiled_model is not None:
        against = check_against_compiled(out / "model.onnx", compiled_model, reference.ids[:, : reference.prompt])
        check["vs_model_onnx"] = against
        if against["checked"]:
            check["passed"] = check["passed"] and against["max_rel_diff"] <= check["tolerance"]
            check["max_rel_diff"] = max(check["max_rel_diff"], against["max_rel_diff"])
    section["check"] = check
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
    got, _ = genai_tokens(out, reference.greedy_prompt, len(want), min_new_tokens=len(want))
    section["genai"] = {
        "checked": True,
        "greedy_tokens_equal": got == want,
        "tokens_compared": len(want),
        "matching": sum(a == b for a, b in zip(got, want, strict=False)),
    }
    return section


def _write(context: OutputContext) -> OutputSection:
    """The genai/ writer: decoder from the sliced module, checked against the masked model (ONNX Runtime, then
    onnxruntime-genai's greedy tokens) and, after a plan repeated in torch, against ``model.onnx``.

    The masked model's outputs on the check inputs are taken first; the masked module is freed before the
    folder is written and the sliced one before the checks load the written decoder.
    """
    models, say = context.torch, context.progress
    shortfall = check_memory_shortfall(models.sliced())
    if shortfall:
        log.warning(shortfall)
        return OutputSection({"written": False, "reason": shortfall})
    target = models.target()
    with computing_in_fp32(target):  # the fp32 decoder is checked against the masked model in fp32
        expected = reference_outputs(target)
    del target
    models.release_masked()  # its last use: the sliced copy shares only what slicing left unchanged
    say("writing genai/ (GroupQueryAttention decoder)")
    length = context.options.genai_context_length
    section = write_genai_folder(models.sliced(), models.tokenizer, context.folder, context_length=length)
    section["written"] = True
    models.release_sliced()  # the checks load the written decoder; the sliced weights are not needed any more
    say("checking genai/ against the masked model (ONNX Runtime, then onnxruntime-genai)")
    section = check_genai_folder(
        context.folder,
        expected,
        section,
        tolerance=context.options.tolerance,
        compiled_model=context.model_path if models.changed else None,
    )
    models.note(section)
    if models.half:
        section["precision_note"] = "fp32 decoder built from a half-precision checkpoint (upcast per tensor)"
    return OutputSection(section, check=_verdict(section))


def _verdict(section: dict[str, Any]) -> OutputCheck:
    """The decoder's logits within tolerance, and onnxruntime-genai's greedy tokens equal transformers'."""
    check = section["check"]
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
        default=True,
    )
)
