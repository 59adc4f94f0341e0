"""``OUT/hf-nas/``: the sliced model as a ``nemotron-nas`` (DeciLM ``block_configs``) checkpoint.

A transformers config has one width per kind for all layers, so ``hf/`` pads every layer to the widest. NVIDIA's
Nemotron-NAS format (``DeciLMForCausalLM``, ``model_type: nemotron-nas``) gives each layer a block config
instead, and vLLM and TensorRT-LLM build each layer with its own widths from it. Their readers
(``vllm/model_executor/models/nemotron_nas.py``, TensorRT-LLM's ``nemotron_nas``) fix what a layer may be:

- attention: ``no_op`` (none), or all ``num_attention_heads`` query heads with ``num_attention_heads //
  n_heads_in_group`` kv heads. Pruned query heads are padded back with zero heads (their ``o_proj`` columns are
  zero: exact); a layer's kv groups are laid out in groups of ``n_heads_in_group`` (the largest divisor of the
  head count the layer's groups fit), a kv group larger than that repeated, missing kv heads zero (as ``hf/``'s
  padding does, per layer). A layer whose heads are all pruned is ``no_op`` — except layer 0: vLLM's layer 0
  starts the residual stream in its attention norm, so it keeps zero heads.
- FFN: ``no_op``, or a SwiGLU MLP of ``int(2 * ffn_mult * hidden / 3)`` neurons rounded up to a multiple of 256.
  A layer's kept width is padded with zero neurons to the next multiple of 256, and ``ffn_mult`` is chosen so
  that the readers compute exactly that width. A layer whose neurons are all pruned is ``no_op``.
- no biases, SwiGLU with silu, Llama's rotary and RMSNorm: Llama and Mistral (without a sliding window).

The folder also carries this project's ``configuration_decilm.py`` (what vLLM and TensorRT-LLM run, with
``trust_remote_code``, to read ``block_configs``) and ``modeling_decilm.py`` (what transformers runs). Neither
vLLM nor TensorRT-LLM is installed here, so the folder is checked two ways:
:func:`~prune2deploy.outputs.nas_rules.check_vllm_rules` builds, from
config.json, the tensors vLLM's reader will create and compares them with the written ones; and transformers
loads the folder with ``trust_remote_code`` (this project's modeling code) and is compared with the masked model
(:func:`~prune2deploy.outputs.hf.check_hf_checkpoint`, after the torch modules are freed).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.hf import (
    HFReference,
    PaddedShape,
    check_hf_checkpoint,
    head_slots,
    hf_reference,
    input_use_cache,
    padded_tensor,
    write_safetensors,
)
from prune2deploy.outputs.nas_rules import FFN_MULTIPLE, check_vllm_rules, vllm_ffn_width
from prune2deploy.outputs.registry import OutputCheck, OutputContext, OutputSection, OutputSpec, register_output
from prune2deploy.outputs.slice import (
    LayerWidths,
    SliceResult,
    attention_adds_zero,
    mlp_adds_zero,
    text_config,
)

__all__ = [
    "NasBlock",
    "ffn_mult_for",
    "nas_layout",
    "write_nas_checkpoint",
]

log = logging.getLogger(__name__)

#: The families whose layers are what a DeciLM block computes (pre-norm RMSNorm, rotary, SwiGLU, no biases).
_FAMILIES = ("llama", "mistral")

#: The files written by this project that the folder's config.json names in ``auto_map``.
_REMOTE_CODE = ("configuration_decilm.py", "modeling_decilm.py")
_AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}

RUNTIMES = {
    "vLLM": "vllm serve hf-nas --trust-remote-code: DeciLMForCausalLM (vLLM's nemotron_nas reader) builds each layer "
    "from block_configs with its own kv heads and FFN width and skips no_op attention/FFN; trust-remote-code lets "
    "transformers read config.json with this folder's configuration_decilm.py",
    "TensorRT-LLM": "trtllm-serve hf-nas (PyTorch backend) or its nemotron_nas checkpoint converter: "
    "DeciLMForCausalLM, the same block_configs reading (kv heads from n_heads_in_group, FFN width from ffn_mult, "
    "no_op layers skipped); trust_remote_code for the configuration",
    "transformers": "AutoModelForCausalLM.from_pretrained('hf-nas', trust_remote_code=True) runs this folder's "
    "modeling_decilm.py (written by prune2deploy: transformers' Llama blocks with each layer's widths)",
}

NOT_CHECKED = (
    "vLLM and TensorRT-LLM are not installed here: the folder is checked by transformers running its "
    "modeling_decilm.py, and its config.json and tensors against the rules of vLLM's nemotron_nas reader "
    "(vllm_rules); tensor parallelism additionally needs the head and kv-head counts divisible by the TP size"
)


def ffn_mult_for(width: int, hidden_size: int) -> float:
    """The shortest decimal ``ffn_mult`` for which the readers build exactly ``width`` neurons.

    Any value whose ``int(2 * m * hidden / 3)`` lies in ``(width - 256, width]`` gives ``width``; the shortest one
    is what a reader of config.json sees, and it is checked in the readers' own float arithmetic.
    """
    if width <= 0 or width % FFN_MULTIPLE:
        raise ValueError(f"an FFN width must be a positive multiple of {FFN_MULTIPLE}, not {width}")
    exact = 3 * width / (2 * hidden_size)
    for digits in range(12):
        mult = round(exact, digits)
        if vllm_ffn_width(mult, hidden_size) == width:
            return mult
    raise ValueError(f"no ffn_mult gives {width} neurons for hidden size {hidden_size}")  # never: exact works


def _kv_group(width: LayerWidths, heads: int) -> int:
    """``n_heads_in_group`` for a layer: the largest divisor ``G`` of ``heads`` that the layer's kv groups fit in
    (each kept group of ``g`` query heads takes ``ceil(g / G)`` of the ``heads / G`` kv slots), so that the layer
    keeps as few kv heads (KV cache) as the format allows. ``G = 1`` always fits."""
    g = width.num_heads // width.kv_heads
    for group in sorted((d for d in range(1, heads + 1) if heads % d == 0), reverse=True):
        if width.kv_heads * math.ceil(g / group) <= heads // group:
            return group
    return 1


@dataclass(frozen=True)
class NasBlock:
    """One decoder layer as written: ``group`` 0 is a no_op attention, ``ffn`` 0 a no_op FFN."""

    position: int  # the layer's index in the written checkpoint
    kept: LayerWidths  # what slicing kept
    heads: int  # query heads written (the model's count), 0 when no_op
    group: int  # n_heads_in_group
    ffn: int  # FFN width written
    ffn_mult: float | None

    @property
    def kv_heads(self) -> int:
        return self.heads // self.group if self.group else 0

    def block_config(self) -> dict[str, Any]:
        """The block's JSON object, as NVIDIA's checkpoints write it (n_heads_in_group null for no_op)."""
        group = self.group or None
        return {
            "attention": {"no_op": not self.group, "replace_with_linear": False, "n_heads_in_group": group},
            "ffn": {"no_op": not self.ffn, "replace_with_linear": False, "ffn_mult": self.ffn_mult},
        }

    def summary(self) -> dict[str, str]:
        """The block in words, for the report."""
        attention = f"{self.heads} q / {self.kv_heads} kv (n_heads_in_group {self.group})" if self.group else "no_op"
        ffn = "no_op" if not self.ffn else f"{self.ffn} neurons (ffn_mult {self.ffn_mult})"
        return {"attention": attention, "ffn": ffn}


def nas_layout(sliced: SliceResult) -> list[NasBlock]:
    """Each layer's block: attention-free and FFN-free layers no_op, widths padded to the readers' rules."""
    module = sliced.module
    text = text_config(module.config)
    heads, hidden = sliced.dense.num_heads, int(text.hidden_size)
    act = str(getattr(text, "hidden_act", "silu")).lower()
    blocks = []
    for position, (width, layer) in enumerate(zip(sliced.layers, module.model.layers, strict=True)):
        group = 0 if position > 0 and attention_adds_zero(layer.self_attn) else _kv_group(width, heads)
        if mlp_adds_zero(layer.mlp, act):
            ffn, mult = 0, None
        else:
            ffn = math.ceil(width.intermediate / FFN_MULTIPLE) * FFN_MULTIPLE
            mult = ffn_mult_for(ffn, hidden)
        blocks.append(NasBlock(position, width, heads if group else 0, group, ffn, mult))
    return blocks


def _refusal(sliced: SliceResult) -> str:
    """Why a DeciLM block cannot compute this model's layers ('' when it can)."""
    text = text_config(sliced.module.config)
    family = str(getattr(text, "model_type", ""))
    if family not in _FAMILIES:
        return (
            f"hf-nas/: a nemotron-nas block is Llama's (RMSNorm, rotary, SwiGLU, no biases: {', '.join(_FAMILIES)}); "
            f"this model is '{family}'; write hf/ (--hf-checkpoint), which pads per-layer widths instead"
        )
    act = str(getattr(text, "hidden_act", "silu"))
    if act not in ("silu", "swish"):
        return f"hf-nas/: vLLM's DeciLM MLP is SwiGLU with silu; this model's activation is {act}"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", family == "mistral") and window < text.max_position_embeddings:
        return f"hf-nas/: sliding-window attention ({window} tokens) is not what a nemotron-nas block computes"
    for i, layer in enumerate(sliced.module.model.layers):
        projections = (*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                       *(getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")))  # fmt: skip
        if any(p.bias is not None for p in projections):
            return (
                f"hf-nas/: model.layers.{i} has projection biases; TensorRT-LLM's nemotron-nas layers have none "
                "(write hf/ with --hf-checkpoint)"
            )
    return ""


def _rope(text: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) in the transformers 4 form NVIDIA's checkpoints use, which vLLM, TensorRT-LLM
    and transformers 5 (converting it to ``rope_parameters``) all read."""
    params = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(text, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return theta, (params if kind != "default" else None)


def _config_json(sliced: SliceResult, blocks: Sequence[NasBlock], use_cache: bool) -> dict[str, Any]:
    """config.json: NVIDIA's layout (per-layer widths only in ``block_configs``; the global ones null)."""
    text = text_config(sliced.module.config)
    theta, scaling = _rope(text)
    dtype = str(next(sliced.module.parameters()).dtype).removeprefix("torch.")
    config: dict[str, Any] = {
        "architectures": ["DeciLMForCausalLM"],
        "auto_map": dict(_AUTO_MAP),
        "model_type": "nemotron-nas",
        "block_configs": [block.block_config() for block in blocks],
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(sliced.dense.num_heads),
        "num_key_value_heads": None,
        "intermediate_size": None,
        "head_dim": int(sliced.head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": float(text.rms_norm_eps),
        "vocab_size": int(text.vocab_size),
        "max_position_embeddings": int(text.max_position_embeddings),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "initializer_range": float(getattr(text, "initializer_range", 0.02)),
        "torch_dtype": dtype,
        "use_cache": use_cache,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, key, None) is not None:
            config[key] = getattr(text, key)
    return config


#: (name, () → tensor, shape, dtype): one tensor of the checkpoint, made when it is written.
_Tensor = tuple[str, Callable[[], Any], tuple[int, ...], Any]


def _tensors(sliced: SliceResult, blocks: Sequence[NasBlock]) -> list[_Tensor]:
    """Every tensor of the checkpoint: each layer padded to its block's widths, no_op parts left out."""
    module = sliced.module
    d = sliced.head_dim
    embed = module.get_input_embeddings().weight
    by_prefix = {f"model.layers.{block.position}.": block for block in blocks}
    tensors: list[_Tensor] = []
    for name, tensor in module.state_dict().items():
        if name == "lm_head.weight" and tensor.data_ptr() == embed.data_ptr():
            continue  # tied: transformers re-ties it, vLLM skips lm_head when tie_word_embeddings
        prefix = name[: name.find(".", len("model.layers.")) + 1] if name.startswith("model.layers.") else ""
        block = by_prefix.get(prefix)
        if block is None:
            tensors.append((name, lambda t=tensor: t.detach().contiguous(), tuple(tensor.shape), tensor.dtype))
            continue
        local = name[len(prefix) :]
        if local.startswith(("self_attn.", "input_layernorm.")) and not block.group:
            continue  # no_op attention: vLLM builds no parameter for it (a tensor here would be unknown to it)
        if local.startswith(("mlp.", "post_attention_layernorm.")) and not block.ffn:
            continue
        shape = PaddedShape(block.kv_heads or 1, block.group or 1, block.ffn or 1)
        q_slots, kv_slots = head_slots(block.kept, shape)
        make, new_shape = padded_tensor(local, tensor, q_slots, kv_slots, shape, d)
        tensors.append((name, make, new_shape, tensor.dtype))
    return tensors


def _padding(sliced: SliceResult, blocks: Sequence[NasBlock], total: int) -> dict[str, Any]:
    """What the format's rules add over the sliced widths: zero query heads, kv slots and neurons (exact; every
    runtime computes them), in parameters and matmul FLOPs per token, absolute and as shares."""
    module = sliced.module
    hidden, d = int(text_config(module.config).hidden_size), sliced.head_dim
    kept = written = 0
    mlp: dict[str, list[int]] = {}
    heads: dict[str, list[int]] = {}
    for block in blocks:
        w = block.kept
        if block.group:  # a no_op part keeps nothing (its units were zero) and writes nothing
            kept += hidden * d * 2 * (w.num_heads + w.kv_heads)
            written += hidden * d * 2 * (block.heads + block.kv_heads)
            if (block.heads, block.kv_heads) != (w.num_heads, w.kv_heads):
                where = f"model.layers.{block.position}.self_attn"
                heads[where] = [w.num_heads, w.kv_heads, block.heads, block.kv_heads]
        if block.ffn:
            kept += 3 * hidden * w.intermediate
            written += 3 * hidden * block.ffn
            if block.ffn != w.intermediate:
                mlp[f"model.layers.{block.position}.mlp"] = [w.intermediate, block.ffn]
    added = written - kept
    head = module.get_output_embeddings()
    matmuls = written + (head.weight.numel() if head is not None else 0)
    return {
        "params_added": int(added),
        "params_share": round(added / total, 4) if total else 0.0,
        "flops_per_token_added": int(2 * added),
        "flops_share": round(added / matmuls, 4) if matmuls else 0.0,
        "padded_mlp": mlp,
        "padded_attention": heads,
        "note": "zero query heads (every attention layer has num_attention_heads), kv heads laid out in groups of "
        "n_heads_in_group, FFN widths rounded up to multiples of 256 with zero neurons (exact); [kept, written] per "
        "MLP, [q, kv kept, q, kv written] per attention",
    }


def write_nas_checkpoint(sliced: SliceResult, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Writes ``sliced`` as a nemotron-nas folder: config.json, safetensors (tensor by tensor), the two Python
    files of this project, generation config and tokenizer.

    Returns:
        The report section without its checks: blocks, per-layer widths, padding.

    Raises:
        UnsupportedModelError: a model whose layers a DeciLM block does not compute (:func:`_refusal`).
    """
    reason = _refusal(sliced)
    if reason:
        raise UnsupportedModelError(reason)
    module = sliced.module
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = nas_layout(sliced)
    tensors = _tensors(sliced, blocks)
    write_safetensors(out / "model.safetensors", tensors)
    config = _config_json(sliced, blocks, input_use_cache(module.config))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    source = Path(__file__).parent / "decilm"
    for name in _REMOTE_CODE:
        shutil.copyfile(source / name, out / name)
    generation = getattr(module, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    total = sum(math.prod(shape) for _, _, shape, _ in tensors)
    log.info("hf-nas/: %s", [(b.heads, b.kv_heads, b.ffn) for b in blocks])
    return {
        "written": True,
        "path": "hf-nas",
        "format": "nemotron-nas (DeciLMForCausalLM, per-layer block_configs)",
        "block_configs": [block.summary() for block in blocks],
        "per_layer": [[b.heads, b.kv_heads, b.ffn] for b in blocks],
        "attention_free_layers": [b.position for b in blocks if not b.group],
        "ffn_free_layers": [b.position for b in blocks if not b.ffn],
        "params": int(total),
        "padding": _padding(sliced, blocks, total),
        "files": sorted(p.name for p in out.iterdir()),
        "runtimes": dict(RUNTIMES),
        "not_checked": NOT_CHECKED,
    }


def _references(context: OutputContext) -> None:
    """The model's logits and greedy tokens for the reload check, shared with hf/ (the same key)."""
    context.torch.reference("hf", hf_reference)


def _check(context: OutputContext, section: dict[str, Any], reference: HFReference) -> OutputSection:
    """transformers (this folder's modeling code) against the model, run after the torch modules are freed: the
    verdict is the rules and the error within the compile's tolerance; greedy tokens are information."""
    context.progress("checking hf-nas/ with transformers (trust_remote_code)")
    problems = list(section["vllm_rules"]["problems"])
    try:
        check = check_hf_checkpoint(context.folder, reference, trust_remote_code=True)
    except Exception as exc:  # any error of transformers loading or running the folder is the check failing
        section["check"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        problems.append(
            f"transformers could not load or run hf-nas/ with trust_remote_code ({section['check']['error']})"
        )
        return OutputSection(section, check=OutputCheck(False, "; ".join(problems), "The folder is in hf-nas/."))
    section["check"] = check
    bound = float(context.options.tolerance)
    check["bound"] = bound
    check["passed"] = check["max_rel_diff"] <= bound
    if not check["passed"]:
        error = check["max_rel_diff"]
        problems.append(f"hf-nas/ differs from the model in transformers by {error:.3g} (bound {bound:g})")
    if problems:
        return OutputSection(section, check=OutputCheck(False, "; ".join(problems), "The folder is in hf-nas/."))
    return OutputSection(section, check=OutputCheck(True))


def _write(context: OutputContext) -> OutputSection:
    """The hf-nas/ writer: the sliced module (the plan repeated) written to the format's rules, the rules checked
    on the files at once, and transformers' reload check left for after the torch modules are freed."""
    models = context.torch
    sliced = models.sliced()
    reason = _refusal(sliced)
    if reason:
        raise UnsupportedModelError(reason)
    reference = models.reference("hf", hf_reference)
    context.progress("writing hf-nas/ (nemotron-nas checkpoint)")
    section = write_nas_checkpoint(sliced, models.tokenizer, context.folder)
    section["vllm_rules"] = check_vllm_rules(context.folder)
    models.note(section)
    if models.changed:
        section["compared_with"] = "the torch model with the approximate passes repeated (the model in model.onnx)"
    if models.half:
        dtype = str(sliced.module.dtype).removeprefix("torch.")
        section["precision_note"] = f"written in the checkpoint's {dtype}; checked in fp32"
    del sliced
    return OutputSection(section, later=lambda: _check(context, section, reference))


register_output(
    OutputSpec(
        name="hf_nas",
        folder="hf-nas",
        order=12,  # after hf/ (10), before gguf/ (15) and genai/ (20), which frees the torch modules
        summary="a nemotron-nas (DeciLMForCausalLM block_configs) checkpoint: per-layer widths for vLLM, TensorRT-LLM",
        write=_write,
        causal_lm=True,
        torch_module=True,
        option="hf_nemotron_nas",
        references=_references,
    )
)
