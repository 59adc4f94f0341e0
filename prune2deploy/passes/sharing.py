"""Un-share and re-share constants around structural passes.

The exporter de-duplicates equal tensors: two layers whose biases are both all-zero read one initializer.
A shared tensor couples the channel groups of every reader (slicing it for one would change the other), so
two independent MLPs would only lose the channels both have zero. Giving each reader its own initializer (a
read-only view of the one buffer) before analysis, and de-duplicating again afterwards, keeps the groups
independent and the file small.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes
from onnx_ir.passes.common import DeduplicateHashedInitializersPass

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

    Views of one buffer are joined first (:func:`_rejoin_views`); the rest goes through onnx_ir's hashed
    pass, which keeps one digest per tensor (equal digests are confirmed byte for byte) — the plain one keys a
    dict by every tensor's bytes, i.e. holds a second copy of all weights (7 GB of the 1B model's peak).
    """
    joined = _rejoin_views(model.graph)
    if joined:
        log.info("re-joined %d views of shared initializers", joined)
    _make_contiguous(model.graph)
    DeduplicateHashedInitializersPass(size_limit=1 << 62)(model)


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
