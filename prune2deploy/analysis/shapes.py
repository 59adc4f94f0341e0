"""Concrete shapes of every value of a model at one input shape.

Costs and predictions need static shapes, but exported models have dynamic batch and sequence dims.
The input dims are fixed first (explicit shapes, or a batch and sequence length applied to the dynamic
dims), then ONNX shape inference with data propagation fills in what it can. Exported transformer graphs
compute some shapes at run time (Range, masks, NonZero) that inference cannot resolve; for those the model
is run once in ONNX Runtime on random feeds with the unresolved values exposed as outputs. That run is
exact but costs one forward pass and memory for those intermediates (and a serialised copy of the model),
so it is only done for models whose weights fit in ``fallback_max_bytes``; above that the values stay
unknown and are listed in ``ShapeInfo.unknown``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from prune2deploy.errors import BadInputError
from prune2deploy.feeds import feed_specs, random_feeds

__all__ = ["ShapeInfo", "concrete_shapes", "input_shapes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeInfo:
    """Concrete shapes and dtypes of a model's values at one input shape.

    Attributes:
        shapes: Value name -> static shape, for every value whose shape is known.
        dtypes: Value name -> element type, where known.
        source: ``"inference"``, or ``"inference+onnxruntime"`` when the fallback run filled gaps.
        unknown: Names of node outputs whose shape stayed unknown.
    """

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, ir.DataType]
    source: str
    unknown: tuple[str, ...] = ()


def input_shapes(
    model: ir.Model, shapes: Mapping[str, Sequence[int]] | None, batch: int, seq: int
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every graph input: explicit ``shapes`` first, else batch/seq on dynamic dims."""
    result: dict[str, tuple[int, ...]] = {}
    specs = {spec.name: spec for spec in feed_specs(model)}
    unknown = set(shapes or {}) - set(specs)
    if unknown:
        raise BadInputError(
            f"shapes name inputs the model does not have: {sorted(unknown)}; its inputs are {sorted(specs)}"
        )
    for name, spec in specs.items():
        if shapes and name in shapes:
            shape = tuple(int(d) for d in shapes[name])
            if len(shape) != len(spec.dims):
                raise BadInputError(
                    f"input '{name}' has rank {len(spec.dims)} ({spec.dims}) but the given shape is {shape}"
                )
            for dim, given in zip(spec.dims, shape, strict=True):
                if isinstance(dim, int) and dim != given:
                    raise BadInputError(f"input '{name}' has static dims {spec.dims}; the given shape is {shape}")
            result[name] = shape
        else:
            result[name] = spec.concrete_shape(batch, seq)
    return result


