"""``OUT/hf/``: a physically smaller transformers checkpoint that other runtimes' converters can take.

vLLM, TensorRT-LLM and llama.cpp's converters read a transformers folder, not an ONNX graph, so the pruning
has to be physical there too: the config states the new widths and the safetensors hold only what is kept.
A transformers config has one width per kind for all layers (no native architecture takes per-layer MLP
widths for Llama). When the layers' widths differ, every layer is padded to one shape with zero neurons and
zero heads (exact: a zero neuron adds zero; a zero query head's o_proj columns are zero; a kv head serving
more query heads than the padded group holds is repeated, which computes the same attention), so every HF
runtime loads the checkpoint. The report gives what the padding costs in parameters and matmul FLOPs per
token; a plan ranked per layer (``prune`` without ``--global``) keeps one width in every layer and needs
none. The padded checkpoint is written tensor by tensor (safetensors), never as a second copy of the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.fp32 import computing_in_fp32
from prune2deploy.outputs.registry import OutputContext, OutputSection, OutputSpec, register_output
from prune2deploy.outputs.slice import LayerWidths, SliceResult, text_config

__all__ = [
    "HFReference",
    "PaddedShape",
    "check_hf_checkpoint",
    "head_slots",
    "hf_reference",
    "input_use_cache",
    "padded_shape",
    "padded_tensor",
    "write_hf_checkpoint",
    "write_padded_checkpoint",
    "write_safetensors",
]

log = logging.getLogger(__name__)


def write_hf_checkpoint(sliced: SliceResult, tokenizer: Any, out: Path, *, reference: Any = None) -> dict[str, Any]:
    """Writes the sliced model as a transformers folder and checks that it loads and computes the same.

    Args:
        sliced: from :func:`~prune2deploy.outputs.slice.slice_causal_lm`.
        tokenizer: the model's tokenizer (saved beside it with its chat template), or None.
        out: the folder to write (created).
        reference: the masked model; when given, the reloaded checkpoint's logits and greedy tokens are
            compared with it.

    Returns:
        The report section: ``written``, widths, and (with ``reference``) the check's numbers; when the
        layers' widths differ, ``padding`` says to which shape they were padded and what it costs.
    """
    section: dict[str, Any] = {"path": "hf", **sliced.summary()}
    module = sliced.module
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_cache = input_use_cache(module.config)
    if sliced.uniform:
        _save_uniform(module, out, use_cache)
    else:
        section["padding"] = write_padded_checkpoint(sliced, out, use_cache=use_cache)
        log.info("hf/: per-layer widths padded to %s", section["padding"]["shape"])
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    section["written"] = True
    section["use_cache"] = use_cache
    section["files"] = sorted(p.name for p in out.iterdir())
    if reference is not None:
        section["check"] = check_hf_checkpoint(out, reference)
    return section


def input_use_cache(config: Any) -> bool:
    """The input's ``use_cache`` (the exporter sets it to False on the module for a prefill graph): from the
    checkpoint's own config.json when there is one, else the config class's default."""
    import json

    folder = Path(str(getattr(config, "_name_or_path", "") or "."))
    if str(folder) not in ("", ".") and (folder / "config.json").is_file():
        try:
            value = json.loads((folder / "config.json").read_text()).get("use_cache")
        except (OSError, ValueError):
            value = None
        if isinstance(value, bool):
            return value
    try:
        return bool(type(config)().use_cache)
    except Exception:  # a config class that needs arguments: the transformers default
        return True


def _clean_config(config: Any, use_cache: bool) -> None:
    """A GGUF-loaded model carries a quantizer and its config; its weights are de-quantised, plain tensors now."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.use_cache = use_cache


def _save_uniform(module: Any, out: Path, use_cache: bool) -> None:
    config = module.config
    saved = getattr(config, "use_cache", None)
    _clean_config(config, use_cache)
    if getattr(module, "hf_quantizer", None) is not None:
        module.hf_quantizer = None
    if getattr(module, "is_quantized", False):
        module.is_quantized = False
    try:
        module.save_pretrained(str(out), safe_serialization=True)
    finally:
        config.use_cache = saved  # the module is the compile's (genai/ is built from it next)


