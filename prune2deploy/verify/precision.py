"""fp64 copies of ONNX graphs, so that a verdict on an exact pipeline is not a verdict on float rounding.

A correct compile computes the same sums as its reference in another order (smaller matrices, gathered
kv heads, fused kernels); in fp32 that alone moves a 30-layer model's outputs by up to ~3e-4 of their
scale, as much as a real error would. Computed in fp64 the same graphs agree to ~1e-14, while one wrong
channel still differs by its whole contribution (docs/exactness.md). ONNX Runtime's CPU provider has double
kernels for most standard ops but not for all (Conv, Erf) nor for its fused contrib ops (attention,
rotary, skip-norm): :func:`fp64_blockers` names those, and callers fall back to fp32 with a noise floor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["FLOAT_TYPES", "cast_float_feeds", "fp64_blockers", "to_fp64"]

#: Float element types an fp64 copy widens (half precision included: its values are exact in fp64).
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@functools.cache
def _double_kernels() -> frozenset[tuple[str, str]]:
    """(domain, op type) of every CPU kernel ONNX Runtime registers with a double type constraint."""
    from onnxruntime.capi import _pybind_state

    found = set()
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.provider != "CPUExecutionProvider":
            continue
        if any("tensor(double)" in types for types in kernel.type_constraints.values()):
            found.add((kernel.domain or "", kernel.op_name))
    return frozenset(found)


def _computes_floats(node: ir.Node) -> bool:
    """Whether a node reads or writes a float tensor (shape and index ops on ints need no double kernel)."""
    values = [*node.inputs, *node.outputs]
    return any(v is not None and v.dtype in (*FLOAT_TYPES, ir.DataType.DOUBLE) for v in values)


def fp64_blockers(model: ir.Model) -> list[str]:
    """Op types (``domain:op`` outside the default domain) of float nodes without a CPU double kernel.

    Empty when the whole model can run in fp64. Nodes inside subgraphs (If/Loop bodies) count as blockers
    (the copy does not rewrite them). An op listed here is also what the fallback's note names.
    """
    try:
        kernels = _double_kernels()
    except Exception:  # an ONNX Runtime without the kernel listing: no fp64, fp32 with a floor
        return ["(ONNX Runtime's kernel list is not available)"]
    blockers = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if node.graph is not model.graph:
            blockers.add(f"{node.op_type} (in a subgraph)")
        elif (domain, node.op_type) not in kernels and _computes_floats(node):
            blockers.add(f"{domain}:{node.op_type}" if domain else node.op_type)
    return sorted(blockers)


def _fp64_tensor(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    array = tensor.numpy()
    if tensor.dtype == ir.DataType.BFLOAT16:  # ml_dtypes' bfloat16 widens through float32 exactly
        array = array.astype(np.float32)
    return ir.Tensor(np.asarray(array, dtype=np.float64), name=name)


def to_fp64(model: ir.Model) -> ir.Model:
    """Rewrites ``model`` in place (give it a clone or a segment) to compute in fp64 what it did in fp32.

    Widens float initializers, float values (inputs, outputs, intermediates), Cast targets, tensor
    attributes (Constant, ConstantOfShape) and ``dtype`` attributes; widening is exact, so the fp64 graph
    computes the same function with ~2^-52 rounding instead of 2^-24. Reads every weight into memory.
    """
    graph = model.graph
    double = ir.TensorType(ir.DataType.DOUBLE)
    for name, value in graph.initializers.items():
        if value.const_value is not None and value.const_value.dtype in FLOAT_TYPES:
            value.const_value = _fp64_tensor(value.const_value, name)
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
    for value in values:
        if value.dtype in FLOAT_TYPES:
            value.type = double
    for node in graph:
        for key, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in FLOAT_TYPES:
                node.attributes[key] = ir.AttrTensor(key, _fp64_tensor(attr.value, attr.value.name or key))
            elif key in ("to", "dtype") and attr.type == ir.AttributeType.INT and attr.value in FLOAT_TYPES:
                node.attributes[key] = ir.AttrInt64(key, ir.DataType.DOUBLE)
    return model


_NUMPY = {"tensor(double)": np.float64, "tensor(float)": np.float32, "tensor(float16)": np.float16}


def cast_float_feeds(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with float arrays cast to the float type each of the session's inputs declares.

    The same feed sets (and, block by block, the reference's activations) go to fp64 and fp32 sessions;
    widening float32 to double is exact, and narrowing a carried fp64 activation to fp32 is what an fp32
    block would have received from an fp32 reference. Non-float feeds and names the session lacks pass as
    they are.
    """
    wanted = {i.name: _NUMPY.get(i.type) for i in session.get_inputs()}
    cast = {}
    for name, array in feeds.items():
        target = wanted.get(name)
        array = np.asarray(array)
        if target is not None and np.issubdtype(array.dtype, np.floating) and array.dtype != target:
            array = array.astype(target)
        cast[name] = array
    return cast
