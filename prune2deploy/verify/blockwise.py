"""Block by block: for models whose two fp32 copies do not fit in memory at once.

Block ``k`` of each model computes the stream leaving layer ``k`` from the stream entering it (the first
block starts at the graph inputs, the last ends at the graph outputs). Both are fed the *reference's*
activation at the block's input, so each block's error is its own, and only one block's weights are in
memory at a time: each block's mapped pages are unmapped after it (else every page read stays resident, and
the last block holds both whole models: 26 GB at 8B bf16). Each block gets the same verdict as a whole model:
fp64 where its ops allow and its copy fits, else fp32 against the noise floor of the reference's block
(docs/exactness.md).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from prune2deploy.graph.mapped import release_mapped
from prune2deploy.ort_session import SessionRunner, make_session, release_memory
from prune2deploy.verify.compare import compare_outputs, keep_worst, relative_difference
from prune2deploy.verify.feeds import FeedSet, feed_sets
from prune2deploy.verify.precision import cast_float_feeds, fp64_blockers, to_fp64
from prune2deploy.verify.result import EXACT_TOLERANCE, Verification, bound_for
from prune2deploy.verify.whole import fp32_bytes

__all__ = ["BlockwiseUnavailable", "block_cuts", "verify_blockwise"]

log = logging.getLogger(__name__)


class BlockwiseUnavailable(Exception):
    """The compiled model's block boundaries do not match the reference's (say, layers were removed)."""


def block_cuts(reference: ir.Model, compiled: ir.Model) -> list[str]:
    """Names of the residual-stream values that leave each decoder (or residual) layer, in graph order.

    Raises:
        BlockwiseUnavailable: no layers found, a layer without a clear exit, or a boundary that the compiled
            model lacks or gives another shape (removed layers, pruned hidden channels).
    """
    from prune2deploy.analysis.blocks import find_layers

    layers = find_layers(reference)
    if not layers:
        raise BlockwiseUnavailable("no numbered layers with residual blocks were found")
    cuts = []
    for layer in layers:
        if layer.stream_out is None or not layer.stream_out.name:
            raise BlockwiseUnavailable(f"layer {layer.name}: {layer.reason or 'no clear output'}")
        cuts.append(layer.stream_out.name)
    theirs = {v.name: v for node in compiled.graph for v in node.outputs if v.name}
    ours = {v.name: v for node in reference.graph for v in node.outputs if v.name}
    for name in cuts:
        _check_cut(name, ours, theirs)
    outputs = {v.name for v in reference.graph.outputs}
    return [c for c in cuts if c not in outputs]


def _check_cut(name: str, ours: Mapping[str, ir.Value], theirs: Mapping[str, ir.Value]) -> None:
    if name not in theirs:
        raise BlockwiseUnavailable(f"the compiled model has no value '{name}' (a layer boundary)")
    producer = theirs[name].producer()
    if producer is not None and producer.domain not in ("", "ai.onnx"):
        # A fused kernel (SkipRMSNorm) computes the boundary together with what follows it: a block cut
        # there would re-run the previous layer's tail, and its errors would be charged to the next block.
        raise BlockwiseUnavailable(
            f"layer boundary '{name}' is computed inside the fused {producer.domain}.{producer.op_type} node "
            f"{producer.name!r}; verify the unfused graph (portable) block by block, or the whole model"
        )
    if ours[name].shape is not None and theirs[name].shape is not None and ours[name].shape != theirs[name].shape:
        raise BlockwiseUnavailable(f"'{name}' has shape {theirs[name].shape}, the reference's {ours[name].shape}")


def _block_precision(parts: Sequence[ir.Model], exact: bool, available: int | None) -> str:
    """fp64 for an exact pipeline's block whose ops all have double kernels and whose fp64 copy fits."""
    if not exact or any(fp64_blockers(p) for p in parts):
        return "fp32"
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    return "fp64" if 4 * max(fp32_bytes(p) for p in parts) <= 0.7 * available else "fp32"


def _block_session(part: ir.Model, precision: str, scratch: Path | None, *, optimize: bool = True):
    """A session of one block (its weights read, upcast to fp32 or widened to fp64), via a scratch file.

    Saved with its weights beside it and freed before ONNX Runtime reads it: as bytes, the part, its
    protobuf and the serialized string were three more copies of the block's weights beside the session's
    own (the embedding block of a 3B model: 1.6 GB each in fp32).
    """
    from onnx_ir.external_data import load_to_model

    from prune2deploy.frontends.onnx import save_onnx
    from prune2deploy.graph.segments import upcast_to_fp32

    part = load_to_model(part.clone())  # the caller's part stays mapped (it may be run again for the floor)
    if precision == "fp64":
        to_fp64(part)
    else:
        upcast_to_fp32(part)
    with tempfile.TemporaryDirectory(prefix="p2d-block-", dir=scratch) as folder:
        path = Path(folder) / "block.onnx"
        save_onnx(part, path, external_threshold=0)
        del part
        release_memory()
        return make_session(path, prepack=False, optimize=optimize)