@dataclass(frozen=True)
class PaddedShape:
    """One shape for every layer: ``groups`` kv heads of ``group`` query heads each, ``ffn`` MLP neurons."""

    groups: int
    group: int
    ffn: int

    @property
    def heads(self) -> int:
        return self.groups * self.group


def padded_shape(layers: Sequence[LayerWidths]) -> PaddedShape:
    """The smallest common shape (q/k/v/o parameters) every layer fits in with zero and repeated heads.

    A layer with ``kv`` groups of ``g`` query heads fits ``G`` query heads per kv head with
    ``kv * ceil(g / G)`` kv heads (a group larger than ``G`` is split over copies of its kv head).
    """
    largest = max(w.num_heads // w.kv_heads for w in layers)
    best = None
    for group in range(1, largest + 1):
        groups = max(w.kv_heads * math.ceil((w.num_heads // w.kv_heads) / group) for w in layers)
        cost = groups * (group + 1)  # q and o: groups*group heads; k and v: groups heads
        if best is None or cost < best[0]:
            best = (cost, groups, group)
    assert best is not None
    return PaddedShape(best[1], best[2], max(w.intermediate for w in layers))


def head_slots(width: LayerWidths, shape: PaddedShape) -> tuple[list[int | None], list[int | None]]:
    """(query head or None for each padded query slot, kv head or None for each padded kv slot) of a layer."""
    g = width.num_heads // width.kv_heads
    q_slots: list[int | None] = []
    kv_slots: list[int | None] = []
    for kv in range(width.kv_heads):
        members = [kv * g + i for i in range(g)]
        for start in range(0, g, shape.group):
            chunk = members[start : start + shape.group]
            kv_slots.append(kv)
            q_slots.extend(chunk + [None] * (shape.group - len(chunk)))
    while len(kv_slots) < shape.groups:
        kv_slots.append(None)
        q_slots.extend([None] * shape.group)
    return q_slots, kv_slots


def _heads_rows(tensor: Any, slots: Sequence[int | None], d: int, *, cols: bool = False) -> Any:
    """``tensor``'s per-head rows (columns with ``cols``) in slot order; None slots are zeros."""
    import torch

    t = tensor.detach()
    if cols:
        t = t.T
    zero = torch.zeros((d, *t.shape[1:]), dtype=t.dtype)
    parts = [zero if h is None else t[h * d : (h + 1) * d] for h in slots]
    result = torch.cat(parts, dim=0)
    return result.T.contiguous() if cols else result.contiguous()


def _padded_rows(tensor: Any, rows: int, *, cols: bool = False) -> Any:
    import torch

    t = tensor.detach()
    if cols:
        return torch.nn.functional.pad(t, (0, rows - t.shape[1])).contiguous()
    return torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0])).contiguous()


def write_padded_checkpoint(sliced: SliceResult, out: Path, *, use_cache: bool = True) -> dict[str, Any]:
    """Writes ``sliced`` (per-layer widths differ) as a standard checkpoint padded to :func:`padded_shape`.

    Returns:
        ``shape`` (heads, kv heads, FFN width), the parameters and matmul FLOPs per token the padding adds
        and their share of the checkpoint's.
    """
    import copy

    module = sliced.module
    d = sliced.head_dim
    shape = padded_shape(sliced.layers)
    state = module.state_dict()
    embed = module.get_input_embeddings().weight
    layer_of = {f"model.layers.{i}.": (i, w) for i, w in enumerate(sliced.layers)}
    tensors: list[tuple[str, Callable[[], Any], tuple[int, ...], Any]] = []
    for name, tensor in state.items():
        if name == "lm_head.weight" and tensor.data_ptr() == embed.data_ptr():
            continue  # tied: transformers re-ties it on load
        prefix = name[: name.find(".", len("model.layers.")) + 1] if name.startswith("model.layers.") else ""
        if prefix not in layer_of:
            tensors.append((name, lambda t=tensor: t.detach().contiguous(), tuple(tensor.shape), tensor.dtype))
            continue
        _, width = layer_of[prefix]
        q_slots, kv_slots = head_slots(width, shape)
        local = name[len(prefix) :]
        make, new_shape = padded_tensor(local, tensor, q_slots, kv_slots, shape, d)
        tensors.append((name, make, new_shape, tensor.dtype))
    write_safetensors(out / "model.safetensors", tensors)
    config = copy.deepcopy(module.config)
    _clean_config(config, use_cache)
    for cfg in {id(config): config, id(text_config(config)): text_config(config)}.values():
        cfg.num_attention_heads = shape.heads
        cfg.num_key_value_heads = shape.groups
        cfg.intermediate_size = shape.ffn
        cfg.head_dim = d
    # Runtimes pick the model class from ``architectures`` (vLLM, TensorRT-LLM, onnxruntime-genai's builder);
    # module.save_pretrained sets it, a config saved on its own keeps whatever the source had (often nothing).
    config.architectures = [type(module).__name__]
    config.save_pretrained(str(out))
    generation = getattr(module, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))
    return _padding_cost(sliced, shape)


