"""``OUT/hf/``: a physically smaller transformers checkpoint that other runtimes' converters can take.

vLLM, TensorRT-LLM and llama.cpp's converters read a transformers folder, not an ONNX graph, so the pruning
has to be physical there too: the config states the new widths and the safetensors hold only what is kept.
A transformers config has one width per kind for all layers; when the layers differ, the checkpoint cannot
be described and is not written — the result names the layers instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.outputs.fp32 import computing_in_fp32
from prune2deploy.outputs.registry import OutputContext, OutputSection, OutputSpec, register_output
from prune2deploy.outputs.slice import SliceResult

__all__ = ["check_hf_checkpoint", "write_hf_checkpoint"]

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
        layers' widths differ, ``written`` is False and ``reason``/``layers`` say which.
    """
    section: dict[str, Any] = {"path": "hf", **sliced.summary()}
    if not sliced.uniform:
        section.update(written=False, reason=sliced.nonuniform_reason(), nonuniform_layers=sliced.nonuniform_layers())
        log.warning("hf checkpoint not written: %s", section["reason"])
        return section
    module = sliced.module
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = module.config
    # a GGUF-loaded model carries a quantizer and its config; its weights are de-quantised, plain tensors now
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(module, "hf_quantizer", None) is not None:
        module.hf_quantizer = None
    if getattr(module, "is_quantized", False):
        module.is_quantized = False
    module.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    section["written"] = True
    section["files"] = sorted(p.name for p in out.iterdir())
    if reference is not None:
        section["check"] = check_hf_checkpoint(out, reference)
    return section


def check_hf_checkpoint(folder: Path, reference: Any, *, seq: int = 16, new_tokens: int = 8) -> dict[str, Any]:
    """Reloads ``folder`` with ``AutoModelForCausalLM`` and compares logits and greedy tokens with ``reference``."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = getattr(reference, "module", reference)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(reference.parameters()).dtype).eval()
    vocab = int(reference.config.get_text_config(decoder=True).vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq), generator=gen)
    # Half-precision models are compared in fp32: the narrower GEMMs round differently in bf16, which would
    # flip near-tied greedy tokens without either model being wrong.
    with torch.no_grad(), computing_in_fp32(reference), computing_in_fp32(loaded):
        want = reference(input_ids=ids, use_cache=False).logits.float().numpy()
        got = loaded(input_ids=ids, use_cache=False).logits.float().numpy()
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
        ref_tokens = reference.generate(input_ids=ids[:1], **kwargs)
        new_tokens_out = loaded.generate(input_ids=ids[:1], **kwargs)
    scale = float(np.abs(want).max()) or 1.0
    return {
        "max_abs_diff": float(np.abs(want - got).max()),
        "max_rel_diff": float(np.abs(want - got).max() / scale),
        "greedy_tokens_equal": bool(torch.equal(ref_tokens, new_tokens_out)),
        "tokens_compared": new_tokens,
        "params": int(sum(p.numel() for p in loaded.parameters())),
    }


def _write(context: OutputContext) -> OutputSection:
    """The hf/ writer: the sliced module (the plan repeated) saved and reloaded; its check is information
    (reported numbers and greedy tokens), not a verdict."""
    models = context.torch
    sliced = models.sliced()
    context.progress("writing hf/ (transformers checkpoint) and reloading it")
    # after regrouping or a depth plan, the model to compare with is the changed one (not the masked module)
    section = write_hf_checkpoint(sliced, models.tokenizer, context.folder, reference=models.target())
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
        uniform_widths=True,
        option="hf_checkpoint",
    )
)
