"""Concrete shapes of every value of a model at one input shape.

Costs and predictions need static shapes, but exported models have dynamic batch and sequence dims.
The input dims are fixed first (explicit shapes, or a batch and sequence length applied to the dynamic
dims), then ONNX shape inference with data propagation fills in what it can. Exported transformer graphs
compute some shapes at run time (Range, masks, NonZero) that inference cannot resolve; for those the model
is run once in ONNX Runtime on random feeds with the unresolved values exposed as outputs. The run uses a
weightless copy of the model (:mod:`prune2deploy.analysis.probe`: weights generated in the graph from their
shapes), so it costs one forward pass of time and the activations' memory, not a copy of the weights; it is
skipped for models whose weights exceed ``fallback_max_bytes`` (a time bound: the forward pass of a 16B-param
fp32 model on a few CPU cores takes minutes), and then the values stay unknown and are listed in
``ShapeInfo.unknown``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from prune2deploy.analysis.probe import probe_session
from prune2deploy.errors import BadInputError
from prune2deploy.feeds import feed_specs, random_feeds
from prune2deploy.frontends.onnx import weight_bytes

__all__ = [
    "PROBE_MAX_BYTES",
    "SequenceLimit",
    "ShapeInfo",
    "concrete_shapes",
    "fit_seqs",
    "input_shapes",
    "sequence_limit",
]

log = logging.getLogger(__name__)

#: Largest weight size (bytes) of a model that probe runs execute: they cost a forward pass, not memory.
PROBE_MAX_BYTES = 64 << 30


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


def _run_for_shapes(
    model: ir.Model, inputs: Mapping[str, tuple[int, ...]], names: Sequence[str], seed: int
) -> tuple[dict, dict]:
    """Runs the model once in ONNX Runtime with ``names`` exposed as outputs; returns their shapes/dtypes."""
    session = probe_session(model, names)
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
    fallback_max_bytes: int = PROBE_MAX_BYTES,
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
        size = weight_bytes(model)
        if any(dtype == ir.DataType.BFLOAT16 for dtype in dtypes.values()):
            # ONNX Runtime's CPU provider has no bf16 kernels for most ops (Mul, Add): the run cannot load
            log.info(
                "%d values have unknown shapes; ONNX Runtime's CPU cannot run this bf16 graph to find them, "
                "so their nodes are costed as lower bounds",
                len(missing),
            )
        elif size <= fallback_max_bytes:
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


@dataclass(frozen=True)
class SequenceLimit:
    """The longest sequence a model accepts, and the constant that bounds it.

    Attributes:
        max_seq: Largest sequence length whose run stays inside every bounded table.
        where: The node and constant that set it, for messages (``"node_embedding_1 reads wpe (64 rows)"``).
    """

    max_seq: int
    where: str


def _bounded_candidates(model: ir.Model) -> list[tuple[ir.Node, ir.Value, int, int]]:
    """Gathers of a constant table by computed indices, and Slices of a constant: (node, probe, axis, size).

    A Gather whose indices are a graph input is a token table (its bound is the vocabulary, not the sequence).
    """
    inputs = set(model.graph.inputs)
    found = []
    for node in model.graph:
        data = node.inputs[0] if node.inputs else None
        if data is None or data.const_value is None or not data.const_value.shape.dims:
            continue
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is not None:
            indices = node.inputs[1]
            if indices in inputs or indices.const_value is not None:
                continue
            axis = node.attributes.get_int("axis", 0)
            found.append((node, indices, axis, int(data.const_value.shape[axis])))
        elif node.op_type == "Slice" and len(node.inputs) > 2:
            axes = node.inputs[3] if len(node.inputs) > 3 else None
            if axes is None or axes.const_value is None or axes.const_value.numpy().size != 1:
                continue
            axis = int(axes.const_value.numpy().reshape(-1)[0]) % len(data.const_value.shape)
            found.append((node, node.outputs[0], axis, int(data.const_value.shape[axis])))
    return found


def sequence_limit(model: ir.Model, *, max_bytes: int = PROBE_MAX_BYTES) -> SequenceLimit | None:
    """The sequence bound a model's constants set (position tables, cached rotary or position-id buffers).

    Exported decoders index a learned position table (GPT-2's ``wpe``) or slice a buffer by the sequence
    length, so a run longer than the table fails in ONNX Runtime ("indices element out of data bounds")
    or, for a slice, breaks a later broadcast. Which tables are sequence-bound is decided numerically, not
    by name: the model runs at sequence lengths 2 and 3 with the candidates exposed; a Gather whose largest
    index grows by one per token (``max_index = seq - 1 + offset``) bounds the sequence at
    ``rows - offset`` (RoBERTa's padding offset included); a Slice of a constant whose output grows by one
    per token bounds it at the constant's length. Token-type tables (indices constant in the sequence)
    and vocabulary tables (indexed by a graph input) do not bound it. Models whose weights exceed
    ``max_bytes`` are not run; None then, as for a model without such tables.
    """
    candidates = _bounded_candidates(model)
    if not candidates:
        return None
    size = weight_bytes(model)
    if size > max_bytes:
        log.info("not probing sequence bounds of a model with %d bytes of weights", size)
        return None
    try:
        session = probe_session(model, [probe.name for _node, probe, _axis, _rows in candidates])
        outputs = [o.name for o in session.get_outputs()]
        runs = []
        for seq in (2, 3):
            feeds = random_feeds(model, batch=2, seq=seq, seed=0)
            runs.append(dict(zip(outputs, session.run(outputs, feeds), strict=True)))
    except Exception as exc:  # ORT's own error classes: a model we cannot run at seq 2/3 has no known bound
        log.warning("could not probe the sequence bound (%s)", exc)
        return None
    best: SequenceLimit | None = None
    for node, probe, axis, rows in candidates:
        short, long = runs[0].get(probe.name), runs[1].get(probe.name)
        if short is None or long is None:
            continue
        if node.op_type == "Gather":
            if short.size == 0 or long.size == 0 or not np.issubdtype(short.dtype, np.integer):
                continue
            low, high = int(short.max()), int(long.max())
            if high - low != 1:
                continue
            limit = rows - (low - 1)
        else:
            if short.ndim <= axis or long.ndim <= axis or long.shape[axis] - short.shape[axis] != 1:
                continue
            limit = rows - (short.shape[axis] - 2)
        if best is None or limit < best.max_seq:
            best = SequenceLimit(limit, f"{node.name} ({node.op_type}) reads {node.inputs[0].name} ({rows} rows)")
    return best


def fit_seqs(limit: SequenceLimit | None, seqs: Sequence[int], *, explicit: bool) -> list[int]:
    """Sequence lengths to probe within ``limit``: a default beyond it is lowered to it, a request is an error.

    Raises:
        BadInputError: ``explicit`` and a length is beyond the model's bound.
    """
    if limit is None:
        return list(seqs)
    beyond = [s for s in seqs if s > limit.max_seq]
    if beyond and explicit:
        raise BadInputError(
            f"sequence length {beyond} is beyond what the model accepts: at most {limit.max_seq} tokens "
            f"({limit.where}); choose --seq {limit.max_seq} or less"
        )
    fitted = [min(s, limit.max_seq) for s in seqs]
    if beyond:
        log.info("profiling at sequence length %d: the model accepts no more (%s)", limit.max_seq, limit.where)
    return list(dict.fromkeys(fitted))
