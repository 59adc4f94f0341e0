"""``OUT/gguf/``: the sliced model as GGUF files for llama.cpp, one per asked-for type.

llama.cpp reads ``{arch}.feed_forward_length``, ``{arch}.attention.head_count`` and ``head_count_kv`` as a
number or a per-layer array, but its ``llama`` architecture builds every layer with layer 0's values. Its
``deci`` architecture (Nemotron-NAS) builds each layer with its own FFN width, head count and kv heads, and
takes attention-free layers (0 heads). So a model whose layers keep the same widths is written as
``llama`` (what every GGUF runtime reads) and one whose widths differ as ``deci``. Weights come from the
sliced torch module (the one genai/ and hf/ are built from), one tensor at a time: the file's tensor table
is computed from shapes, then each tensor is converted, quantized and appended, so no second copy of the
model is made.

Exactness, and what llama.cpp's own code forces:

- A ``deci`` layer with FFN width 0 skips its residual update (its attention output is lost), so a layer
  keeps at least one (zero) neuron — slicing already does.
- Head size and rope dimensions are read from layer 0: layer 0 keeps a head, and the key/value lengths are
  written explicitly. A later layer whose attention contributes zero (every head pruned) gets 0 heads.
- llama.cpp rotates consecutive pairs of a head's values, transformers the two halves: q/k rows (and
  biases) are permuted per head, as llama.cpp's converter does.
- Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 quantize rows in blocks of 32 values: pruned FFN widths are padded with
  zero neurons up to a multiple of 32 (exact: a zero neuron adds zero), and any other tensor whose rows are
  not a multiple of 32 is kept in f16; 4- and 5-bit files keep the embedding and LM head in Q8_0, as
  llama.cpp's own files do (the report names all of them).

Each file is loaded by llama.cpp (llama-cpp-python, when installed) and its teacher-forced logits compared
with the model the compile wrote: f32 near-exact (a verdict), the other types approximate (top-1
agreement and KL, reported, never a pass).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.fp32 import computing_in_fp32
from prune2deploy.outputs.registry import OutputCheck, OutputContext, OutputSection, OutputSpec, register_output
from prune2deploy.outputs.slice import SliceResult, attention_adds_zero, text_config

__all__ = ["EXACT_BOUND", "GGUF_TYPES", "check_gguf", "gguf_layout", "write_gguf"]

log = logging.getLogger(__name__)

#: type name → (GGMLQuantizationType name, LlamaFileType name, values per quantization block).
GGUF_TYPES: dict[str, tuple[str, str, int]] = {
    "f32": ("F32", "ALL_F32", 1),
    "f16": ("F16", "MOSTLY_F16", 1),
    "bf16": ("BF16", "MOSTLY_BF16", 1),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", 32),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", 32),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1", 32),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0", 32),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1", 32),
}

#: The f32 file's logits may differ from the model's by at most the compile's ``tolerance`` (relative to the
#: largest logit), and never more than this. Measured: 4e-7 on tiny Llama models (deci and llama, f32 KV
#: cache); ggml's f32 kernels only reorder sums. One wrong row, head or permutation gives 1e-1 and more.
EXACT_BOUND = 1e-3

#: The model families llama.cpp's ``llama``/``deci`` blocks compute (pre-norm RMSNorm, rotary, SwiGLU).
_FAMILIES = ("llama", "mistral", "qwen2")

_CHECK_TOKENS = 48

#: Tensors a 4- or 5-bit file keeps in Q8_0.
_EMBEDDINGS = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class _Block:
    """One decoder layer as written."""

    index: int  # the layer's index in the sliced module
    heads: int  # 0: attention-free (deci only)
    kv_heads: int
    ffn: int  # written width (padded)
    ffn_kept: int  # the sliced width


@dataclass(frozen=True)
class GGUFLayout:
    """What one file holds: the architecture, each layer's written widths, and where padding went."""

    arch: str
    blocks: list[_Block]
    block_size: int

    @property
    def padded(self) -> dict[str, list[int]]:
        return {f"model.layers.{b.index}.mlp": [b.ffn_kept, b.ffn] for b in self.blocks if b.ffn != b.ffn_kept}

    @property
    def attention_free(self) -> list[int]:
        return [b.index for b in self.blocks if b.heads == 0]


