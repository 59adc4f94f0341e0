"""The compile pipeline: the selected passes, in registry order, inside one onnx_ir PassManager.

un-share constants (when a pass slices them) → the selected passes → re-share equal constants → remove unused
nodes and opsets.

Each pass returns a :class:`~prune2deploy.passes.base.P2DResult`; the pipeline hands them all back in a
:class:`PipelineResult`, so the report renders every pass the same way and exactness is judged per pass
and per run (a pass that changed nothing does not relax the check of the others).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import onnx_ir.passes
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from prune2deploy.errors import P2DError
from prune2deploy.graph.mapped import release_mapped
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import get_pass
from prune2deploy.passes.sharing import ReshareInitializersPass, UnshareInitializersPass

__all__ = ["PipelineResult", "build_passes", "convert_precision", "run_pipeline"]


@dataclass
class PipelineResult(onnx_ir.passes.PassResult):
    """The model after the pipeline and each selected pass's result, in the order they ran."""

    passes: list[P2DResult] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Every pass that ran was exact in this run."""
        return all(result.exact for result in self.passes)

    @property
    def approximate_passes(self) -> list[str]:
        return [result.name for result in self.passes if not result.exact]

    def records(self) -> list[dict[str, Any]]:
        return [result.as_dict() for result in self.passes]


class _Collected(onnx_ir.passes.InPlacePass):
    """Runs one pass inside the PassManager and keeps its typed result for the pipeline's caller.

    After the pass the model's memory-mapped weights are unmapped: the pages a pass read (every MLP weight,
    for remove-channels) would otherwise stay resident through every later pass and the save, beside the
    new tensors the passes make (8B: 16 GB of mapped reference pages + 7.6 GB of new tensors, 23.3 GB).
    A weight read again is mapped again.
    """

    def __init__(self, inner: P2DPass, sink: list[P2DResult]) -> None:
        super().__init__()
        self.inner = inner
        self.sink = sink

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        result = self.inner(model)
        self.sink.append(result)
        release_mapped(model)
        return result

    def __repr__(self) -> str:
        return repr(self.inner)


def build_passes(options: Any) -> list[P2DPass]:
    """Configured pass instances for ``options.passes`` (names, already in pipeline order)."""
    return [get_pass(name).build(options) for name in options.passes]


def run_pipeline(model: ir.Model, passes: Sequence[P2DPass], *, progress: Any = None) -> PipelineResult:
    """Runs ``passes`` on ``model`` in place between the sharing and cleanup passes.

    A prune2deploy error raised inside a pass (bad input such as a plan naming a missing layer) comes out
    as itself, not wrapped in onnx_ir's PassError, so the CLI gives it its exit code.
    """
    results: list[P2DResult] = []
    steps = [_Announced(pass_, progress) if progress else pass_ for pass_ in passes]
    unshare = [UnshareInitializersPass()] if any(p.unshare_constants for p in passes) else []
    manager = onnx_ir.passes.PassManager(
        [
            *unshare,
            *(_Collected(step, results) for step in steps),
            ReshareInitializersPass(),
            RemoveUnusedNodesPass(),
            RemoveUnusedOpsetsPass(),
        ],
        steps=1,
    )
    try:
        outcome = manager(model)
    except onnx_ir.passes.PassError as exc:
        user_error = _user_error(exc)
        if user_error is not None:
            raise user_error.with_traceback(user_error.__traceback__) from None
        raise
    return PipelineResult(outcome.model, outcome.modified, passes=results)


class _Announced(P2DPass):
    """Says which pass starts (progress lines for long pipelines), then runs it."""

    def __init__(self, inner: P2DPass, progress: Any) -> None:
        super().__init__()
        self.inner = inner
        self.progress = progress
        self.name = inner.name  # type: ignore[misc]

    def call(self, model: ir.Model) -> P2DResult:
        self.progress(f"pass {self.inner.name}")
        return self.inner(model)

    def __repr__(self) -> str:
        return repr(self.inner)


def _user_error(exc: BaseException) -> P2DError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, P2DError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def convert_precision(model: ir.Model, precision: str, keep_fp32_ops: Iterable[str] | None = None) -> dict[str, Any]:
    """Converts ``model`` in place to fp16/bf16 with the convert-precision pass; returns its record.

    Engines whose precision comes from tensor types (TensorRT 11, TensorRT-RTX, the torch engine) receive
    this function in their build options instead of importing the pass: precision conversion belongs to the
    pipeline, engines only ask for it.
    """
    from prune2deploy.passes.precision import ConvertPrecisionPass

    kwargs = {} if keep_fp32_ops is None else {"keep_fp32_ops": keep_fp32_ops}
    return ConvertPrecisionPass(precision, **kwargs)(model).record