def _run_block(session, ends: list[str], sets: Sequence[FeedSet], entering: list[dict], what: str) -> list[dict]:
    """The block's outputs on every feed set, fed the reference's activation at its input."""
    from prune2deploy.errors import VerificationError

    runner = SessionRunner(session, ends, only_known_inputs=True)
    results = []
    for (label, feeds), carried in zip(sets, entering, strict=True):
        try:
            results.append(runner.run(cast_float_feeds(session, {**feeds, **carried})))
        except Exception as exc:
            raise VerificationError(f"{what} on {label} failed: {exc}") from exc
    return results


def _block_floors(part: ir.Model, sets, entering, ends, ref_out, scratch, available) -> dict[str, float]:
    """The reference block's fp32 rounding: against its fp64 run, or its unoptimized fp32 run."""
    fp64 = _block_precision([part], True, available) == "fp64"
    try:
        session = _block_session(part, "fp64" if fp64 else "fp32", scratch, optimize=False)
    except Exception:
        session = _block_session(part, "fp32", scratch, optimize=False)
    others = _run_block(session, ends, sets, entering, "the reference's noise-floor run")
    del session
    release_memory()
    floors: dict[str, float] = {}
    for other, ours in zip(others, ref_out, strict=True):
        for name, value in relative_difference(other, ours).items():
            floors[name] = max(floors.get(name, 0.0), value)
    return floors


def _verify_block(
    models, index, start, ends, sets, entering, exact, scratch, available, *, force_fp32: bool = False
) -> tuple[dict, list]:
    """One block of both models: (its record, the reference's outputs that the next block is fed)."""
    from prune2deploy.graph.segments import segment

    inputs = [start] if start else []
    parts = [segment(model, inputs=inputs, outputs=ends) for model in models]
    precision = "fp32" if force_fp32 else _block_precision(parts, exact, available)
    outs = []
    for role, part in zip(("reference", "compiled model"), parts, strict=True):
        try:
            session = _block_session(part, precision, scratch)
        except Exception:
            if precision != "fp64":
                raise
            log.info("block %d: no fp64 session (%s); comparing it in fp32", index, precision)
            return _verify_block(models, index, start, ends, sets, entering, exact, scratch, available, force_fp32=True)
        outs.append(_run_block(session, ends, sets, entering, f"block {index} of the {role}"))
        del session
        release_memory()
    block = {"block": index, "input": start, "outputs": {}, "precision": precision}
    for ref_out, new_out in zip(*outs, strict=True):
        keep_worst(block["outputs"], compare_outputs(ref_out, new_out))
    values = [o["max_rel"] for o in block["outputs"].values()]
    block["max_rel"] = None if any(v is None for v in values) else max(values, default=0.0)
    if exact and precision == "fp32":
        block["floors"] = _block_floors(parts[0], sets, entering, ends, outs[0], scratch, available)
    for part in parts:  # the block's weights are the models' own mapped tensors: unmap the pages just read
        release_mapped(part)
    return block, outs[0]


def verify_blockwise(
    reference: ir.Model,
    compiled: ir.Model,
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
    progress=None,
    scratch: Path | None = None,
    available: int | None = None,
) -> Verification:
    """Reference and compiled model one block at a time; every block and the final outputs held to a bound.

    A block runs in fp64 when the pipeline is exact, its ops have double kernels and its copy fits in
    ``available`` bytes (the memory available now by default); otherwise in fp32, with the reference
    block's noise floor. Blocks are written to a temporary folder in ``scratch`` (the system's temporary
    folder by default) for ONNX Runtime to read, and deleted after.

    Raises:
        BlockwiseUnavailable: see :func:`block_cuts`.
    """
    cuts = block_cuts(reference, compiled)
    sets = feed_sets(reference, shapes=shapes, user_feeds=user_feeds, seed=seed)
    final = [v.name for v in reference.graph.outputs]
    verification = Verification(exact=exact, tolerance=tolerance, mode="blockwise")
    verification.feeds = [label for label, _ in sets]
    entering: list[dict[str, np.ndarray]] = [{} for _ in sets]  # the reference's stream at the block input
    bounds = [None, *cuts]
    for index, start in enumerate(bounds):
        ends = [cuts[index]] if index < len(cuts) else final
        args = (sets, entering, exact, scratch, available)
        block, ref_out = _verify_block((reference, compiled), index, start, ends, *args)
        floor = max(block.get("floors", {}).values(), default=None) if exact else None
        block["bound"] = bound_for(tolerance, floor)
        verification.blocks.append(block)
        entering = [{ends[0]: out[ends[0]]} for out in ref_out]
        if progress is not None:
            progress(f"verified block {index + 1}/{len(bounds)} (max relative error {block['max_rel']:.2g})")
    last = verification.blocks[-1]
    verification.outputs = dict(last["outputs"])
    verification.floors = dict(last.get("floors", {})) if exact else {}
    precisions = {b["precision"] for b in verification.blocks}
    verification.precision = precisions.pop() if len(precisions) == 1 else "mixed"
    log.info("blockwise verification: worst relative error %.3g over %d blocks", verification.worst, len(bounds))
    return verification