def _rope(text: Any) -> dict[str, Any]:
    """The rotary parameters: transformers 5's ``rope_parameters`` (theta inside), or 4's ``rope_scaling`` and
    ``rope_theta``; ``rope_type`` and ``rope_theta`` always present."""
    params = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    params.setdefault("rope_theta", float(getattr(text, "rope_theta", 10000.0)))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def _refusal(config: Any, sliced: SliceResult) -> str:
    """Why llama.cpp's llama/deci blocks cannot compute this model ('' when they can)."""
    text = text_config(config)
    family = str(getattr(text, "model_type", ""))
    if family not in _FAMILIES:
        return (
            f"gguf/ writes llama.cpp's llama/deci blocks (RMSNorm, rotary, SwiGLU: {', '.join(_FAMILIES)}); "
            f"this model is '{family}', which they do not compute; write hf/ (--hf-checkpoint) and convert it "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    act = str(getattr(text, "hidden_act", "silu"))
    if act not in ("silu", "swish"):
        return f"gguf/: llama.cpp's llama/deci FFN is SwiGLU (silu); this model's activation is {act}"
    if getattr(text, "mlp_bias", False):
        return "gguf/: llama.cpp's llama/deci FFN has no biases; this model's MLP has them"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", family == "mistral") and window < text.max_position_embeddings:
        return f"gguf/: sliding-window attention ({window} tokens) is not what llama.cpp's llama/deci blocks compute"
    kind = _rope(text)["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        return f"gguf/: rope scaling '{kind}' is not written (default, linear and llama3 are)"
    module = sliced.module
    for i, layer in enumerate(module.model.layers):
        attn = layer.self_attn
        if attn.o_proj.bias is not None:
            return f"gguf/: model.layers.{i}.self_attn.o_proj has a bias, which llama.cpp's llama/deci blocks lack"
        if attn.q_proj.bias is not None and attn.q_proj.out_features != text.hidden_size:
            return (
                f"gguf/: model.layers.{i} keeps {attn.q_proj.out_features // sliced.head_dim} query heads with q/k/v "
                f"biases; llama.cpp reads a q bias as hidden_size ({text.hidden_size}) wide, so pruned query heads "
                "with biases cannot be written (prune MLP neurons only, or write hf/)"
            )
    return ""


def gguf_layout(sliced: SliceResult, block_size: int = 1) -> GGUFLayout:
    """The architecture and written widths of ``sliced`` for a type quantizing in blocks of ``block_size``."""
    layers = list(sliced.module.model.layers)
    widths = [(w.num_heads, w.kv_heads, math.ceil(w.intermediate / block_size) * block_size) for w in sliced.layers]
    uniform = len(set(widths)) == 1
    blocks = []
    for i, (w, (heads, kv, ffn)) in enumerate(zip(sliced.layers, widths, strict=True)):
        if not uniform and i > 0 and attention_adds_zero(layers[i].self_attn):
            heads, kv = 0, 0
        blocks.append(_Block(i, heads, kv, ffn, w.intermediate))
    return GGUFLayout("llama" if uniform else "deci", blocks, block_size)


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half layout → llama.cpp's interleaved pairs, per head (rows, or a bias)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _padded(array: np.ndarray, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    pad_rows = 0 if rows is None else rows - array.shape[0]
    pad_cols = 0 if cols is None or array.ndim == 1 else cols - array.shape[1]
    if pad_rows == 0 and pad_cols == 0:
        return array
    widths = [(0, pad_rows)] + ([(0, pad_cols)] if array.ndim == 2 else [])
    return np.pad(array, widths)


#: (GGUF name, numpy shape, () → the fp32 array): a tensor of the file, made only when it is written.
_Tensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def _tensors(sliced: SliceResult, layout: GGUFLayout) -> Iterator[_Tensor]:
    """Every tensor of the file, in file order; the arrays are made on demand, one at a time."""
    module = sliced.module
    inner = module.model
    d = sliced.head_dim
    embed = inner.embed_tokens.weight
    yield "token_embd.weight", tuple(embed.shape), lambda: _numpy(embed)
    for block in layout.blocks:
        layer = inner.layers[block.index]
        mlp = layer.mlp
        p = f"blk.{block.index}."
        if block.heads:
            yield from _attention_tensors(p, layer, block.heads, block.kv_heads, d)
        ffn, hidden = block.ffn, mlp.down_proj.out_features
        norm = layer.post_attention_layernorm
        yield p + "ffn_norm.weight", tuple(norm.weight.shape), lambda n=norm: _numpy(n.weight)
        yield p + "ffn_gate.weight", (ffn, hidden), lambda m=mlp, f=ffn: _padded(_numpy(m.gate_proj.weight), rows=f)
        yield p + "ffn_up.weight", (ffn, hidden), lambda m=mlp, f=ffn: _padded(_numpy(m.up_proj.weight), rows=f)
        yield p + "ffn_down.weight", (hidden, ffn), lambda m=mlp, f=ffn: _padded(_numpy(m.down_proj.weight), cols=f)
    yield "output_norm.weight", tuple(inner.norm.weight.shape), lambda: _numpy(inner.norm.weight)
    head = module.get_output_embeddings()
    text = text_config(module.config)
    if head is not None and not (getattr(text, "tie_word_embeddings", False) and head.weight is embed):
        yield "output.weight", tuple(head.weight.shape), lambda: _numpy(head.weight)
    factors = _llama3_rope_factors(text, d)
    if factors is not None:
        yield "rope_freqs.weight", factors.shape, lambda: factors


def _attention_tensors(p: str, layer: Any, heads: int, kv: int, d: int) -> Iterator[_Tensor]:
    """One layer's attention: q/k rows (and biases) permuted per head to llama.cpp's rotary layout."""
    attn, norm = layer.self_attn, layer.input_layernorm
    hidden = attn.q_proj.in_features
    yield p + "attn_norm.weight", tuple(norm.weight.shape), lambda: _numpy(norm.weight)
    yield p + "attn_q.weight", (heads * d, hidden), lambda: _permute_rows(_numpy(attn.q_proj.weight), heads)
    yield p + "attn_k.weight", (kv * d, hidden), lambda: _permute_rows(_numpy(attn.k_proj.weight), kv)
    yield p + "attn_v.weight", (kv * d, hidden), lambda: _numpy(attn.v_proj.weight)
    yield p + "attn_output.weight", (attn.o_proj.out_features, heads * d), lambda: _numpy(attn.o_proj.weight)
    if attn.q_proj.bias is not None:
        yield p + "attn_q.bias", (heads * d,), lambda: _permute_rows(_numpy(attn.q_proj.bias), heads)
        yield p + "attn_k.bias", (kv * d,), lambda: _permute_rows(_numpy(attn.k_proj.bias), kv)
        yield p + "attn_v.bias", (kv * d,), lambda: _numpy(attn.v_proj.bias)


def _llama3_rope_factors(text: Any, d: int) -> np.ndarray | None:
    """Llama 3.1's per-frequency rope scaling, as llama.cpp's ``rope_freqs`` tensor (None without it)."""
    scaling = _rope(text)
    if scaling["rope_type"] != "llama3":
        return None
    base = float(scaling["rope_theta"])
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for freq in 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _metadata(writer: Any, layout: GGUFLayout, sliced: SliceResult, kind: str, name: str) -> None:
    import gguf

    text = text_config(sliced.module.config)
    blocks = layout.blocks
    d = sliced.head_dim

    def per_layer(values: Sequence[int]) -> int | list[int]:
        return int(values[0]) if layout.arch == "llama" else [int(v) for v in values]

    writer.add_name(name)
    writer.add_context_length(int(text.max_position_embeddings))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_block_count(len(blocks))
    writer.add_feed_forward_length(per_layer([b.ffn for b in blocks]))
    writer.add_head_count(per_layer([b.heads for b in blocks]))
    writer.add_head_count_kv(per_layer([b.kv_heads for b in blocks]))
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    rope = _rope(text)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_vocab_size(int(text.vocab_size))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, GGUF_TYPES[kind][1]))
    if GGUF_TYPES[kind][2] > 1:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(sliced: SliceResult, vocab: Any, path: Path, kind: str, *, name: str = "pruned") -> dict[str, Any]:
    """Writes ``sliced`` as one GGUF file of type ``kind`` (a key of :data:`GGUF_TYPES`), tensor by tensor.

    Returns:
        The file's report entry: architecture, per-layer widths, padding, tensors kept in f16, size.
    """
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize

    qname, _, block_size = GGUF_TYPES[kind]
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    layout = gguf_layout(sliced, block_size)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    _metadata(writer, layout, sliced, kind, name)
    vocab.write(writer)
    plan = []
    fallback: dict[str, str] = {}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for tensor_name, shape, make in _tensors(sliced, layout):
        if len(shape) == 1:
            tensor_type = gguf.GGMLQuantizationType.F32
        elif shape[-1] % block_size:
            tensor_type = gguf.GGMLQuantizationType.F16
            fallback[tensor_name] = f"f16: rows of {shape[-1]} values are not whole {block_size}-value blocks"
        elif qname.startswith(("Q4", "Q5")) and tensor_name in _EMBEDDINGS:
            # llama.cpp's own 4/5-bit files keep the embedding and the LM head wider (SmolLM2's Q4_1: Q8_0)
            tensor_type = q8
            fallback[tensor_name] = "q8_0: the embedding / LM head, as llama.cpp's 4- and 5-bit files keep them"
        else:
            tensor_type = qtype
        byte_shape = quant_shape_to_byte_shape(shape, tensor_type)
        writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), tensor_type)
        plan.append((tensor_name, shape, make, tensor_type))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        params = 0
        for tensor_name, shape, make, tensor_type in plan:
            array = np.ascontiguousarray(make(), dtype=np.float32)
            if array.shape != tuple(shape):
                raise UnsupportedModelError(f"gguf/: {tensor_name} is {array.shape}, expected {tuple(shape)}")
            params += array.size
            writer.write_tensor_data(np.ascontiguousarray(quantize(array, tensor_type)).view(np.uint8))
            del array
    finally:
        writer.close()
    kept = sum(b.ffn_kept for b in layout.blocks)
    hidden = int(text_config(sliced.module.config).hidden_size)
    entry: dict[str, Any] = {
        "file": path.name,
        "arch": layout.arch,
        "bytes": path.stat().st_size,
        "params": params,
        "per_layer": [[b.heads, b.kv_heads, b.ffn] for b in layout.blocks],
        "attention_free_layers": layout.attention_free,
        "padded_mlp": layout.padded,
        "padding_params": 3 * hidden * (sum(b.ffn for b in layout.blocks) - kept),
        "kept_wider": fallback,
    }
    return entry


