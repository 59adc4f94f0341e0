"""The compile's verification step: ``model.onnx`` against the masked reference, and the finishing passes'
fall-back.

Finishing passes (registry stage ``finishing``: fuse-ort, pack-matmuls) rewrite the finished graph for one
runtime. Whether they can run is decided before they run: block-by-block verification cuts the graph at each
layer's residual output, which the fused SkipRMSNorm kernels compute inside themselves, so with it they are
not run and the report says why (:class:`SkippedPass`). When they ran and the finished graph does not load or
verify, the unfused graph replaces it, and their results are replaced by results that say so
(:func:`verify_finished`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.errors import BadInputError, EngineUnavailable
from prune2deploy.graph.mapped import release_mapped

__all__ = ["SkippedPass", "blockwise", "release_mapped", "verify_against_reference", "verify_finished"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedPass:
    """A selected pass the driver decided not to run, and why; its report entry has the shape of a result's
    (``record.skipped``, the reason in ``refused.model``), and it never ran, so it changed nothing."""

    name: str
    reason: str
    modified: bool = False
    exact: bool = True

    @property
    def refused(self) -> dict[str, str]:
        return {"model": self.reason}

    def as_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "exact": True,
            "modified": False,
            "record": {"skipped": True},
            "refused": self.refused,
        }


def blockwise(reference: ir.Model, compiled: ir.Model, options: Any) -> bool:
    """Whether verification will go block by block (two whole fp32 models do not fit, or it was asked for)."""
    from prune2deploy.verify import choose_mode

    return choose_mode(reference, compiled, options.verify_mode) == "blockwise"


def verify_against_reference(
    reference: ir.Model,
    compiled: ir.Model,
    paths: tuple[Path, Path],
    *,
    exact: bool,
    user_feeds: Sequence[Any],
    options: Any,
    progress: Callable[[str], None],
) -> Any:
    """Whole models one after the other when they fit, else block by block (``options.verify_mode``).

    ``paths`` are the reference's and the compiled model's files, which whole-model verification hands to
    ONNX Runtime.
    """
    from prune2deploy.verify import BlockwiseUnavailable, choose_mode, verify_blockwise, verify_models

    reference_path, model_path = paths
    if choose_mode(reference, compiled, options.verify_mode) == "blockwise":
        progress("verifying against the masked reference, block by block")
        try:
            return verify_blockwise(
                reference,
                compiled,
                exact=exact,
                tolerance=options.tolerance,
                user_feeds=user_feeds,
                progress=progress,
                scratch=reference_path.parent,  # the staging folder: beside the outputs, removed with it
            )
        except BlockwiseUnavailable as exc:
            if options.verify_mode == "blockwise":
                raise EngineUnavailable(f"block-by-block verification is not possible here: {exc}") from exc
            log.warning("block-by-block verification not possible (%s); verifying whole models", exc)
    progress("verifying against the masked reference")
    # Both models' mapped weights were read by the passes; unmap them so ONNX Runtime's copy is the only one.
    release_mapped(reference)
    return verify_models(
        reference_path, model_path, exact=exact, tolerance=options.tolerance, user_feeds=user_feeds, probe=reference
    )


def verify_finished(
    verify: Callable[[ir.Model], Any],
    finished: ir.Model,
    unfinished: ir.Model,
    results: Sequence[Any],
    finishing: Sequence[str],
    save: Callable[[ir.Model], None],
    progress: Callable[[str], None],
) -> tuple[Any, ir.Model, list[Any]]:
    """Verifies the finished (fused) model.onnx; where ONNX Runtime cannot load it or it fails, falls back.

    onnxscript's fusions are pattern rewrites of an exported graph; on some graphs they produce one ONNX
    Runtime refuses (GPT-2's Gemm after the attention fusion: "Input 0 expected to have rank 2"). That is a
    per-model fact, not a reason to fail the compile: the unfinished graph is written (``save``) and verified
    instead, and each finishing pass that changed the graph gets a new result saying what failed
    (``record.fell_back``, ``refused.model``; it is no longer modified, so no longer approximate).

    Returns:
        (verification, the model now in model.onnx, the pass results).
    """
    try:
        verification = verify(finished)
        failure = (
            None
            if verification.passed
            else ("; ".join(verification.problems) or f"differs from the masked reference by {verification.worst:.3g}")
        )
    except BadInputError as exc:  # ONNX Runtime cannot load the fused graph
        failure = str(exc)
    if failure is None:
        return verification, finished, list(results)
    log.warning("the ORT-fused model.onnx failed (%s); writing the unfused graph instead", failure)
    progress("fused graph failed to load or verify; falling back to the unfused graph")
    why = f"fused graph failed, model.onnx is the unfused graph: {failure[:500]}"
    fell_back = [
        dataclasses.replace(
            r, modified=False, exact=True, record={**r.record, "fell_back": True}, refused={**r.refused, "model": why}
        )
        if r.name in finishing and r.modified
        else r
        for r in results
    ]
    save(unfinished)
    return verify(unfinished), unfinished, fell_back
