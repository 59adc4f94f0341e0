"""Safe loading of ``.onnx`` files: clear errors for missing, corrupt or shape-less models.

The input file is only read. Values without shapes get them from ONNX shape inference, since the channel
analysis needs each tensor's rank and static widths.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.errors import BadInputError
from prune2deploy.limits import check_regular_file

__all__ = [
    "EXTERNAL_THRESHOLD",
    "check_external_data",
    "check_onnx",
    "ensure_shapes",
    "load_onnx",
    "save_onnx",
    "weight_bytes",
]

log = logging.getLogger(__name__)

_MAX_PROTO = 2**31 - 1


def load_onnx(path: Path | str) -> ir.Model:
    """Loads an ONNX file (external data next to it is memory-mapped, not copied).

    The file must pass ONNX's checker (:func:`check_onnx`) first: ONNX Runtime and this loader may read an
    invalid file differently (two initializers with one name: ONNX Runtime runs the first, onnx_ir keeps the
    last), and a reference read differently from the model it stands for can make a wrong compile PASS.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(_not_a_file(path))
    check_external_data(path)
    check_onnx(path)
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


def _not_a_file(path: Path) -> str:
    """Why ``path`` is not an ONNX file, and what to pass instead."""
    if path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf"))):
        return (
            f"{path} is a model folder, not an ONNX file; this command takes an .onnx file. Compile the folder "
            f"first (prune2deploy compile {path} --out OUT) and pass OUT/model.onnx (or OUT/reference.onnx)"
        )
    if path.is_dir() and (path / "model.onnx").is_file():
        return f"{path} is a folder; pass the ONNX file in it: {path / 'model.onnx'}"
    if path.is_dir():
        return f"{path} is a folder, not an ONNX file"
    return f"{path}: no such ONNX file"


_CHECK_LOCK = threading.Lock()


def check_onnx(path: Path) -> None:
    """Refuses a file that ONNX's checker rejects (``full_check``: with strict shape inference).

    The check reads the file by path, so external data is checked where it lies and models over 2 GB work.
    ONNX Runtime registers a few contrib ops in the default domain (``SimplifiedLayerNormalization``, which its
    fusions write): while the check runs they are known to the checker with ONNX Runtime's own schemas, so a
    graph fused for ONNX Runtime (this tool's ``model.onnx``) passes as ONNX Runtime would load it.
    """
    import onnx

    with _CHECK_LOCK, _ort_default_domain_schemas():
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            message = " ".join(str(exc).split())
            raise BadInputError(
                f"{path}: ONNX's checker rejects the model: {message[:400]}. ONNX Runtime and other tools may read "
                "an invalid file differently, so no result on it could be trusted; fix or re-export the model."
            ) from exc


@contextlib.contextmanager
def _ort_default_domain_schemas() -> Iterator[None]:
    """ONNX Runtime's default-domain ops that ONNX lacks, registered with onnx for the duration (then removed)."""
    from onnx import defs

    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c
    except ImportError:  # without onnxruntime its ops cannot be run either: the checker decides alone
        yield
        return
    added = []
    try:
        for schema in ort_c.get_all_operator_schema():
            if schema.domain == "" and not defs.has(schema.name):
                defs.register_schema(_onnx_schema(schema))
                added.append(schema.name)
        yield
    finally:
        for name in added:
            defs.deregister_schema(name, 1, "")


def _onnx_schema(schema: Any) -> Any:
    """An ``onnx.defs.OpSchema`` (since version 1) with the inputs, outputs and attributes of ONNX Runtime's."""
    from onnx import defs

    option = {0: defs.OpSchema.FormalParameterOption.Single, 1: defs.OpSchema.FormalParameterOption.Optional}
    variadic = defs.OpSchema.FormalParameterOption.Variadic

    def params(formal):
        return [
            defs.OpSchema.FormalParameter(
                p.name,
                p.typeStr,
                param_option=option.get(int(p.option), variadic),
                is_homogeneous=p.isHomogeneous,
                min_arity=1,
            )
            for p in formal
        ]

    return defs.OpSchema(
        schema.name, "", 1, inputs=params(schema.inputs), outputs=params(schema.outputs),
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in schema.type_constraints],
        attributes=[
            defs.OpSchema.Attribute(name, defs.OpSchema.AttrType(int(a.type)), "", required=a.required)
            for name, a in schema.attributes.items()
        ],
    )  # fmt: skip


def _external_tensors(graph) -> Iterator[tuple[str, dict[str, str]]]:
    """(tensor name, external_data entries: location, offset, length) of every external tensor:
    initializers, Constant attributes, subgraphs."""
    from onnx import AttributeProto, TensorProto

    def tensors(g):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                yield from attr.tensors
                if attr.type == AttributeProto.GRAPH:
                    yield from tensors(attr.g)
                for sub in attr.graphs:
                    yield from tensors(sub)

    for tensor in tensors(graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, entries


def check_external_data(path: Path) -> None:
    """Refuses external-data locations that leave the model's folder, before a byte of them is read.

    A location is relative to the model's folder (ONNX's rule); an absolute one, one with ``..`` that climbs
    out, or a symlink that points out would make loading read any file the user can read.
    """
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BadInputError(
            f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]}). "
            "Re-export it, or check the file was copied completely."
        ) from exc
    base = path.resolve().parent
    for name, entries in _external_tensors(proto.graph):
        location = entries.get("location", "")
        where = (base / location).resolve() if location else None
        if not location or Path(location).is_absolute() or where is None or not where.is_relative_to(base):
            raise BadInputError(
                f"{path}: tensor '{name}' keeps its data at external location '{location}', outside the model's "
                f"folder {base}; refusing to read it. External data must lie in the model's folder "
                "(re-save the model with onnx.save(..., save_as_external_data=True) next to it)."
            )
        if where.exists():  # a missing file is the checker's to report
            info = check_regular_file(where, what=f"{path}: tensor '{name}' has external data at")
            _check_extent(path, name, entries, info.st_size)


