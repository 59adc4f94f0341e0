"""The pass contract: an onnx_ir in-place pass that returns what it did as a typed value.

A pass is configured in ``__init__`` and does its work in ``call(model)``, which returns a
:class:`P2DResult`: whether the model changed, whether *this run* was exact (outputs unchanged up to float
rounding), the record of what it did (counts, removed indices: the report shows it), and one standard
``refused`` mapping — where (a node, a group, a layer) → why not, in words a user can act on. There is no
other way for a pass to say "cannot": no exceptions for unsupported patterns, no mutable state left on the
pass object after a run. Bad *input* (a plan naming a layer that does not exist) is still an error
(:mod:`prune2deploy.errors`), raised from ``requires()`` or ``call()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes

from prune2deploy.errors import P2DError

__all__ = ["P2DPass", "P2DResult"]


@dataclass
class P2DResult(onnx_ir.passes.PassResult):
    """What one run of a pass did.

    Attributes:
        exact: for this run. A run that changed nothing is exact, whatever the pass could have done, so an
            approximate pass that found nothing to do never relaxes the verification of the others.
        record: what the pass did, for the report (JSON-serialisable values).
        refused: where → reason for everything the pass would have changed but did not.
    """

    exact: bool = True
    record: dict[str, Any] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.modified:
            self.exact = True

    def as_dict(self) -> dict[str, Any]:
        """The report's entry for this run: the same shape for every pass."""
        return {
            "pass": self.name,
            "exact": self.exact,
            "modified": self.modified,
            "record": self.record,
            "refused": dict(self.refused),
        }


class P2DPass(onnx_ir.passes.InPlacePass):
    """Base of prune2deploy's passes.

    Subclasses set ``name`` (kebab-case, the registry and CLI key), configure themselves in ``__init__``
    and return :meth:`result` from ``call(model)``.
    """

    name: ClassVar[str] = "p2d-pass"
    #: Whether the pipeline gives each reader of a shared constant its own initializer before this pass runs.
    #: Channel analysis needs it (a shared tensor couples its readers' groups); a rewrite that does not slice
    #: constants must not get it: onnxscript's optimizer folds ``Transpose`` of a single-use initializer, so
    #: a tied embedding's un-shared lm_head copy would be stored a second time, transposed.
    unshare_constants: ClassVar[bool] = True

    def __call__(self, model_or_result: ir.Model | onnx_ir.passes.PassResult, /) -> onnx_ir.passes.PassResult:
        """Runs the pass; bad input found by ``requires()`` keeps its own error type (and so its exit code)
        instead of onnx_ir's generic PreconditionError."""
        try:
            return super().__call__(model_or_result)
        except onnx_ir.passes.PreconditionError as exc:
            if isinstance(exc.__cause__, P2DError):
                raise exc.__cause__ from None
            raise

    def result(
        self,
        model: ir.Model,
        *,
        modified: bool,
        exact: bool = True,
        refused: Mapping[str, str] | None = None,
        **record: Any,
    ) -> P2DResult:
        """Builds this pass's result; ``record`` holds the counts and details for the report."""
        return P2DResult(
            model,
            modified=modified,
            exact=exact,
            record=record,
            refused={str(k): str(v) for k, v in (refused or {}).items()},
            name=self.name,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
