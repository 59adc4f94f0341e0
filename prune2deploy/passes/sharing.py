"""Un-share and re-share constants around structural passes.

The exporter de-duplicates equal tensors: two layers whose biases are both all-zero read one initializer.
A shared tensor couples the channel groups of every reader (slicing it for one would change the other), so
two independent MLPs would only lose the channels both have zero. Giving each reader its own initializer (a
read-only view of the one buffer) before analysis, and de-duplicating again afterwards, keeps the groups
independent and the file small.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from prune2deploy.graph.mapped import release_tensor

__all__ = ["ReshareInitializersPass", "UnshareInitializersPass", "reshare_initializers", "unshare_initializers"]

log = logging.getLogger(__name__)

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def unshare_initializers(model: ir.Model) -> int:
    """Gives every reader of a shared float initializer (rank ≥ 1) its own initializer. Returns those made.

    The new initializers are read-only views of the same buffer, not copies (a tied 128k-token embedding is
    1 GB) — for tensors held as arrays or mapped from external data, what compile works on; a tensor still in
    protobuf form decodes to a new array on every read, so its readers get a decoded copy. Passes never
    write a constant in place — they register new arrays (``graph.initializers``) — and
    the buffer is marked read-only so that one that tried would fail loudly instead of changing the other
    reader's weights.
    """
    graph = model.graph
    copies = 0
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.dtype not in _FLOAT or not value.shape or len(value.shape) == 0:
            continue
        uses = list(value.uses())
        if len(uses) < 2:
            continue
        array = value.const_value.numpy()
        if array.flags.writeable:
            array.flags.writeable = False  # the tensor's own buffer (ir.Tensor.numpy() returns it)
        for index, use in enumerate(uses[1:], start=1):
            new_name = f"{name}__copy{index}"
            while new_name in graph.initializers:
                new_name += "_"
            view = array.view()
            tensor = ir.tensor(view, dtype=value.dtype, name=new_name)
            copy = ir.Value(
                name=new_name, shape=ir.Shape(view.shape), type=ir.TensorType(value.dtype), const_value=tensor
            )
            graph.register_initializer(copy)
            use.node.replace_input_with(use.idx, copy)
            copies += 1
    if copies:
        log.info("un-shared %d initializer uses (read-only views of one buffer)", copies)
    return copies


def _rejoin_views(graph: ir.Graph) -> int:
    """Initializers that still view the same memory (what un-sharing made and no pass replaced) become one.

    They are equal by construction, so no hashing or byte comparison is needed: for a tied embedding the
    comparison alone would read 2 × 1 GB into fresh buffers.
    """
    # Each array is kept alive while the loop runs: a tensor in protobuf form decodes to a fresh array per
    # read, and a freed array's address can be handed to the next one — equal keys for different contents.
    first: dict[tuple, tuple[ir.Value, np.ndarray]] = {}
    joined = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.dtype not in _FLOAT or value.is_graph_output():
            continue
        array = tensor.numpy()
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        kept, _ = first.setdefault(key, (value, array))
        if kept is not value:
            value.replace_all_uses_with(kept)
            graph.initializers.pop(name)
            joined += 1
    return joined


def reshare_initializers(model: ir.Model) -> None:
    """De-duplicates equal initializers again (any size).

    Views of one buffer are joined first (:func:`_rejoin_views`); the rest by :func:`_join_equal`, which reads
    only the first bytes of most tensors.
    """
    joined = _rejoin_views(model.graph)
    if joined:
        log.info("re-joined %d views of shared initializers", joined)
    _make_contiguous(model.graph)
    for graph in model.graphs():
        merged = _join_equal(graph)
        if merged:
            log.info("de-duplicated %d equal initializers", merged)


#: Bytes of each tensor read before deciding whether it needs a full comparison (one page).
_PREFIX_BYTES = 4096


def _join_equal(graph: ir.Graph) -> int:
    """Initializers with equal dtype, shape and bytes become one. Returns how many were dropped.

    Candidates are grouped by dtype, shape and their first :data:`_PREFIX_BYTES` bytes; only a group of two
    or more is read whole (digest, then byte comparison). onnx_ir's hashed pass digests every tensor: at 8B
    that reads all 16 GB of the mapped reference, whose pages then count in the RSS until unmapped (23 GB
    peak); weights of different layers differ in their first bytes, so here one page each is read.
    A mapped tensor that was read whole is unmapped again.
    """
    groups: dict[tuple, list[ir.Value]] = {}
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.dtype.is_string():
            continue
        groups.setdefault(_prefix_key(tensor), []).append(value)
    dropped = 0
    for candidates in groups.values():
        if len(candidates) > 1:
            dropped += _join_group(graph, candidates)
    return dropped


def _flat_bytes(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's bytes as a flat uint8 view (a mapped tensor stays mapped: nothing is copied)."""
    array = np.ascontiguousarray(tensor.numpy())
    return array.reshape(-1).view(np.uint8)


def _prefix_key(tensor: ir.TensorProtocol) -> tuple:
    return (tensor.dtype, tuple(tensor.shape.numpy()), _flat_bytes(tensor)[:_PREFIX_BYTES].tobytes())


def _join_group(graph: ir.Graph, candidates: list[ir.Value]) -> int:
    """Joins the equal members of one prefix group: digest each (one at a time), confirm byte for byte."""
    kept: dict[bytes, list[ir.Value]] = {}
    dropped = 0
    for value in candidates:
        digest = hashlib.blake2b(_flat_bytes(value.const_value), digest_size=32).digest()
        twin = next((k for k in kept.get(digest, ()) if _equal_bytes(k, value)), None)
        if twin is None:
            kept.setdefault(digest, []).append(value)
        else:
            value.replace_all_uses_with(twin)
            graph.initializers.pop(value.name)
            dropped += 1
        release_tensor(value)
    for values in kept.values():
        for value in values:
            release_tensor(value)
    return dropped


def _equal_bytes(a: ir.Value, b: ir.Value) -> bool:
    return bool(np.array_equal(_flat_bytes(a.const_value), _flat_bytes(b.const_value)))


def _make_contiguous(graph: ir.Graph) -> None:
    """onnx_ir's hashing pass reads each array's buffer, which must be C-contiguous; a rewrite may leave a
    strided view (onnxscript's ORT fusions do on SmolLM2). Only those are copied."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.Tensor):  # mapped or protobuf-backed tensors are contiguous
            continue
        array = tensor.numpy()  # in memory already (numpy or torch): a view, not a copy
        if not array.flags.c_contiguous:
            value.const_value = ir.tensor(np.ascontiguousarray(array), dtype=tensor.dtype, name=tensor.name)


class UnshareInitializersPass(ir.passes.InPlacePass):
    """Runs before the structural passes: every reader of a shared float constant gets its own copy."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=unshare_initializers(model) > 0)


class ReshareInitializersPass(ir.passes.InPlacePass):
    """Runs after them: equal constants are one initializer again."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph.initializers)
        reshare_initializers(model)
        return ir.passes.PassResult(model, modified=len(model.graph.initializers) != before)