def _check_extent(path: Path, name: str, entries: dict[str, str], size: int) -> None:
    """An external tensor's ``offset`` and ``length`` lie inside its file (read with neither: a cut or edited
    file would be read past its end, or a length of 10^15 allocated)."""
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else max(size - offset, 0)
    except ValueError:
        raise BadInputError(
            f"{path}: tensor '{name}' has external data offset/length {entries.get('offset')!r}/"
            f"{entries.get('length')!r}, which are not whole numbers; re-save the model"
        ) from None
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(
            f"{path}: tensor '{name}' has external data at bytes {offset}..{offset + length} of "
            f"{entries['location']}, which holds {size} bytes; the data file is cut or belongs to another model. "
            "Copy it completely or re-save the model"
        )


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


#: Models with more weight bytes than this are saved with their weights in ``<name>.data`` beside them.
EXTERNAL_THRESHOLD = 1 << 30


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers (as stored: bf16 counts 2 bytes a weight)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model: ir.Model, path: Path, *, external_threshold: int | None = None) -> int:
    """Saves ``model`` self-contained and returns the bytes written (model file + weight file).

    Models with over ``external_threshold`` bytes of weights (default :data:`EXTERNAL_THRESHOLD`; 0 forces
    it), or whose weights are already external, keep them in ``<name>.data`` beside the model file, named
    relatively: the pair can be moved together. Weights are never left pointing at another model's data
    file (the input's, or a previous save's), and the model is never serialized as one protobuf message
    above the 2 GB limit. Tensors are streamed to disk one at a time (onnx_ir's writer), so saving costs
    no copy of the model.
    """
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    threshold = EXTERNAL_THRESHOLD if external_threshold is None else external_threshold
    external = any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    ) or weight_bytes(model) > min(threshold, _MAX_PROTO // 2)
    data_path = path.parent / (path.name + ".data")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        if external:
            # A stale data file of an earlier save would be replaced under tensors that still read it.
            if data_path.exists() and _reads(model, data_path):
                raise ValueError(f"{path}: the model reads its weights from {data_path}, which saving would replace")
            # Tensors of up to 1 KB (shape constants, axes) stay inline: ONNX Runtime's shape inference reads them.
            with _contiguous_when_written(model):
                ir.save(model, tmp, external_data=data_path.name, size_threshold_bytes=1024)
        else:
            data_path.unlink(missing_ok=True)
            ir.save(model, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: name the file being written, not the scratch name (or none)
        Path(tmp).unlink(missing_ok=True)
        if exc.filename in (None, tmp, str(data_path.name)):
            written = data_path if external else path
            raise OSError(exc.errno, exc.strerror or str(exc), str(written)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size + (data_path.stat().st_size if data_path.exists() else 0)


@contextlib.contextmanager
def _contiguous_when_written(model: ir.Model) -> Iterator[None]:
    """Strided numpy weights are written as a contiguous copy made for the write and dropped after it.

    The exporter's constant folding leaves each transposed MatMul weight as a numpy *view* of the torch
    weight, and numpy's ``tofile`` writes a non-contiguous array element by element: caching an 8B bf16
    export spent ~140 s writing 16 GB that way. A lazy tensor copies one weight at a time, so this costs no
    more memory than the largest weight.
    """
    import numpy as np

    swapped: list[tuple[ir.Value, ir.Tensor]] = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.Tensor) else None
        if isinstance(raw, np.ndarray) and not raw.flags.c_contiguous:
            swapped.append((value, tensor))
            value.const_value = ir.LazyTensor(
                lambda t=tensor: ir.Tensor(_contiguous(t.numpy()), dtype=t.dtype, name=t.name),
                dtype=tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
            )
    try:
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _contiguous(array: Any) -> Any:
    """A C-ordered copy of the strided ``array``, made by torch through an integer view of its bits.

    numpy copies a transposed view element by element (and ml_dtypes' bfloat16 through its user-dtype path):
    160 MB/s on an 8B model's MLP weight, where torch's blocked, threaded copy runs at ~1 GB/s.
    """
    import numpy as np

    integer = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}.get(array.dtype.itemsize)
    if integer is None:
        return np.ascontiguousarray(array)
    bits = array.view(integer)
    try:
        import torch

        copied = torch.from_numpy(bits).contiguous().numpy()
    except (ImportError, ValueError):  # no torch, or strides torch cannot take (negative)
        copied = np.ascontiguousarray(bits)
    return copied.view(array.dtype)


def _reads(model: ir.Model, data_path: Path) -> bool:
    target = data_path.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve() == target:
            return True
    return False
