"""Cutting a model into segments (one decoder block at a time) and running half-precision graphs in fp32.

A segment computes some values of the model from others: ``segment(model, inputs=["h3"], outputs=["h4"])``
is the model with ``h3`` turned into a graph input, ``h4`` as its only output and everything not needed
for it removed. The model is cloned first (nodes and values are new, tensors are shared, so a segment
costs no weight memory until it is serialized), so the model itself is never changed. Values a segment
needs from before its input cut (rotary tables, the attention mask) are recomputed from the graph inputs:
they are cheap and carry no large weights.

``upcast_to_fp32`` turns a bf16/fp16 graph into the same computation in fp32 (weights converted, Casts to a
half type become Casts to fp32): ONNX Runtime's CPU provider has few half-precision kernels, so half models
are verified in fp32, where removing exactly-zero channels is exact too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["HALF", "has_half", "segment", "upcast_to_fp32"]

HALF = frozenset({ir.DataType.BFLOAT16, ir.DataType.FLOAT16})


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    found.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        for value in node.outputs:
            if value.name:
                found[value.name] = value
    return found


def segment(model: ir.Model, *, inputs: Sequence[str], outputs: Sequence[str]) -> ir.Model:
    """A new model computing ``outputs`` from the values named ``inputs`` and the graph inputs it reads.

    Raises:
        KeyError: a name that no value of the model carries.
    """
    clone = model.clone()
    graph = clone.graph
    values = _values_by_name(graph)
    cut_inputs = []
    for name in inputs:
        old = values[name]
        new = ir.Value(name=name, shape=old.shape, type=old.type)
        old.name = f"{name}__before_cut"
        old.replace_all_uses_with(new)
        cut_inputs.append(new)
    wanted = [values[name] for name in outputs]
    graph.outputs.clear()
    graph.outputs.extend(wanted)
    kept_inputs = [v for v in graph.inputs if v.name not in inputs]
    graph.inputs.clear()
    graph.inputs.extend([*kept_inputs, *cut_inputs])
    RemoveUnusedNodesPass()(clone)
    used = [v for v in graph.inputs if v in cut_inputs or any(True for _ in v.uses()) or v in wanted]
    graph.inputs.clear()
    graph.inputs.extend(used)
    return clone


def has_half(model: ir.Model) -> bool:
    """Whether any weight or value of ``model`` is bf16/fp16."""
    if any(v.dtype in HALF for v in model.graph.initializers.values()):
        return True
    return any(v.dtype in HALF for v in (*model.graph.inputs, *model.graph.outputs))


def _fp32_tensor(tensor: ir.TensorProtocol, name: str) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy()).astype(np.float32), name=name)


def upcast_to_fp32(model: ir.Model) -> int:
    """Rewrites ``model`` (in place; give it a clone or a segment) to compute in fp32 what it did in half.

    Returns how many weights were converted. Subgraphs (If/Loop bodies) are not visited.
    """
    graph = model.graph
    fp32 = ir.TensorType(ir.DataType.FLOAT)
    converted = 0
    for name, value in graph.initializers.items():
        if value.const_value is not None and value.const_value.dtype in HALF:
            value.const_value = _fp32_tensor(value.const_value, name)
            converted += 1
    every = [*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)]
    for value in every:
        if value.dtype in HALF:
            value.type = fp32
    for node in graph:
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            if to is not None and ir.DataType(to.value) in HALF:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
        for key, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in HALF:
                node.attributes[key] = ir.AttrTensor(key, _fp32_tensor(attr.value, attr.value.name or key))
            elif key == "dtype" and attr.type == ir.AttributeType.INT and ir.DataType(attr.value) in HALF:
                node.attributes[key] = ir.AttrInt64(key, ir.DataType.FLOAT)
    return converted
