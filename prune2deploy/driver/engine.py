"""The compile's engine step: build the chosen engine and, where it runs here, check it against the reference.

The engine's availability is checked before the model is loaded (:func:`check_engine_available`, minutes
saved when it is missing) and again before building, with one message. A build that fails is an error (the
user asked for that engine); its check against the masked reference is optional — an engine that cannot
run here is not checked, and one whose check breaks (rather than finding a difference) is reported as that
step's error, the finished outputs kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.errors import EngineUnavailable, VerificationError

__all__ = ["EngineStep", "build_engine", "check_engine_available", "deployment_axes"]

log = logging.getLogger(__name__)

_DEFAULT_MAX_BATCH = 8
_DEFAULT_MAX_SEQ = 2048


@dataclass
class EngineStep:
    """The engine's report section and its check against the reference.

    Attributes:
        verification: the check (a :class:`prune2deploy.verify.Verification`); None where it was not run.
        failure: the engine's outputs could not be compared (it does not run on the check's feeds): a failed
            check, like a difference.
        error: the check itself broke (not a finding about the engine): reported, the outputs kept.
    """

    section: dict[str, Any]
    verification: Any = None
    failure: str | None = None
    error: str | None = None

    def problem(self) -> str | None:
        """Why the engine fails its check, in words; None when it passed or was not checked."""
        if self.failure:
            return self.failure
        check = self.verification
        if check is None or check.passed:
            return None
        worst = check.worst
        return "; ".join(check.problems) or ("error inf/NaN" if worst == float("inf") else f"error {worst:.3g}")


def check_engine_available(options: Any) -> Any:
    """The configured engine, which must be able to build on this machine.

    Raises:
        EngineUnavailable: what is missing and how to install it.
    """
    from prune2deploy.engines.registry import make_engine

    engine = make_engine(options.engine)
    availability = engine.available()
    if not availability.can_build:
        raise EngineUnavailable(
            f"engine {options.engine} cannot build here: {availability.reason}. {availability.install_hint}"
        )
    return engine


def deployment_axes(options: Any, max_positions: int | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the batch and sequence axes an engine's optimization profile accepts.

    ``options.shapes`` wins per axis. The defaults fit a deployment, not the profiling point: batch 1 to
    max(8, largest profiled batch), sequence 1 to the model's maximum positions capped at 2048 (never below
    the largest profiled sequence); opt is the first profiled shape, where the engine is tuned.
    """
    batches, seqs = options.profile_batches, options.profile_seqs
    longest = min(max_positions or _DEFAULT_MAX_SEQ, _DEFAULT_MAX_SEQ)
    axes = {
        "batch": (1, batches[0], max(_DEFAULT_MAX_BATCH, *batches)),
        "seq": (1, seqs[0], max(longest, *seqs)),
    }
    axes.update({axis: tuple(span) for axis, span in options.shapes.items()})
    return axes


def build_engine(
    options: Any,
    model_path: Path,
    staging: Path,
    reference_path: Path,
    reference: ir.Model,
    user_feeds: list,
    *,
    exact: bool,
    sparse_weights: bool,
    max_positions: int | None = None,
) -> EngineStep:
    """Builds the chosen engine and, where it can run on this machine, verifies it against the reference."""
    from prune2deploy.engines.base import BuildOptions
    from prune2deploy.pipeline import convert_precision

    engine = check_engine_available(options)
    inputs = []
    for value in ir.load(str(model_path)).graph.inputs:
        if value.shape is not None:
            inputs.append((value.name, [d if isinstance(d, int) else None for d in value.shape]))
    axes = deployment_axes(options, max_positions) if engine.needs_shape_ranges else {}
    shape_ranges = engine.shape_ranges(inputs, batches=options.profile_batches, seqs=options.profile_seqs, axes=axes)
    built = engine.build(
        model_path,
        BuildOptions(
            precision=options.precision,
            sparse_weights=sparse_weights,
            shape_ranges=shape_ranges,
            work_dir=staging / "engine",
            extra=dict(options.engine_options),
            convert_precision=convert_precision,
        ),
    )
    section: dict[str, Any] = {
        "engine": built.engine,
        "artifact": str(built.artifact.relative_to(staging)) if built.artifact else None,
        "info": built.info,
    }
    if axes:
        section["shapes"] = {axis: list(span) for axis, span in axes.items()}
        section["shape_ranges"] = {name: [list(s) for s in spans] for name, spans in shape_ranges.items()}
    step = EngineStep(section)
    try:
        step.verification = _verify_engine(engine, built, reference_path, reference, user_feeds, options, exact)
    except VerificationError as exc:
        step.failure = str(exc)
    except Exception as exc:  # an optional check: the engine is built, the outputs stay
        step.error = f"{type(exc).__name__}: {str(exc)[:500]}"
        log.warning("the %s engine could not be checked against the reference: %s", options.engine, step.error)
    section["verification"] = step.verification.as_dict() if step.verification is not None else None
    if step.failure or step.error:
        section["verification_error"] = step.failure or step.error
    return step


def _verify_engine(
    engine, built, reference_path: Path, reference: ir.Model, user_feeds: list, options: Any, exact: bool
):
    """The engine's outputs against the masked reference (ONNX Runtime CPU fp32), where it runs here.

    Exact only when the pipeline was exact and the engine runs fp32; half precision is reported as
    approximate (its error, not a verdict).
    """
    from prune2deploy.ort_session import SessionRunner, make_session
    from prune2deploy.verify import OutputRunner, feed_sets, noise_floors, verify_runners

    if not engine.available().can_run:
        return None
    exact = exact and options.precision == "fp32"
    sets = feed_sets(reference, user_feeds=user_feeds)
    # Engines run in fp32 here: an exact verdict is bounded by the reference's own rounding noise
    # (docs/exactness.md), measured first so that one reference session exists at a time.
    floors = noise_floors(reference_path, sets)[0] if exact else None
    reference_runner = SessionRunner(make_session(reference_path, prepack=False))
    try:
        with engine.runner(built) as runner:
            runner_: OutputRunner = runner
            result = verify_runners(
                reference_runner,
                runner_,
                sets,
                exact=exact,
                tolerance=options.tolerance,
                outputs=reference_runner.names,
                floors=floors,
            )
    except EngineUnavailable as exc:  # built here, runs elsewhere (a GPU engine)
        log.info("engine %s not verified here: %s", engine.name, exc)
        return None
    return result
