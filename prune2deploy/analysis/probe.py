"""A weightless copy of a model for ONNX Runtime probe runs (shapes, sequence bounds).

Probes read shapes and integer index values, never the float weights' values: a shape follows from the
weights' *shapes* (float tensors feed no shape input of a standard op beyond tiny scalars such as Resize
scales). So a probe does not need the weights: every large floating-point initializer is replaced by random
values of its shape (cast to its type), generated when its first reader is about to run. The probe then
costs no copy of the weights — before, it inlined, serialized and loaded them (three copies, the compile's peak
memory on SmolLM2) — and the serialized model is a few kilobytes, whatever the model's size.

Random rather than zero weights keep activations non-degenerate, like the trained model's (a zero layer
would make every later value identical across positions); the seed is fixed, so a probe is repeatable.
Integer and boolean constants (position ids, causal masks, shape constants) stay as they are: indices and
shapes may depend on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

__all__ = ["WEIGHT_MIN_ELEMENTS", "probe_session", "weightless_model"]

log = logging.getLogger(__name__)

#: Floating-point initializers with at least this many elements are generated instead of stored.
WEIGHT_MIN_ELEMENTS = 1024

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _reader_positions(graph: ir.Graph) -> dict[int, int]:
    """Position in ``graph`` of every node, a node inside a subgraph at the position of its top-level node.

    Computed once per copy: looking each weight's first reader up by walking the graph made the copy
    O(weights × nodes) (an 8B Llama: ~300 weights × ~7,700 nodes).
    """
    positions: dict[int, int] = {}
    for position, node in enumerate(graph):
        positions[id(node)] = position
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                subgraphs = attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]
                for sub in subgraphs:
                    for inner in ir.traversal.RecursiveGraphIterator(sub):
                        positions[id(inner)] = position
    return positions


def _first_use(nodes: list[ir.Node], value: ir.Value, positions: dict[int, int]) -> ir.Node | None:
    """The earliest of ``nodes`` (the graph's, in order) that reads ``value`` directly or in a subgraph.

    ``positions`` come from :func:`_reader_positions` on the same nodes; nodes inserted since (the
    generators) are not readers of an original weight, so the positions stay valid while weights are
    replaced one by one.
    """
    readers = [positions[id(node)] for node, _ in value.uses() if id(node) in positions]
    if not readers:
        return None
    return nodes[min(readers)]


def _anchor(node: ir.Node, weight: ir.Value) -> ir.Value | None:
    """A run-time input of the weight's first reader: the generator is made to depend on it."""
    for value in node.inputs:
        if value is not None and value is not weight and value.const_value is None:
            return value
    return None


def _generator(value: ir.Value, seed: int, anchor: ir.Value | None) -> list[ir.Node]:
    """Nodes that make values of the weight's shape and dtype: one N(0, 0.02²) row, expanded to all rows.

    ONNX Runtime schedules a node with no inputs at the very start, so a full-size generator per weight
    would make every weight at once (measured: 5.6 GB for a 1B model). The full size is therefore only made
    by an ``Expand`` whose shape is computed from ``anchor`` (``shape + 0·min(Shape(anchor))``): each weight
    exists once its reader's other input does and is freed after its last reader, so a probe holds about
    one weight at a time, in one buffer (a random row of the last dim is enough for shapes: activations stay
    non-degenerate along the channels).
    """
    tensor = value.const_value
    dims = np.array([int(d) for d in tensor.shape.numpy()], dtype=np.int64)
    tag = f"p2d_probe_{value.name}"
    row = [int(dims[-1])]
    nodes = [
        ir.node(
            "RandomNormal",
            [],
            attributes={"shape": row, "dtype": int(ir.DataType.FLOAT), "scale": 0.02, "seed": float(seed)},
        )
    ]
    cast_after = tensor.dtype == ir.DataType.BFLOAT16  # Expand has no bf16 kernel on every ORT build
    if tensor.dtype != ir.DataType.FLOAT and not cast_after:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": int(tensor.dtype)}))
    small = nodes[-1].outputs[0]
    nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(dims, name=f"{tag}_dims")}))
    shape = nodes[-1].outputs[0]
    if anchor is not None:
        nodes.append(ir.node("Shape", [anchor]))
        nodes.append(ir.node("ReduceMin", [nodes[-1].outputs[0]], attributes={"keepdims": 0}))
        low = nodes[-1].outputs[0]
        nodes.append(ir.node("Sub", [low, low]))
        nodes.append(ir.node("Add", [shape, nodes[-1].outputs[0]]))
        shape = nodes[-1].outputs[0]
    nodes.append(ir.node("Expand", [small, shape]))
    if cast_after:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": int(tensor.dtype)}))
    for index, node in enumerate(nodes):
        node.name = f"{tag}_{index}"
    out = nodes[-1].outputs[0]
    out.name = tag
    out.type = ir.TensorType(tensor.dtype)
    out.shape = ir.Shape(dims.tolist())
    return nodes


def _inline_small(value: ir.Value) -> None:
    """A small initializer held as external data is read in: serialized bytes carry no folder to find it in."""
    if isinstance(value.const_value, ir.ExternalTensor):
        value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)


def weightless_model(model: ir.Model, *, keep: Iterable[str] = (), seed: int = 0) -> ir.Model:
    """A copy of ``model`` whose large floating-point initializers are generated in the graph (see module doc).

    The model is not modified (the copy shares the small tensors it keeps). ``keep`` names initializers to
    keep as they are (e.g. ones a probe reads back). Initializers that are graph outputs are kept too.
    """
    copy = model.clone()
    graph = copy.graph
    kept = set(keep) | {v.name for v in graph.outputs}
    generated = 0
    positions = _reader_positions(graph)
    nodes_in_order = list(graph)
    for index, value in enumerate(list(graph.initializers.values())):
        tensor = value.const_value
        if tensor is None:
            continue
        if value.name in kept or tensor.dtype not in _FLOATS or tensor.size < WEIGHT_MIN_ELEMENTS:
            _inline_small(value)
            continue
        where = _first_use(nodes_in_order, value, positions)
        if where is None:  # unused: drop it
            graph.initializers.pop(value.name)
            continue
        nodes = _generator(value, seed + index, _anchor(where, value))
        graph.insert_before(where, nodes)
        value.replace_all_uses_with(nodes[-1].outputs[0])
        graph.initializers.pop(value.name)
        value.const_value = None
        generated += 1
    log.debug("probe copy: %d weights generated in the graph", generated)
    return copy


def probe_session(model: ir.Model, outputs: Iterable[str]):
    """An ONNX Runtime session of the weightless copy of ``model`` with ``outputs`` exposed as graph outputs.

    The one place a probe serializes a model: the copy holds no large weights (a few kilobytes to a few MB
    for any model size), so bytes are safe here where a whole model's protobuf message would not be.
    """
    import onnx

    from prune2deploy.ort_session import make_session

    proto = ir.to_proto(weightless_model(model))
    present = {o.name for o in proto.graph.output}
    for name in outputs:
        if name and name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return make_session(proto.SerializeToString())
