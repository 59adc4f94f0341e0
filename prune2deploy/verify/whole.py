"""Whole models, one after the other: the reference's outputs, then the compiled model's, then the verdict.

Only one session exists at a time, so verification needs the memory of the larger model, not of both.
An exact pipeline is compared in fp64 where ONNX Runtime's CPU kernels allow it and the fp64 copy fits
(float rounding there is ~1e-14, far below any tolerance), otherwise in fp32 against a noise floor measured
on the reference itself (:func:`noise_floors`). Approximate pipelines are compared in fp32: their error is
what a deployment sees, and it is reported, not judged.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from prune2deploy.ort_session import SessionRunner, make_session, release_memory
from prune2deploy.verify.compare import compare_outputs, keep_worst, relative_difference
from prune2deploy.verify.feeds import FeedSet, feed_sets
from prune2deploy.verify.precision import cast_float_feeds, fp64_blockers, to_fp64
from prune2deploy.verify.result import EXACT_TOLERANCE, Verification

__all__ = [
    "OutputRunner",
    "choose_mode",
    "choose_precision",
    "fp32_bytes",
    "noise_floors",
    "verify_models",
    "verify_runners",
]

log = logging.getLogger(__name__)

Source = ir.Model | bytes | Path


class OutputRunner(Protocol):
    """What verification needs of an engine: outputs by name for feeds by name."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def fp32_bytes(model: ir.Model) -> int:
    """Bytes of ``model``'s weights once in fp32 (what an ONNX Runtime CPU session of it holds)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes * (2 if tensor.dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16) else 1)
    return total


def _available() -> int:
    import psutil

    return psutil.virtual_memory().available


def choose_mode(reference: ir.Model, compiled: ir.Model, requested: str = "auto", available: int | None = None) -> str:
    """``whole`` when one fp32 session of the larger model (and, for half models, its upcast copy) fits
    comfortably in the memory available now; ``blockwise`` otherwise, or when ``requested`` says so."""
    if requested != "auto":
        return requested
    from prune2deploy.graph.segments import has_half

    available = _available() if available is None else available
    size = max(fp32_bytes(reference), fp32_bytes(compiled))
    half = has_half(reference) or has_half(compiled)
    # ORT may prepack MatMul weights (a second copy); an upcast half model is also serialized once.
    needed = size * (3 if half else 2)
    if half and size > 1 << 30:
        return "blockwise"
    return "whole" if needed <= 0.7 * available else "blockwise"


def _fp64_fits(models: Sequence[ir.Model], available: int | None) -> bool:
    """An fp64 copy is built in memory (2× fp32) and then loaded by its session (2× again), one model at a time."""
    available = _available() if available is None else available
    return 4 * max(fp32_bytes(m) for m in models) <= 0.7 * available


def choose_precision(*models: ir.Model, available: int | None = None) -> tuple[str, str | None]:
    """``("fp64", None)`` when every model runs in fp64 on ONNX Runtime's CPU kernels and fits in memory;
    otherwise ``("fp32", why)``, ``why`` being the note the report carries."""
    blockers = sorted({op for m in models for op in fp64_blockers(m)})
    if blockers:
        return "fp32", f"compared in fp32 with a measured noise floor: no fp64 CPU kernel for {', '.join(blockers)}"
    if not _fp64_fits(models, available):
        return "fp32", "compared in fp32 with a measured noise floor: an fp64 copy would not fit in memory"
    return "fp64", None


def _as_ir(model: Source) -> ir.Model:
    """The graph (weights mapped, not read) of a path, bytes or model, for decisions made before any run."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, Path):
        return ir.load(str(model))
    import onnx

    return ir.from_proto(onnx.load_from_string(model))


def _session_source(model: Source) -> bytes | Path:
    """What ONNX Runtime loads in fp32: a path as is (its external data beside it), a model serialized.

    Half-precision models are run in fp32 (ONNX Runtime's CPU provider lacks most bf16 kernels): they are
    upcast in memory, which callers keep to models small enough for that (``choose_mode``).
    """
    from prune2deploy.graph.segments import has_half, upcast_to_fp32

    if isinstance(model, Path):
        loaded = ir.load(str(model))
        if not has_half(loaded):
            return model
        model = loaded
    if isinstance(model, ir.Model):
        from onnx_ir.external_data import load_to_model

        model = load_to_model(model.clone())  # bytes carry no folder to resolve external data against
        if has_half(model):
            upcast_to_fp32(model)
        return ir.to_proto(model).SerializeToString()
    return model