def _llama_cpp() -> tuple[Any, str]:
    try:
        import llama_cpp
    except ImportError as exc:
        return None, f"llama-cpp-python is not installed ({exc}); pip install 'prune2deploy[gguf]' to check gguf/"
    return llama_cpp, ""


def check_gguf(path: Path, tokens: Sequence[int], expected: np.ndarray, *, threads: int = 2) -> dict[str, Any]:
    """Loads ``path`` in llama.cpp, evaluates ``tokens`` teacher-forced and compares every position's logits
    with ``expected`` ([len(tokens), vocab]): max relative error, top-1 agreement, mean KL(expected ‖ gguf)."""
    llama_cpp, why = _llama_cpp()
    if llama_cpp is None:
        return {"checked": False, "reason": why}
    n = len(tokens)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=max(64, n), n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads,
        n_threads_batch=threads, type_k=0, type_v=0, verbose=False,  # f32 KV cache: no f16 rounding in the check
    )  # fmt: skip
    try:
        llm.eval(list(tokens))
        got = np.array(llm.scores[:n], dtype=np.float64)
    finally:
        llm.close()
    want = expected.astype(np.float64)
    scale = float(np.abs(want).max()) or 1.0
    log_p = want - _logsumexp(want)
    log_q = got - _logsumexp(got)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    return {
        "checked": True,
        "runtime": f"llama.cpp (llama-cpp-python {getattr(llama_cpp, '__version__', '?')})",
        "tokens": n,
        "max_abs_diff": float(np.abs(want - got).max()),
        "max_rel_diff": float(np.abs(want - got).max() / scale),
        "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).mean()),
        "kl": kl,
    }


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def check_tokens(vocab_size: int, n: int = _CHECK_TOKENS) -> list[int]:
    """``n`` seeded random ids: the check's input without a tokenizer (logits are compared per position)."""
    return [int(t) for t in np.random.default_rng(0).integers(0, vocab_size, size=n)]


