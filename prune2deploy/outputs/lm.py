"""The causal-LM outputs of a compile: ``genai/`` and ``hf/``, both from one physical slicing of the model."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from prune2deploy.errors import UnsupportedModelError

__all__ = ["write_lm_outputs"]

log = logging.getLogger(__name__)


def write_lm_outputs(
    module: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    genai: bool,
    hf_checkpoint: bool,
    context_length: int | None = None,
    tolerance: float = 1e-4,
    progress: Any = None,
) -> dict[str, Any]:
    """Slices ``module`` (masked) once and writes the requested folders; returns their report sections.

    A folder that cannot be written (an architecture the slicer or the decoder builder does not cover,
    per-layer widths a transformers config cannot express) gets ``written: False`` and the reason; the
    rest of the compile is unaffected.
    """
    from prune2deploy.outputs.slice import slice_causal_lm

    say = progress or (lambda _msg: None)
    sections: dict[str, Any] = {}
    try:
        say("slicing the masked model physically (torch)")
        sliced = slice_causal_lm(module)
    except UnsupportedModelError as exc:
        reason = str(exc)
        for key, wanted in (("genai", genai), ("hf", hf_checkpoint)):
            if wanted:
                sections[key] = {"written": False, "reason": reason}
        return sections
    if hf_checkpoint:
        from prune2deploy.outputs.hf import write_hf_checkpoint

        say("writing hf/ (transformers checkpoint) and reloading it")
        sections["hf"] = write_hf_checkpoint(sliced, tokenizer, out_dir / "hf", reference=module)
    if genai:
        from prune2deploy.outputs.genai import check_genai_folder, write_genai_folder

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
            section = check_genai_folder(out_dir / "genai", module, section, tolerance=tolerance)
        sections["genai"] = section
    return sections
