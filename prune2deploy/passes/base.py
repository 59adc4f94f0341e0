"""The pass contract: an onnx_ir in-place pass with a name, an exactness flag and a record.

Every pass says what it did (counts, removed indices) in ``self.record`` so that the report can show it,
and whether it is *exact* (outputs unchanged up to float rounding) or approximate (error reported).
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes

__all__ = ["P2DPass", "PassResult"]

PassResult = onnx_ir.passes.PassResult


class P2DPass(onnx_ir.passes.InPlacePass):
    """Base of prune2deploy's passes.

    Subclasses set ``name`` (kebab-case, the CLI key) and ``exact``, configure themselves in ``__init__``
    and do their work in ``call(model)``. ``record`` is reset at each call and filled through
    :meth:`add_record`.
    """

    name: ClassVar[str] = "p2d-pass"
    exact: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.record: dict[str, Any] = {}

    def __call__(self, model_or_result: ir.Model | PassResult, /) -> PassResult:
        self.record = {"pass": self.name, "exact": self.exact}
        return super().__call__(model_or_result)

    def add_record(self, **items: Any) -> None:
        """Adds items to what this pass reports about its last run."""
        self.record.update(items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
