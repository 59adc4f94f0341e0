"""The causal-LM outputs of a compile: ``genai/`` and ``hf/``, both from one physical slicing of the model."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.fp32 import computing_in_fp32, is_half_precision

__all__ = ["write_lm_outputs"]

log = logging.getLogger(__name__)


def write_lm_outputs(
    load_module: Callable[[], tuple[Any, Any]],
    out_dir: Path,
    *,
    genai: bool,
    hf_checkpoint: bool,
    context_length: int | None = None,
    tolerance: float = 1e-4,
    progress: Any = None,
) -> dict[str, Any]:
    """Slices the masked module once and writes the requested folders; returns their report sections.

    ``load_module`` returns (masked module, tokenizer). It is a callable so that this function holds the only
    reference the compile keeps to the module and can free it as soon as it has what it needs of it: the
    sliced copy, hf/'s check and the masked model's outputs on genai/'s check inputs. At 1B parameters that
    is 4.9 GB not held beside the sliced module, the written decoder and ONNX Runtime's copy of it.

    A folder that cannot be written (an architecture the slicer or the decoder builder does not cover,
    per-layer widths a transformers config cannot express) gets ``written: False`` and the reason; the
    rest of the compile is unaffected.
    """
    from prune2deploy.outputs.slice import slice_causal_lm

    say = progress or (lambda _msg: None)
    sections: dict[str, Any] = {}
    module, tokenizer = load_module()
    try:
        say("slicing the masked model physically (torch)")
        sliced = slice_causal_lm(module)
    except UnsupportedModelError as exc:
        reason = str(exc)
        for key, wanted in (("genai", genai), ("hf", hf_checkpoint)):
            if wanted:
                sections[key] = {"written": False, "reason": reason}
        return sections
    half = is_half_precision(module)
    if hf_checkpoint:
        from prune2deploy.outputs.hf import write_hf_checkpoint

        say("writing hf/ (transformers checkpoint) and reloading it")
        sections["hf"] = write_hf_checkpoint(sliced, tokenizer, out_dir / "hf", reference=module)
        if half:
            sections["hf"]["precision_note"] = (
                f"written in the checkpoint's {str(module.dtype).removeprefix('torch.')}; checked in fp32"
            )
    if genai:
        from prune2deploy.outputs.genai import check_genai_folder, reference_outputs, write_genai_folder

        with computing_in_fp32(module):  # the fp32 decoder is checked against the masked model in fp32
            expected = reference_outputs(module)
        del module  # the masked model's last use: the sliced copy shares only what slicing left unchanged
        gc.collect()
        say("writing genai/ (GroupQueryAttention decoder)")
        try:
            section = write_genai_folder(sliced, tokenizer, out_dir / "genai", context_length=context_length)
            section["written"] = True
        except UnsupportedModelError as exc:
            section = {"written": False, "reason": str(exc)}
        del sliced  # the checks load the written decoder; the sliced weights are not needed any more
        gc.collect()
        if section["written"]:
            say("checking genai/ against the masked model (ONNX Runtime, then onnxruntime-genai)")
            section = check_genai_folder(out_dir / "genai", expected, section, tolerance=tolerance)
            if half:
                section["precision_note"] = "fp32 decoder built from a half-precision checkpoint (upcast per tensor)"
        sections["genai"] = section
    return sections
