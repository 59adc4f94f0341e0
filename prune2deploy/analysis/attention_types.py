"""What the attention analysis reports: blocks, their projections, head tensors and query → kv maps.

The data model of :mod:`prune2deploy.analysis.attention` (which explains how blocks are found and proven);
the projection finder (:mod:`~prune2deploy.analysis.projections`) and the head-axis tracer
(:mod:`~prune2deploy.analysis.head_axis`) fill it in, and the head passes read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.head_routes import Route
from prune2deploy.graph.constants import const_array
from prune2deploy.graph.scopes import module_of

__all__ = [
    "AttentionAnalysis",
    "AttentionBlock",
    "HeadGather",
    "HeadTensor",
    "Join",
    "Projection",
    "Repeat",
    "SplitReshape",
]


@dataclass
class Projection:
    """A MatMul against a constant weight (and an optional bias Add) that makes or reads one head space.

    For fused QKV, ``offset``/``width`` select this role's columns of the shared weight and ``split`` is
    the Split node that separates the roles.
    """

    role: str  # "q" | "k" | "v" | "o"
    matmul: ir.Node
    weight: ir.Value  # [in, out] for q/k/v (columns are heads), [H*d, out] for o (rows are heads)
    bias_add: ir.Node | None = None
    bias: ir.Value | None = None
    offset: int = 0
    width: int = 0
    split: ir.Node | None = None
    split_index: int = 0
    transposed: bool = False  # Gemm transB=1: the weight is stored [out, in]
    unflatten: ir.Node | None = None  # Gemm's [N, out] -> [.., out] Reshape (its target carries the width)
    #: a fused layout followed by the graph (head_routes): this role's ``[heads, head_dim]`` weight columns
    columns: np.ndarray | None = None
    #: Mul/Div by a constant scalar between the projection and the head split (their outputs change width)
    scales: list[ir.Node] = field(default_factory=list)

    @property
    def module(self) -> str:
        return module_of(self.matmul)

    def weight_array(self) -> np.ndarray:
        """The weight as ``[in, out]`` whatever its storage."""
        array = const_array(self.weight)
        return array.T if self.transposed else array

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else const_array(self.bias)

    def role_columns(self) -> np.ndarray:
        """This role's weight columns, head-major (``[heads * head_dim]``), whatever the fused layout."""
        if self.columns is not None:
            return self.columns.reshape(-1)
        return np.arange(self.offset, self.offset + self.width)

    def role_weight(self) -> np.ndarray:
        """This role's ``[in, heads * head_dim]`` weight, head-major."""
        return self.weight_array()[:, self.role_columns()]

    def role_bias(self) -> np.ndarray | None:
        bias = self.bias_array()
        return None if bias is None else bias[self.role_columns()]


@dataclass
class SplitReshape:
    """The Reshape ``[.., n*d] → [.., n, d]`` of one role, and where its target carries ``n``."""

    role: str
    node: ir.Node
    head_entry: int  # index of the head count in the target shape (its value may be -1); the head axis
    #: where the role's head tensor starts when it is not the Reshape's output (a routed fused layout)
    value: ir.Value | None = None

    @property
    def head_value(self) -> ir.Value:
        return self.node.outputs[0] if self.value is None else self.value


@dataclass
class Repeat:
    """GQA repeat ``Unsqueeze(x, [a+1]) → Expand([.., K, r, ..]) → Reshape([.., K*r, ..])`` of K or V."""

    unsqueeze: ir.Node
    expand: ir.Node
    reshape: ir.Node
    axis: int  # head axis of the repeated (kv-space) input
    n_rep: int


@dataclass
class HeadGather:
    """``Gather(kv, indices, axis=a)``: query head ``i`` reads kv head ``indices[i]`` (uneven groups)."""

    node: ir.Node
    axis: int
    indices: list[int]


@dataclass
class Join:
    """An MHA meeting point: a MatMul whose input ``index`` is in kv-head space, the other in q space."""

    node: ir.Node
    index: int
    axis: int


@dataclass
class HeadTensor:
    """A value that carries a head axis (its static width changes with the head count)."""

    value: ir.Value
    axis: int
    space: str  # "q" | "kv"
    merged: bool = False  # head axis folded into axis 0 (no static width to update)


@dataclass
class AttentionBlock:
    """One attention block, proven or not; ``reasons`` says why an unsupported block is left alone."""

    name: str
    layer: str
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    projections: dict[str, Projection] = field(default_factory=dict)
    splits: dict[str, SplitReshape] = field(default_factory=dict)
    repeats: list[Repeat] = field(default_factory=list)
    gathers: list[HeadGather] = field(default_factory=list)
    joins: list[Join] = field(default_factory=list)
    kv_map: list[int] = field(default_factory=list)  # query head -> kv head it reads
    merge: ir.Node | None = None
    merge_entry: int = -1
    tensors: list[HeadTensor] = field(default_factory=list)
    #: identity Reshapes of head tensors whose target names the head count: (node, entry, "q" | "kv")
    head_reshapes: list[tuple[ir.Node, int, str]] = field(default_factory=list)
    #: per-head operands of elementwise ops, constant (sliced with the heads) or computed (gathered):
    #: (node, input index, axis, "q" | "kv")
    head_constants: list[tuple[ir.Node, int, int, str]] = field(default_factory=list)
    cache_inputs: dict[str, ir.Value] = field(default_factory=dict)  # "k"/"v" -> past graph input
    cache_outputs: dict[str, ir.Value] = field(default_factory=dict)  # "k"/"v" -> present graph output
    reasons: list[str] = field(default_factory=list)
    zero_heads: dict[int, str] = field(default_factory=dict)  # query head -> why its contribution is zero
    v_zero_blocked: str = ""
    route: Route | None = None  # the fused q/k/v routing when the roles share one head split

    @property
    def supported(self) -> bool:
        return not self.reasons

    def kv_of(self, head: int) -> int:
        """The kv head that query head ``head`` reads."""
        return self.kv_map[head]

    def summary(self) -> dict:
        """JSON-friendly description for ``inspect`` and reports."""
        return {
            "block": self.name,
            "layer": self.layer,
            "supported": self.supported,
            "reasons": self.reasons,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "gqa": "repeat" if self.repeats else "gather" if self.gathers else "mha" if self.joins else "",
            "kv_map": self.kv_map,
            "fused_qkv": any(p.split is not None or p.columns is not None for p in self.projections.values()),
            "biases": sorted(r for r, p in self.projections.items() if p.bias is not None),
            "kv_cache": bool(self.cache_inputs),
            "zero_heads": {str(h): why for h, why in sorted(self.zero_heads.items())},
            "zero_v_criterion": self.v_zero_blocked or "used",
        }


@dataclass
class AttentionAnalysis:
    blocks: list[AttentionBlock]

    @property
    def supported(self) -> list[AttentionBlock]:
        return [b for b in self.blocks if b.supported]

    def summary(self) -> list[dict]:
        return [b.summary() for b in self.blocks]