def _infer(model: ir.Model, inputs: Mapping[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """ONNX shape inference with data propagation at fixed input dims; returns static shapes and dtypes."""
    from onnx_ir.passes.common import _c_api_utils  # drops big initializers around the C call

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        for value in proto.graph.input:
            if value.name in inputs:
                dims = value.type.tensor_type.shape.dim
                del dims[:]
                for size in inputs[value.name]:
                    dims.add().dim_value = size
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        inferred = _c_api_utils.call_onnx_api(infer, model)
    except Exception as exc:  # onnx raises InferenceError and friends
        log.warning("shape inference failed (%s); trying ONNX Runtime for shapes", exc)
        return dict(inputs), {}
    shapes: dict[str, tuple[int, ...]] = dict(inputs)
    dtypes: dict[str, ir.DataType] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            dtypes[info.name] = ir.DataType(tensor_type.elem_type)
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims) and info.name not in shapes:
            shapes[info.name] = tuple(int(d.dim_value) for d in dims)
    return shapes, dtypes


def _feeds(model: ir.Model, inputs: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random feeds at exactly ``inputs``' shapes, reusing :func:`random_feeds`' value conventions."""
    overrides: dict[str, int] = {}
    batch, seq = 1, 1
    for spec in feed_specs(model):
        for index, (dim, size) in enumerate(zip(spec.dims, inputs[spec.name], strict=True)):
            if isinstance(dim, str):
                overrides[dim] = size
            elif dim is None:
                batch, seq = (size, seq) if index == 0 else (batch, size)
    feeds = random_feeds(model, batch=batch, seq=seq, seed=seed, overrides=overrides)
    for name, array in feeds.items():
        if array.shape != inputs[name]:
            raise BadInputError(f"cannot build a feed of shape {inputs[name]} for input '{name}'")
    return feeds


def _cpu_session(model: bytes):
    """An ONNX Runtime CPU session with the options every part of the tool uses (``ort_session``)."""
    from prune2deploy.ort_session import make_session

    return make_session(model)


def _run_for_shapes(
    model: ir.Model, inputs: Mapping[str, tuple[int, ...]], names: Sequence[str], seed: int
) -> tuple[dict, dict]:
    """Runs the model once in ONNX Runtime with ``names`` exposed as outputs; returns their shapes/dtypes."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        # Bytes carry no folder to resolve external data against: inline a copy (the caller bounds its size).
        from onnx_ir.external_data import load_to_model

        model = load_to_model(model.clone())
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = _cpu_session(proto.SerializeToString())
    outputs = [o.name for o in session.get_outputs()]
    arrays = session.run(outputs, _feeds(model, inputs, seed))
    shapes = {name: tuple(int(d) for d in a.shape) for name, a in zip(outputs, arrays, strict=True)}
    dtypes = {}
    for name, array in zip(outputs, arrays, strict=True):
        try:
            dtypes[name] = ir.DataType.from_numpy(array.dtype)
        except TypeError:
            continue
    return shapes, dtypes


def concrete_shapes(
    model: ir.Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    seq: int = 128,
    fallback: bool = True,
    fallback_max_bytes: int = 1 << 30,
    seed: int = 0,
) -> ShapeInfo:
    """Static shapes of every value at one input shape (see the module docstring for the fallback).

    Args:
        model: The model; it is not modified.
        shapes: Input name -> shape; inputs not named get ``batch``/``seq`` on their dynamic dims.
        batch: First dynamic dim of each input. seq: Its later dynamic dims.
        fallback: Run ONNX Runtime for values inference leaves unknown.
        fallback_max_bytes: Largest total initializer size for which that run is done.
        seed: Seed of the random feeds of the fallback run.
    """
    inputs = input_shapes(model, shapes, batch, seq)
    known, dtypes = _infer(model, inputs)
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            known[name] = tuple(value.const_value.shape.numpy())
            dtypes[name] = value.const_value.dtype
    for value in (v for node in model.graph for v in node.outputs):
        if value.name and value.name not in dtypes and value.dtype is not None:
            dtypes[value.name] = value.dtype
    missing = [v.name for node in model.graph for v in node.outputs if v.name and v.name not in known]
    source = "inference"
    if missing and fallback:
        values = model.graph.initializers.values()
        size = sum(v.const_value.nbytes for v in values if v.const_value is not None)
        if size <= fallback_max_bytes:
            log.info("shape inference left %d values unknown; running ONNX Runtime for them", len(missing))
            try:
                ran_shapes, ran_dtypes = _run_for_shapes(model, inputs, missing, seed)
            except Exception as exc:  # ORT's own error classes; shapes stay unknown, costs lower bounds
                log.warning("ONNX Runtime shape run failed (%s); %d values stay unknown", exc, len(missing))
            else:
                known.update({k: v for k, v in ran_shapes.items() if k not in known})
                dtypes.update({k: v for k, v in ran_dtypes.items() if k not in dtypes})
                missing = [name for name in missing if name not in known]
                source = "inference+onnxruntime"
        else:
            log.warning(
                "%d values have unknown shapes and the model (%d bytes of weights) is above the %d-byte "
                "limit for an ONNX Runtime shape run; their nodes are costed as lower bounds",
                len(missing),
                size,
                fallback_max_bytes,
            )
    return ShapeInfo(known, dtypes, source, tuple(missing))
