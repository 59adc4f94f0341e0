"""Safe loading of ``.onnx`` files: clear errors for missing, corrupt or shape-less models.

The input file is only read. Values without shapes get them from ONNX shape inference, since the channel
analysis needs each tensor's rank and static widths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from prune2deploy.errors import BadInputError

__all__ = ["ensure_shapes", "load_onnx", "save_onnx"]

log = logging.getLogger(__name__)

_MAX_PROTO = 2**31 - 1


def load_onnx(path: Path | str) -> ir.Model:
    """Loads an ONNX file (external data next to it is memory-mapped, not copied)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such ONNX file")
    try:
        model = ir.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError, onnx_ir errors
        raise BadInputError(
            f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]}). "
            "Re-export it, or check the file was copied completely."
        ) from exc
    if len(model.graph) == 0:
        raise BadInputError(f"{path}: the ONNX graph has no nodes")
    ensure_shapes(model, source=str(path))
    return model


def ensure_shapes(model: ir.Model, *, source: str = "<model>") -> None:
    """Runs shape inference when some node outputs carry no shape."""
    missing = sum(1 for node in model.graph for out in node.outputs if out.shape is None)
    if not missing:
        return
    log.info("%s: %d values lack shapes; running ONNX shape inference", source, missing)
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass()(model)
    except Exception as exc:
        log.warning("%s: shape inference failed (%s); analysis will block what it cannot see", source, exc)


def save_onnx(model: ir.Model, path: Path, *, external_threshold: int = 1 << 30) -> None:
    """Saves atomically; models with over ``external_threshold`` bytes of weights keep them in a side file."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        if weight_bytes > external_threshold:
            data_name = path.name + ".data"
            ir.save(model, tmp, external_data=data_name)
            os.replace(Path(path.parent, data_name), path.parent / data_name)
        else:
            ir.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
