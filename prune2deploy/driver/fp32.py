"""fp32 copies of half-precision graphs, for the optional steps that run whole models on ONNX Runtime's CPU.

ONNX Runtime's CPU provider has no bf16 kernels for elementwise ops ("Could not find an implementation for
Mul(14)"), so a bf16 ``model.onnx`` cannot be profiled or measured for quality as it is. Verification
already computes half graphs in fp32; profiling and quality do the same through a copy written once into
the staging folder (weights upcast one tensor at a time while the copy is written, never all at once) and
removed before the output folder is finished. The copy is made only where two whole fp32 models fit in
memory (verification then ran whole models, not block by block); otherwise the steps say why they were
skipped.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["Fp32Copies", "Fp32Unavailable"]

log = logging.getLogger(__name__)


class Fp32Unavailable(Exception):
    """A half-precision graph needs an fp32 copy to run here, and this compile cannot make one (the reason)."""


class Fp32Copies:
    """Hands ONNX Runtime's CPU a runnable path for each model: the model itself, or its fp32 copy.

    Args:
        folder: where copies are written (inside the staging folder); removed by :meth:`remove`.
        refused: why copies cannot be made here ('' when they can).
        external_threshold: the compile's external-data threshold for the copies.
    """

    def __init__(self, folder: Path, *, refused: str = "", external_threshold: int | None = None) -> None:
        self.folder = Path(folder)
        self.refused = refused
        self.threshold = external_threshold
        self._copies: dict[Path, Path] = {}

    @property
    def made(self) -> bool:
        """Whether any model was run as an fp32 copy (the steps' sections say so)."""
        return any(copy != path for path, copy in self._copies.items())

    def runnable(self, path: Path | str) -> Path:
        """``path`` itself when it runs on the CPU as it is, else its fp32 copy (written on first use).

        Raises:
            Fp32Unavailable: ``path`` is half precision and no copy can be made here.
        """
        path = Path(path)
        if path in self._copies:
            return self._copies[path]
        from prune2deploy.graph.segments import has_half

        if not has_half(ir.load(str(path))):  # external weights are not read
            self._copies[path] = path
            return path
        if self.refused:
            raise Fp32Unavailable(self.refused)
        target = self.folder / str(len(self._copies)) / path.name
        log.info("writing an fp32 copy of %s for ONNX Runtime's CPU provider", path.name)
        _write_fp32_copy(path, target, self.threshold)
        self._copies[path] = target
        return target

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._copies.clear()


def _write_fp32_copy(source: Path, target: Path, threshold: int | None) -> None:
    """``source`` computed in fp32, saved at ``target``: each half weight is upcast when it is written."""
    from prune2deploy.frontends.onnx import load_onnx, save_onnx
    from prune2deploy.graph.segments import HALF, upcast_to_fp32

    model = load_onnx(source)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in HALF:
            value.const_value = ir.LazyTensor(
                lambda t=tensor: ir.tensor(np.asarray(t.numpy()).astype(np.float32), name=t.name),
                dtype=ir.DataType.FLOAT,
                shape=tensor.shape,
                name=tensor.name,
            )
    upcast_to_fp32(model)  # value types, Casts and tensor attributes; the weights are already fp32 (lazily)
    save_onnx(model, target, external_threshold=threshold)