def _fp64_session(model: Source):
    """An fp64 copy of ``model``, written to a scratch folder for ONNX Runtime to read, then deleted.

    Saved with its weights beside it rather than serialized: bytes would be more copies of the fp64 weights
    (and a protobuf is capped at 2 GB); ONNX Runtime holds its own copy once the session exists.
    """
    from prune2deploy.frontends.onnx import save_onnx

    copy = _as_ir(model)
    copy = copy.clone() if copy is model else copy  # never widen the caller's model
    to_fp64(copy)
    with tempfile.TemporaryDirectory(prefix="p2d-fp64-") as folder:
        path = Path(folder) / "model.onnx"
        save_onnx(copy, path, external_threshold=0)
        del copy
        release_memory()
        return make_session(path, prepack=False)


def _run_all(
    model: Source,
    sets: Sequence[FeedSet],
    role: str,
    *,
    input_model: bool = False,
    precision: str = "fp32",
    optimize: bool = True,
) -> tuple[SessionRunner, list[dict]]:
    """One session, every feed set; the caller drops the session before the next model's (one in memory)."""
    from prune2deploy.errors import BadInputError, VerificationError

    try:
        if precision == "fp64":
            session = _fp64_session(model)
        else:
            session = make_session(_session_source(model), prepack=False, optimize=optimize)
    except Exception as exc:
        if precision != "fp64" and (role == "reference" or input_model):
            raise BadInputError(f"ONNX Runtime cannot load the {role}: {str(exc)[:300]}") from exc
        raise
    runner = SessionRunner(session)
    results = []
    for label, feeds in sets:
        try:
            results.append(runner.run(cast_float_feeds(session, feeds)))
        except Exception as exc:
            error = BadInputError if role == "reference" else VerificationError
            raise error(f"the {role} does not run on {label}: {str(exc)[:300]}") from exc
    return runner, results


def _run_pair(reference: Source, compiled: Source, sets, precision: str, compiled_is_input: bool):
    """Both models' outputs on every feed set, one session at a time; their interfaces must agree.

    Raises:
        _NoFp64: in fp64, when either model does not load or run there (a kernel or type the kernel listing
            did not foresee); the caller compares in fp32 instead, where the same failure is an error.
    """
    runs = []
    for role, model, is_input in (("reference", reference, False), ("compiled model", compiled, compiled_is_input)):
        try:
            runner, outs = _run_all(model, sets, role, input_model=is_input, precision=precision)
        except Exception as exc:
            if precision != "fp64":
                raise
            raise _NoFp64(f"{role}: {str(exc)[:200]}") from exc
        runs.append((sorted(runner.input_names), runner.names, outs))
        del runner
        release_memory()  # the reference's weights leave before the compiled model's arrive
    (ref_inputs, names, ref_outs), (new_inputs, new_names, new_outs) = runs
    if ref_inputs != new_inputs or sorted(names) != sorted(new_names):
        from prune2deploy.errors import BadInputError

        raise BadInputError(
            f"the models have different inputs or outputs ({new_inputs} → {sorted(new_names)} vs the "
            f"reference's {ref_inputs} → {sorted(names)}); are these two versions of the same model?"
        )
    return names, ref_outs, new_outs


class _NoFp64(Exception):
    """An fp64 session could not be made or run; the comparison falls back to fp32."""


def noise_floors(
    reference: Source,
    sets: Sequence[FeedSet],
    fp32_outputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    available: int | None = None,
) -> tuple[dict[str, float], str]:
    """How far float rounding alone moves the reference's fp32 outputs, per output (worst over feed sets).

    Measured as the fp32 run against the same graph in fp64 where it can run there (the fp32 run's whole
    rounding error), else against the same graph run without ONNX Runtime's optimizations (fused and
    unfused kernels round differently; a weaker floor, see docs/exactness.md). ``fp32_outputs`` are the
    reference's optimized fp32 outputs on ``sets`` when the caller already has them.

    Returns:
        (floors by output name, how they were measured: ``fp64`` or ``unoptimized fp32``).
    """
    graph = _as_ir(reference)
    if fp32_outputs is None:
        _, fp32_outputs = _run_all(reference, sets, "reference")
    how = "fp64" if not fp64_blockers(graph) and _fp64_fits([graph], available) else "unoptimized fp32"
    try:
        precision = "fp64" if how == "fp64" else "fp32"
        _, others = _run_all(reference, sets, "reference", precision=precision, optimize=False)
    except Exception:
        if how != "fp64":
            raise
        how = "unoptimized fp32"
        _, others = _run_all(reference, sets, "reference", optimize=False)
    release_memory()
    floors: dict[str, float] = {}
    for other, ours in zip(others, fp32_outputs, strict=True):
        for name, value in relative_difference(other, ours).items():
            floors[name] = max(floors.get(name, 0.0), value)
    return floors, how


