"""Finding the q/k/v projections behind the Reshapes that split the last axis into (heads, head_dim).

A projection is ``MatMul(x, W) [+ b]`` or a GPT-2 style ``Reshape(Gemm(x2d, W[, b]), [.., out])``, each
optionally followed by a Split of fused q/k/v; its role comes from the graph (``head_routes.graph_role``),
the module name scope (``role_of``) only where the graph does not say. See
:mod:`prune2deploy.analysis.attention` for how the blocks are then proven.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from prune2deploy.analysis.attention_types import Projection
from prune2deploy.graph.attributes import float_attr, int_attr
from prune2deploy.graph.constants import const_array
from prune2deploy.graph.dims import rank as _rank
from prune2deploy.graph.dims import same_dim, shape_entries, static_dim

__all__ = ["gemm_weight", "projection_behind", "role_of", "split_reshape"]

#: Module-name suffixes of the projections (Llama/Qwen/Mistral, BERT, GPT-NeoX/Phi/GPT-2 style fused).
_ROLE_PATTERNS = {
    "q": re.compile(r"(?:^|\.)(?:q_proj|query|q|wq|to_q|q_lin)$"),
    "k": re.compile(r"(?:^|\.)(?:k_proj|key|k|wk|to_k|k_lin)$"),
    "v": re.compile(r"(?:^|\.)(?:v_proj|value|v|wv|to_v|v_lin)$"),
    "qkv": re.compile(r"(?:^|\.)(?:qkv_proj|qkv|c_attn|query_key_value|Wqkv|in_proj)$"),
}


def role_of(module: str) -> str | None:
    for role, pattern in _ROLE_PATTERNS.items():
        if pattern.search(module):
            return role
    return None


def gemm_weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """``(weight, transposed)`` of a plain ``Gemm(x, W[, c])`` (alpha = beta = 1, no transA), else None."""
    alpha, beta = float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)
    if alpha != 1.0 or beta != 1.0 or int_attr(node, "transA", 0):
        return None
    weight = node.inputs[1]
    if const_array(weight) is None or _rank(weight) != 2:
        return None
    return weight, bool(int_attr(node, "transB", 0))


def _single_reader(value: ir.Value) -> bool:
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def projection_behind(value: ir.Value) -> tuple[Projection | None, str]:
    """Walks back from a split Reshape's input to the projection.

    Recognised: ``MatMul(x, W) [+ b]`` and ``Reshape(Gemm(x2d, W[, b]), [.., out])`` (GPT-2 style), each
    optionally followed by a Split of fused q/k/v along the last axis, and by Mul/Div by constant scalars
    (a q scaling before the head split: it scales every column alike, so heads stay separable).
    """
    node = value.producer()
    scales = []
    while node is not None and node.op_type in ("Mul", "Div") and _scalar_index(node) is not None:
        data = node.inputs[1 - _scalar_index(node)]
        if not _single_reader(data):
            return None, f"{node.name}: the projection output it scales has other readers"
        scales.append(node)
        value, node = data, data.producer()
    split, split_index = None, 0
    if node is not None and node.op_type == "Split":
        split, split_index = node, list(node.outputs).index(value)
        value = node.inputs[0]
        node = value.producer()
    unflatten = None
    if node is not None and node.op_type == "Reshape" and _rank(node.inputs[0]) == 2:
        entries, out = shape_entries(node.inputs[1]), node.outputs[0]
        width = static_dim(node.inputs[0].shape[-1])
        if entries is None or width is None or entries[-1] != width or static_dim(out.shape[-1]) != width:
            return None, f"{node.name}: the [N, out] -> [.., out] Reshape does not keep the last axis"
        if not _single_reader(node.inputs[0]):
            return None, f"{node.name}: the projection output has other readers"
        unflatten, value = node, node.inputs[0]
        node = value.producer()
    bias_add = bias = None
    transposed = False
    if node is not None and node.op_type == "Gemm" and unflatten is not None:
        found = gemm_weight(node)
        if found is None:
            return None, f"{node.name}: Gemm with alpha/beta/transA, or a non-constant weight"
        weight, transposed = found
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias_add, bias = node, node.inputs[2]
            if const_array(bias) is None or _rank(bias) != 1:
                return None, f"{node.name}: the Gemm bias is not a constant vector"
    else:
        if node is not None and node.op_type == "Add":
            consts = [i for i, v in enumerate(node.inputs) if const_array(v) is not None]
            if len(consts) == 1 and _rank(node.inputs[consts[0]]) == 1:
                bias_add, bias = node, node.inputs[consts[0]]
                if not _single_reader(bias_add.outputs[0]):
                    return None, f"{bias_add.name}: the biased projection output has other readers"
                node = node.inputs[1 - consts[0]].producer()
        if node is None or node.op_type != "MatMul":
            return None, "the projection is not MatMul(x, constant weight) [+ bias] or Gemm"
        weight = node.inputs[1]
        if const_array(weight) is None or _rank(weight) != 2:
            return None, f"{node.name}: the projection weight is not a constant matrix"
    # The projection output must feed only the head split (it changes width with the heads).
    if not _single_reader(node.outputs[0]):
        return None, f"{node.name}: the projection output has other readers"
    projection = Projection(
        role="",
        matmul=node,
        weight=weight,
        bias_add=bias_add,
        bias=bias,
        transposed=transposed,
        unflatten=unflatten,
        scales=scales,
    )
    if split is not None:
        sizes = _split_sizes(split)
        if sizes is None:
            return None, f"{split.name}: Split sizes are not static"
        projection.split, projection.split_index = split, split_index
        projection.offset, projection.width = sum(sizes[:split_index]), sizes[split_index]
    else:
        projection.width = int(projection.weight_array().shape[1])
    return projection, ""


def _scalar_index(node: ir.Node) -> int | None:
    """Which input of a Mul/Div is a constant scalar (a Div only by one: ``c / x`` is not a scaling)."""
    for i in (1, 0) if node.op_type == "Mul" else (1,):
        array = const_array(node.inputs[i])
        if array is not None and array.size == 1 and node.inputs[1 - i] is not None:
            return i
    return None


def _split_sizes(node: ir.Node) -> list[int] | None:
    axis = int_attr(node, "axis", 0)
    data = node.inputs[0]
    rank = _rank(data)
    if rank is None or axis % rank != rank - 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = const_array(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    sizes = [static_dim(out.shape[-1]) if out.shape is not None else None for out in node.outputs]
    return None if any(s is None for s in sizes) else sizes


def split_reshape(node: ir.Node) -> tuple[int, int, int] | None:
    """``(n, d, head_entry)`` when ``node`` reshapes ``[.., n*d]`` into ``[.., n, d]``, else ``None``."""
    data, target, out = node.inputs[0], node.inputs[1], node.outputs[0]
    r_in, r_out = _rank(data), _rank(out)
    if r_in is None or r_out != r_in + 1 or r_in < 2:
        return None
    n, d, width = static_dim(out.shape[-2]), static_dim(out.shape[-1]), static_dim(data.shape[-1])
    if n is None or d is None or width is None or n * d != width:
        return None
    if not all(same_dim(data.shape[i], out.shape[i]) for i in range(r_in - 1)):
        return None
    entries = shape_entries(target)
    if entries is None or len(entries) != r_out or entries[-1] != d or entries[-2] not in (-1, n):
        return None
    return n, d, r_out - 2
