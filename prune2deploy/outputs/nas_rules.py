"""What vLLM's ``nemotron_nas`` reader builds from a ``block_configs`` config.json, rebuilt from its source.

vLLM and TensorRT-LLM are not installable here, so ``hf-nas/`` is checked against their reader's rules instead:
the FFN width it computes from ``ffn_mult``, the parameters it creates per layer, and the configs it would not
build as written. The writer (:mod:`prune2deploy.outputs.hf_nas`) uses the width rule to choose ``ffn_mult`` and
runs :func:`check_vllm_rules` on every folder it writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FFN_MULTIPLE", "VLLM_READER", "check_vllm_rules", "vllm_ffn_width", "vllm_nemotron_nas_tensors"]

#: Where the rules of :func:`check_vllm_rules` were read (the reader itself is not installed here).
VLLM_READER = "vllm/model_executor/models/nemotron_nas.py (vllm-project/vllm 00bd1493b3e8)"

FFN_MULTIPLE = 256


def vllm_ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width vLLM's reader builds from ``ffn_mult`` (its ``_ffn_mult_to_intermediate_size``, the same in
    TensorRT-LLM): ``int(2 * ffn_mult * hidden / 3)``, then up to a multiple of 256 unless it is one.

    Written here as vLLM writes it, apart from the folder's own ``configuration_decilm.ffn_width`` (which cannot
    import prune2deploy), so that the rule check does not share a mistake with the code it checks.
    """
    width = int(2 * ffn_mult * hidden_size / 3)
    return width if width % FFN_MULTIPLE == 0 else width + FFN_MULTIPLE - width % FFN_MULTIPLE


def vllm_nemotron_nas_tensors(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """What vLLM's nemotron_nas reader will build from ``config`` (config.json): its parameters in the
    checkpoint's names (before vLLM stacks q/k/v and gate/up), name → shape.

    Mirrors ``DeciLMDecoderLayer`` of :data:`VLLM_READER`: a layer whose ``attention.no_op`` is false gets
    ``num_attention_heads`` query heads and ``num_attention_heads // n_heads_in_group`` kv heads of ``head_dim``
    (else ``hidden_size // num_attention_heads``) with an ``input_layernorm``; an FFN whose ``no_op`` is false gets
    ``_ffn_mult_to_intermediate_size(ffn_mult)`` neurons with a ``post_attention_layernorm``; biases where
    ``attention_bias`` / ``mlp_bias``; ``lm_head`` unless ``tie_word_embeddings``.
    """
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    d = int(config.get("head_dim") or hidden // heads)
    vocab = int(config["vocab_size"])
    attention_bias = bool(config.get("attention_bias") or config.get("bias"))
    qkv_bias = bool(config.get("qkv_bias", attention_bias))
    mlp_bias = bool(config.get("mlp_bias"))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i, block in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        attention, ffn = block["attention"], block["ffn"]
        if not attention["no_op"]:
            kv = heads // int(attention["n_heads_in_group"])
            shapes[p + "input_layernorm.weight"] = (hidden,)
            for proj, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
                shapes[f"{p}self_attn.{proj}.weight"] = (rows, hidden)
                if qkv_bias:
                    shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * d)
            if attention_bias:
                shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if not ffn["no_op"]:
            width = vllm_ffn_width(float(ffn["ffn_mult"]), hidden)
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
            for proj, shape in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden))):
                shapes[f"{p}mlp.{proj}.weight"] = shape
            shapes[p + "mlp.down_proj.weight"] = (hidden, width)
            if mlp_bias:
                for proj, rows in (("gate_proj", width), ("up_proj", width), ("down_proj", hidden)):
                    shapes[f"{p}mlp.{proj}.bias"] = (rows,)
    return shapes


def _rule_problems(config: Mapping[str, Any]) -> list[str]:
    """What in config.json vLLM's reader would not build as written (before any shape is compared)."""
    problems = []
    heads = int(config.get("num_attention_heads") or 0)
    blocks = config.get("block_configs") or []
    if config.get("model_type") != "nemotron-nas" or "DeciLMForCausalLM" not in (config.get("architectures") or []):
        problems.append("config.json: model_type must be nemotron-nas and architectures DeciLMForCausalLM")
    if len(blocks) != config.get("num_hidden_layers"):
        problems.append(f"{len(blocks)} block_configs for num_hidden_layers={config.get('num_hidden_layers')}")
    if str(config.get("hidden_act", "silu")) != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')}: vLLM's LlamaMLP supports silu only")
    for i, block in enumerate(blocks):
        attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
        where = f"block_configs[{i}]"
        if attention.get("replace_with_linear") or ffn.get("replace_with_linear"):
            problems.append(f"{where}: replace_with_linear, which vLLM's reader ignores (it builds a full block)")
        if not attention.get("no_op"):
            group = attention.get("n_heads_in_group")
            if not group or heads % int(group):
                problems.append(f"{where}: n_heads_in_group={group} does not divide {heads} query heads")
        elif i == 0:
            problems.append(f"{where}: attention no_op in layer 0 (vLLM's layer 0 starts the residual in its norm)")
        if not ffn.get("no_op") and ffn.get("ffn_mult") is None:
            problems.append(f"{where}: an FFN without ffn_mult (TensorRT-LLM reads the width only from ffn_mult)")
    return problems


def _stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the folder's safetensors files (headers only; no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_vllm_rules(folder: Path) -> dict[str, Any]:
    """Checks ``folder`` against what vLLM's nemotron_nas reader will build from its config.json: the rules
    (every attention layer with all query heads, ``n_heads_in_group`` dividing them, FFN widths from ``ffn_mult``,
    layer 0 with attention) and, tensor by tensor, the shapes it creates against the stored ones (vLLM fails on a
    stored tensor it has no parameter for, and leaves a parameter without a tensor uninitialised)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    problems = _rule_problems(config)
    if not problems:
        want, have = vllm_nemotron_nas_tensors(config), _stored_shapes(Path(folder))
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problems.append(f"{name}: vLLM builds it as {list(want[name])}, the checkpoint has no such tensor")
            elif name not in want:
                problems.append(f"{name}: stored {list(have[name])}, but vLLM builds no such parameter")
            elif want[name] != have[name]:
                problems.append(f"{name}: vLLM builds {list(want[name])}, the checkpoint stores {list(have[name])}")
    return {"reader": VLLM_READER, "passed": not problems, "problems": problems}