def text_tokens(tokenizer: Any, vocab_size: int, n: int = _CHECK_TOKENS) -> list[int] | None:
    """The first ``n`` tokens of the bundled evaluation text (quantized types are judged on text, where the
    next token is not a near-tie as it is after random ids); None without a usable tokenizer."""
    if tokenizer is None:
        return None
    from prune2deploy.pruning.calibration import bundled_text

    try:
        ids = list(tokenizer(bundled_text("evaluation.txt"), add_special_tokens=False)["input_ids"][:n])
    except Exception:  # a tokenizer that cannot encode plain text: the random ids do
        return None
    return [int(t) for t in ids] if len(ids) == n and max(ids) < vocab_size else None


def reference_logits(module: Any, tokens: Sequence[int]) -> np.ndarray:
    """``module``'s teacher-forced logits on ``tokens`` in fp32, [len(tokens), vocab]."""
    import torch

    module = getattr(module, "module", module)
    with torch.no_grad(), computing_in_fp32(module):
        out = module(input_ids=torch.tensor([list(tokens)]), use_cache=False).logits
    return out[0].float().numpy()


def _check_input(tokenizer: Any, vocab_size: int) -> tuple[list[int], str]:
    """The check's tokens (the evaluation text, else seeded random ids) and what they are, in words."""
    tokens = text_tokens(tokenizer, vocab_size)
    if tokens is None:
        return check_tokens(vocab_size), f"{_CHECK_TOKENS} seeded random token ids"
    return tokens, f"the first {_CHECK_TOKENS} tokens of the bundled evaluation text"


