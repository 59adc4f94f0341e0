"""N:M (semi-structured) sparsity: which weights can use sparse tensor cores, and the masks that fit.

Sparse tensor cores (Ampere and later) skip the zeros of a weight that has at most N non-zeros in every
group of M consecutive elements *along the reduction axis K*. The axis matters: a weight that is 2:4 along
its output axis gives no speed at all. The helpers here keep the axis explicit:

- MatMul ``Y = A @ B``: K is axis -2 of B (the exporter folds ``nn.Linear`` weights as B of shape [in, out]).
- Gemm: K is axis 1 of B when ``transB=1``, else axis 0.
- Conv: K runs over input channels, axis 1 of W ([Cout, Cin/groups, kh, kw]); each group is M contiguous
  input channels at one (out, kh, kw) position.

TensorRT's rules are the reference (constant weights, K % M == 0); eligibility here is about the graph,
precision (fp16/bf16/int8 on the engine) is the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "NM_OPS",
    "NMEligibility",
    "is_nm",
    "nm_eligibility",
    "nm_mask",
    "nm_violations",
    "reduction_axis",
]

# The ops whose constant weight sparse tensor cores can consume, and the input index of that weight.
NM_OPS: dict[str, int] = {"MatMul": 1, "Gemm": 1, "Conv": 1}


@dataclass(frozen=True)
class NMEligibility:
    """Whether one node's weight can be made N:M along K, and why not when it cannot.

    Attributes:
        eligible: True when the weight is a float initializer with K % M == 0.
        reason: Why the weight is not eligible (``None`` when it is).
        weight: The weight value (``None`` when the op has no weight input).
        axis: The weight's reduction axis K as a non-negative index (``None`` when unknown).
        k: The size of K (``None`` when unknown).
    """

    eligible: bool
    reason: str | None = None
    weight: ir.Value | None = None
    axis: int | None = None
    k: int | None = None


def _check_nm_args(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < n < m, got n={n}, m={m}")


def _groups(array: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Views ``array`` as [..., K // m, m] with K moved last; raises if K is not a multiple of m."""
    moved = np.moveaxis(np.asarray(array), axis, -1)
    k = moved.shape[-1]
    if k % m:
        raise ValueError(f"axis {axis} has size {k}, which is not a multiple of m={m}")
    return moved.reshape(*moved.shape[:-1], k // m, m)


def nm_violations(weight: np.ndarray, *, n: int = 2, m: int = 4, axis: int = -2) -> int:
    """Counts the groups of ``m`` consecutive elements along ``axis`` with more than ``n`` non-zeros."""
    _check_nm_args(n, m)
    groups = _groups(weight, m, axis)
    return int(np.count_nonzero(np.count_nonzero(groups, axis=-1) > n))


def is_nm(weight: np.ndarray, *, n: int = 2, m: int = 4, axis: int = -2) -> bool:
    """True when every group of ``m`` consecutive elements along ``axis`` has at most ``n`` non-zeros.

    A size along ``axis`` that is not a multiple of ``m`` is never N:M (the hardware cannot use it).
    """
    _check_nm_args(n, m)
    if np.asarray(weight).shape[axis] % m:
        return False
    return nm_violations(weight, n=n, m=m, axis=axis) == 0


def nm_mask(scores: np.ndarray, *, n: int = 2, m: int = 4, axis: int = -2) -> np.ndarray:
    """Boolean keep-mask with the ``n`` largest scores of every ``m`` consecutive elements along ``axis``.

    Ties keep the earlier element (stable sort), so equal scores give a deterministic mask.
    """
    _check_nm_args(n, m)
    scores = np.asarray(scores)
    groups = _groups(scores, m, axis)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    moved_shape = np.moveaxis(scores, axis, -1).shape
    return np.moveaxis(keep.reshape(moved_shape), -1, axis)


def reduction_axis(node: ir.Node) -> int | None:
    """K's axis in the weight of a MatMul/Gemm/Conv as a non-negative index, ``None`` for other ops."""
    weight = node.inputs[NM_OPS[node.op_type]] if node.op_type in NM_OPS and len(node.inputs) > 1 else None
    rank = len(weight.shape) if weight is not None and weight.shape is not None else None
    if node.op_type == "MatMul":
        return rank - 2 if rank is not None and rank >= 2 else None
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    if node.op_type == "Conv":
        return 1
    return None


def nm_eligibility(node: ir.Node, *, n: int = 2, m: int = 4) -> NMEligibility:
    """Whether ``node``'s constant weight can be stored N:M along its reduction axis.

    Never raises for an unsupported node: the reason says what blocks it, so a report can list it.
    """
    _check_nm_args(n, m)
    if node.domain not in ("", "ai.onnx") or node.op_type not in NM_OPS:
        return NMEligibility(False, f"op {node.op_type} has no sparse tensor-core kernel")
    index = NM_OPS[node.op_type]
    weight = node.inputs[index] if len(node.inputs) > index else None
    if weight is None:
        return NMEligibility(False, f"{node.op_type} has no weight input")
    if weight.const_value is None or not weight.is_initializer():
        return NMEligibility(False, "weight is not a constant initializer", weight)
    if weight.is_graph_input():
        return NMEligibility(False, "weight initializer is also a graph input (can be overridden)", weight)
    tensor = weight.const_value
    if not tensor.dtype.is_floating_point():
        return NMEligibility(False, f"weight dtype {tensor.dtype.name} is not a float type", weight)
    shape = tuple(tensor.shape.numpy())
    if node.op_type == "MatMul" and len(shape) < 2:
        return NMEligibility(False, f"MatMul weight has rank {len(shape)}; K needs rank >= 2", weight)
    if node.op_type == "Gemm" and len(shape) != 2:
        return NMEligibility(False, f"Gemm weight has rank {len(shape)}, expected 2", weight)
    if node.op_type == "Conv" and len(shape) < 3:
        return NMEligibility(False, f"Conv weight has rank {len(shape)}, expected >= 3", weight)
    axis = len(shape) - 2 if node.op_type == "MatMul" else reduction_axis(node)
    k = shape[axis]
    if k % m:
        return NMEligibility(False, f"K={k} (axis {axis}) is not a multiple of {m}", weight, axis, k)
    return NMEligibility(True, None, weight, axis, k)