def padded_tensor(
    local: str, tensor: Any, q_slots: list, kv_slots: list, shape: PaddedShape, d: int
) -> tuple[Callable[[], Any], tuple[int, ...]]:
    """(() → the padded tensor, its shape) for one of a layer's tensors (``self_attn.q_proj.weight`` …)."""
    rows = tuple(tensor.shape)
    if local.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
        slots = q_slots if local.startswith("self_attn.q_proj.") else kv_slots
        return (lambda: _heads_rows(tensor, slots, d)), (len(slots) * d, *rows[1:])
    if local == "self_attn.o_proj.weight":
        return (lambda: _heads_rows(tensor, q_slots, d, cols=True)), (rows[0], len(q_slots) * d)
    if local.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
        return (lambda: _padded_rows(tensor, shape.ffn)), (shape.ffn, *rows[1:])
    if local == "mlp.down_proj.weight":
        return (lambda: _padded_rows(tensor, shape.ffn, cols=True)), (rows[0], shape.ffn)
    if local.startswith(("self_attn.", "mlp.")) and local not in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
        raise UnsupportedModelError(
            f"hf/: {local} is not a tensor the padding knows, so layers of different widths cannot be padded; a plan "
            "ranked per layer (prune without --global) keeps one width in every layer"
        )
    return (lambda: tensor.detach().contiguous()), rows


def _padding_cost(sliced: SliceResult, shape: PaddedShape) -> dict[str, Any]:
    """What padding adds: parameters (q/k/v/o, MLP) and matmul FLOPs per token, absolute and as shares."""
    module = sliced.module
    text = text_config(module.config)
    hidden, d = int(text.hidden_size), sliced.head_dim
    kept = sum(hidden * d * 2 * (w.num_heads + w.kv_heads) + 3 * hidden * w.intermediate for w in sliced.layers)
    padded = len(sliced.layers) * (hidden * d * 2 * (shape.heads + shape.groups) + 3 * hidden * shape.ffn)
    added = padded - kept
    total = sum(p.numel() for p in module.parameters()) + added
    head = module.get_output_embeddings()
    matmuls = padded + (head.weight.numel() if head is not None else 0)
    return {
        "shape": {"num_heads": shape.heads, "kv_heads": shape.groups, "intermediate": shape.ffn},
        "params_added": int(added),
        "params_share": round(added / total, 4),
        "flops_per_token_added": int(2 * added),
        "flops_share": round(added / matmuls, 4),
        "note": "zero neurons/heads and repeated kv heads (exact); every runtime computes the padding: a plan ranked "
        "per layer (prune without --global) keeps one width in every layer and needs none",
    }


_SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.int64": "I64"}