def _expected_logits(models: Any, config: Any) -> tuple[list[int], str, np.ndarray | None]:
    """The check's tokens, what they are, and the model's logits on them (None without llama.cpp), the
    logits taken once (:meth:`TorchModels.reference`)."""
    tokens, check_input = _check_input(models.tokenizer, int(text_config(config).vocab_size))
    if _llama_cpp()[0] is None:
        return tokens, check_input, None
    return tokens, check_input, models.reference("gguf", lambda target: reference_logits(target, tokens))


def _references(context: OutputContext) -> None:
    """The logits llama.cpp's checks compare with, taken before any writer slices the module."""
    models = context.torch
    _expected_logits(models, models.target().config)


def _write(context: OutputContext) -> OutputSection:
    """The gguf/ writer: one file per asked-for type, each checked in llama.cpp against the compile's model.

    The model's logits on the check tokens are taken while the torch module is held; llama.cpp's checks run
    after every writer is done (:attr:`OutputSection.later`), once the modules are freed.
    """
    from prune2deploy.outputs.gguf_vocab import vocab_of

    models = context.torch
    sliced = models.sliced()
    config = sliced.module.config
    reason = _refusal(config, sliced)
    if reason:
        raise UnsupportedModelError(reason)
    kinds = list(dict.fromkeys(context.options.gguf))
    tokens, check_input, expected = _expected_logits(models, config)
    _, why_not = _llama_cpp()
    text = text_config(config)
    vocab = vocab_of(models.tokenizer, int(text.vocab_size), text)
    context.folder.mkdir(parents=True, exist_ok=True)
    name = str(getattr(config, "_name_or_path", "") or type(sliced.module).__name__).rstrip("/").split("/")[-1]
    files: dict[str, Any] = {}
    for kind in kinds:
        path = context.folder / f"model-{kind}.gguf"
        context.progress(f"writing gguf/{path.name}")
        files[kind] = write_gguf(sliced, vocab, path, kind, name=f"{name} (pruned)")
    section: dict[str, Any] = {
        "written": True,
        "path": "gguf",
        "arch": {kind: entry["arch"] for kind, entry in files.items()},
        "arch_reason": "llama where the written per-layer widths are uniform; deci where FFN widths or head counts "
        "differ (llama.cpp's llama builds every layer with layer 0's widths, deci each with its own)",
        "files": files,
        "tokenizer": vocab.summary(),
        "check_input": f"{check_input}, teacher-forced, every position's logits",
    }
    models.note(section)
    if models.changed:
        section["compared_with"] = "the torch model with the approximate passes repeated (the model in model.onnx)"
    if expected is None:
        for entry in files.values():
            entry["check"] = {"checked": False, "reason": why_not}
        return OutputSection(section)
    del sliced
    bound = min(float(context.options.tolerance), EXACT_BOUND)
    return OutputSection(section, later=lambda: _check_files(context, section, tokens, expected, bound))


