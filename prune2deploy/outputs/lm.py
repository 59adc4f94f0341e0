"""The causal-LM outputs of a compile: ``genai/`` and ``hf/``, both from one physical slicing of the model."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.fp32 import computing_in_fp32, is_half_precision

__all__ = ["not_written", "write_lm_outputs"]

log = logging.getLogger(__name__)


def not_written(reason: str, *, genai: bool, hf: bool) -> dict[str, Any]:
    """The report sections of the LM folders that were asked for and are not written, with the reason."""
    return {key: {"written": False, "reason": reason} for key, on in (("genai", genai), ("hf", hf)) if on}


def write_lm_outputs(
    load_module: Callable[[], tuple[Any, Any]],
    out_dir: Path,
    *,
    genai: bool,
    hf_checkpoint: bool,
    context_length: int | None = None,
    tolerance: float = 1e-4,
    progress: Any = None,
    regroup: dict[str, Any] | None = None,
    drop_layers: Sequence[int] = (),
    compiled_model: Path | None = None,
) -> dict[str, Any]:
    """Slices the masked module once and writes the requested folders; returns their report sections.

    ``load_module`` returns (masked module, tokenizer). It is a callable so that this function holds the only
    reference the compile keeps to the module and can free it as soon as it has what it needs of it: the
    sliced copy, hf/'s check and the masked model's outputs on genai/'s check inputs. At 1B parameters that
    is 4.9 GB not held beside the sliced module, the written decoder and ONNX Runtime's copy of it.

    ``regroup`` (``kv_heads``, ``grouping``, ``method`` of the ``regroup-gqa`` pass, and for similarity grouping
    the ``orders`` its record holds) repeats that pass on the sliced model (:mod:`prune2deploy.outputs.regroup`);
    ``drop_layers`` (decoder-layer indices, the depth plan of ``remove-layers``) deletes those layers from it
    (:mod:`prune2deploy.outputs.depth`). Both folders are then that changed model: genai/ is checked against
    it and against ``compiled_model`` (the compile's ``model.onnx``), hf/ against it.

    A folder that cannot be written (an architecture the slicer or the decoder builder does not cover,
    per-layer widths a transformers config cannot express) gets ``written: False`` and the reason; the
    rest of the compile is unaffected.
    """
    from prune2deploy.outputs.slice import slice_causal_lm

    say = progress or (lambda _msg: None)
    sections: dict[str, Any] = {}
    module, tokenizer = load_module()
    regrouped = dropped = None
    try:
        say("slicing the masked model physically (torch)")
        sliced = slice_causal_lm(module)
        if drop_layers:  # the graph's order: remove-layers runs before regroup-gqa
            from prune2deploy.outputs.depth import drop_sliced_layers

            dropped = drop_sliced_layers(sliced, drop_layers)
        if regroup is not None:  # layers keep their original indices (the pass's names) in sliced.layers
            from prune2deploy.outputs.regroup import regroup_sliced

            regrouped = regroup_sliced(sliced, **regroup)
    except UnsupportedModelError as exc:
        return not_written(str(exc), genai=genai, hf=hf_checkpoint)
    in_torch = regrouped is not None or dropped is not None  # approximate passes repeated on the module
    half = is_half_precision(module)
    if genai:
        from prune2deploy.outputs.genai import check_memory_shortfall

        shortfall = check_memory_shortfall(sliced)
        if shortfall:
            log.warning(shortfall)
            sections["genai"] = {"written": False, "reason": shortfall}
            genai = False
    if hf_checkpoint:
        from prune2deploy.outputs.hf import write_hf_checkpoint

        say("writing hf/ (transformers checkpoint) and reloading it")
        # after regrouping or a depth plan, the model to compare with is the changed one (not the masked module)
        reference = sliced.module if in_torch else module
        sections["hf"] = write_hf_checkpoint(sliced, tokenizer, out_dir / "hf", reference=reference)
        del reference
        _note_torch_changes(sections["hf"], regrouped, dropped)
        if half:
            sections["hf"]["precision_note"] = (
                f"written in the checkpoint's {str(module.dtype).removeprefix('torch.')}; checked in fp32"
            )
    if genai:
        from prune2deploy.outputs.genai import check_genai_folder, reference_outputs, write_genai_folder

        target = sliced.module if in_torch else module
        with computing_in_fp32(target):  # the fp32 decoder is checked against the masked model in fp32
            expected = reference_outputs(target)
        del module, target  # the masked model's last use: the sliced copy shares only what slicing left unchanged
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
            section = check_genai_folder(
                out_dir / "genai",
                expected,
                section,
                tolerance=tolerance,
                compiled_model=compiled_model if in_torch else None,
            )
            _note_torch_changes(section, regrouped, dropped)
            if half:
                section["precision_note"] = "fp32 decoder built from a half-precision checkpoint (upcast per tensor)"
        sections["genai"] = section
    return sections


def _note_torch_changes(section: dict[str, Any], regrouped: dict | None, dropped: dict | None) -> None:
    """Says in a folder's report section which approximate passes were repeated on the torch module."""
    if regrouped is not None:
        section["regrouped"] = regrouped
    if dropped is not None:
        section["depth_plan"] = dropped