def verify_runners(
    reference: OutputRunner,
    compiled: OutputRunner,
    sets: Sequence[FeedSet],
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    outputs: Sequence[str] | None = None,
    floors: Mapping[str, float] | None = None,
) -> Verification:
    """Runs both runners on every feed set and keeps each output's worst error.

    Runners compute in whatever precision they run in (fp32 for engines), so an exact verdict here needs
    the reference's ``floors`` (:func:`noise_floors`) to tell rounding from error; without them the bound is
    the bare tolerance, which a deep model's fp32 rounding can exceed.
    """
    from prune2deploy.errors import BadInputError, VerificationError

    verification = Verification(exact=exact, tolerance=tolerance, floors=dict(floors or {}))
    for label, feeds in sets:
        try:
            ref_out = reference.run(feeds)
        except Exception as exc:
            raise BadInputError(f"the reference does not run on {label}: {str(exc)[:300]}") from exc
        try:
            new_out = compiled.run(feeds)
        except Exception as exc:
            raise VerificationError(f"the compiled model does not run on {label}: {str(exc)[:300]}") from exc
        if outputs is not None:
            ref_out = {name: ref_out[name] for name in outputs}
        verification.feeds.append(label)
        missing = [name for name in ref_out if name not in new_out]
        if missing:
            raise BadInputError(
                f"the compiled model has no output {missing[0]!r} of the reference "
                f"(its outputs: {sorted(new_out)}); are these two versions of the same model?"
            )
        keep_worst(verification.outputs, compare_outputs(ref_out, new_out))
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(sets))
    return verification


def _range_notes(probe: ir.Model, user_feeds) -> list[str]:
    from prune2deploy.feeds import unknown_ranges

    return [
        f"input '{name}': its value range cannot be derived from the graph (not an index into a constant "
        "table, not compared with a constant, not cast to float), so random feeds held it at 0"
        + ("" if user_feeds else "; give --feeds with real values to verify what depends on it")
        for name in unknown_ranges(probe)
    ]


def verify_models(
    reference: Source,
    compiled: Source,
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
    probe: ir.Model | None = None,
    compiled_is_input: bool = False,
    precision: str = "auto",
) -> Verification:
    """Both models on ONNX Runtime CPU, one after the other: random feeds for ``probe``'s inputs
    (``reference`` itself when it is an onnx_ir model) + the user's.

    ``precision`` ``auto`` compares an exact pipeline in fp64 where it can (:func:`choose_precision`) and in
    fp32 against the reference's noise floor otherwise; ``fp32`` forces the latter. Paths are handed to
    ONNX Runtime as paths (their external data stays on disk, mapped) when compared in fp32.
    """
    probe = probe if probe is not None else reference if isinstance(reference, ir.Model) else None
    sets = feed_sets(probe, shapes=shapes, user_feeds=user_feeds, seed=seed)
    chosen, why = ("fp32", None) if not exact or precision == "fp32" else (precision, None)
    if chosen == "auto":
        chosen, why = choose_precision(_as_ir(reference), _as_ir(compiled))
    if chosen == "fp64":
        try:
            names, ref_outs, new_outs = _run_pair(reference, compiled, sets, "fp64", compiled_is_input)
        except _NoFp64 as exc:
            chosen, why = "fp32", f"compared in fp32 with a measured noise floor: fp64 failed ({exc})"
            log.info("fp64 verification not possible (%s); comparing in fp32", exc)
    if chosen == "fp32":
        names, ref_outs, new_outs = _run_pair(reference, compiled, sets, "fp32", compiled_is_input)
    verification = Verification(exact=exact, tolerance=tolerance, mode="whole", precision=chosen)
    for (label, _), ref_out, new_out in zip(sets, ref_outs, new_outs, strict=True):
        verification.feeds.append(label)
        keep_worst(verification.outputs, compare_outputs({n: ref_out[n] for n in names}, new_out))
    if exact and chosen == "fp32":
        verification.floors, how = noise_floors(reference, sets, ref_outs)
        reason = f"{why}; " if why else ""
        verification.notes.append(f"{reason}noise floor measured against the reference in {how}")
    if probe is not None:
        verification.notes.extend(_range_notes(probe, user_feeds))
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(sets))
    return verification