def write_safetensors(path: Path, tensors: Sequence[tuple[str, Callable[[], Any], tuple[int, ...], Any]]) -> None:
    """A safetensors file written one tensor at a time: the header from shapes, then each tensor's bytes."""
    import json

    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _make, shape, dtype in tensors:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, make, shape, _dtype in tensors:
            tensor = make()
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{path.parent.name}/: {name} is {tuple(tensor.shape)}, expected {shape}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


@dataclass(frozen=True)
class HFReference:
    """The model's logits on seeded ids and its greedy tokens: what a reloaded checkpoint must reproduce."""

    ids: Any  # torch.LongTensor [2, seq]
    logits: np.ndarray
    greedy: Any  # torch.LongTensor [1, seq + new_tokens]
    dtype: Any  # the module's torch dtype (the checkpoint is reloaded in it)
    new_tokens: int


def hf_reference(reference: Any, *, seq: int = 16, new_tokens: int = 8) -> HFReference:
    """Runs ``reference`` (the masked model) on the check's seeded ids, in fp32 (half-precision GEMMs round
    differently and would flip near-tied greedy tokens without either model being wrong)."""
    import torch

    reference = getattr(reference, "module", reference)
    vocab = int(reference.config.get_text_config(decoder=True).vocab_size)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), computing_in_fp32(reference):
        logits = reference(input_ids=ids, use_cache=False).logits.float().numpy()
        greedy = reference.generate(input_ids=ids[:1], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return HFReference(ids, logits, greedy, next(reference.parameters()).dtype, new_tokens)


def check_hf_checkpoint(folder: Path, reference: Any, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Reloads ``folder`` with ``AutoModelForCausalLM`` and compares logits and greedy tokens with
    ``reference`` (an :class:`HFReference`, or the model to take one from).

    ``trust_remote_code`` runs the modeling code the folder carries (hf-nas/'s, written by this project).
    """
    import torch
    from transformers import AutoModelForCausalLM

    want = reference if isinstance(reference, HFReference) else hf_reference(reference)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=want.dtype, trust_remote_code=trust_remote_code
    ).eval()
    with torch.no_grad(), computing_in_fp32(loaded):
        got = loaded(input_ids=want.ids, use_cache=False).logits.float().numpy()
        kwargs = {"max_new_tokens": want.new_tokens, "do_sample": False, "pad_token_id": 0}
        new_tokens_out = loaded.generate(input_ids=want.ids[:1], **kwargs)
    scale = float(np.abs(want.logits).max()) or 1.0
    return {
        "max_abs_diff": float(np.abs(want.logits - got).max()),
        "max_rel_diff": float(np.abs(want.logits - got).max() / scale),
        "greedy_tokens_equal": bool(torch.equal(want.greedy, new_tokens_out)),
        "tokens_compared": want.new_tokens,
        "params": int(sum(p.numel() for p in loaded.parameters())),
    }


def _references(context: OutputContext) -> None:
    """The model's logits and greedy tokens for the reload check, taken before any writer slices the module."""
    context.torch.reference("hf", hf_reference)


def _write(context: OutputContext) -> OutputSection:
    """The hf/ writer: the sliced module (the plan repeated) saved and reloaded; its check is information
    (reported numbers and greedy tokens), not a verdict."""
    models = context.torch
    sliced = models.sliced()
    context.progress("writing hf/ (transformers checkpoint) and reloading it")
    # after regrouping or a depth plan, the model to compare with is the changed one (not the masked module)
    reference = models.reference("hf", hf_reference)
    section = write_hf_checkpoint(sliced, models.tokenizer, context.folder, reference=reference)
    models.note(section)
    if models.half:
        dtype = str(sliced.module.dtype).removeprefix("torch.")
        section["precision_note"] = f"written in the checkpoint's {dtype}; checked in fp32"
    return OutputSection(section)


register_output(
    OutputSpec(
        name="hf",
        folder="hf",
        order=10,  # before genai/, which frees the torch modules
        summary="a physically smaller transformers checkpoint (vLLM, TensorRT-LLM, llama.cpp converters)",
        write=_write,
        causal_lm=True,
        torch_module=True,
        option="hf_checkpoint",
        references=_references,
    )
)