def _check_files(
    context: OutputContext, section: dict[str, Any], tokens: list[int], expected: np.ndarray, bound: float
) -> OutputSection:
    """Checks every written file in llama.cpp (run after the torch modules are freed); f32 has a verdict."""
    problems = []
    for kind, entry in section["files"].items():
        path = context.folder / entry["file"]
        context.progress(f"checking gguf/{path.name} in llama.cpp")
        try:
            entry["check"] = check = check_gguf(path, tokens, expected)
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's "Failed to load model from file"
            entry["check"] = {"checked": False, "error": str(exc)}
            problems.append(
                f"llama.cpp could not load gguf/{path.name} ({exc}); a llama.cpp without the "
                f"'{entry['arch']}' architecture? (llama-cpp-python >= 0.3.36 has it)"
            )
            continue
        if kind == "f32":
            check["bound"] = bound
            check["passed"] = check["max_rel_diff"] <= bound
            if not check["passed"]:
                problems.append(
                    f"gguf/{path.name} differs from the model in llama.cpp by {check['max_rel_diff']:.3g} "
                    f"(relative), more than {bound:g}"
                )
        else:
            check["approximate"] = f"{kind} quantization: top-1 agreement and KL are information, not a verdict"
    if problems:
        return OutputSection(section, check=OutputCheck(False, "; ".join(problems), "The files are in gguf/."))
    return OutputSection(section, check=OutputCheck(True) if "f32" in section["files"] else None)


register_output(
    OutputSpec(
        name="gguf",
        folder="gguf",
        order=15,  # after hf/ (10), before genai/ (20), which frees the torch modules
        summary="GGUF files for llama.cpp (llama architecture, deci when per-layer widths differ)",
        write=_write,
        causal_lm=True,
        torch_module=True,
        option="gguf",
        references=_references,
    )
)
