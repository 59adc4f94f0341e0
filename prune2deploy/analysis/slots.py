"""The vocabulary of channel analysis: slots, the facts axis rules declare about them, and the rule context.

Split from ``channels`` so that the per-op rule modules (``axis_rules``, ``zero_rules``) and the analysis
that runs them import it in one direction: rules → slots ← channels, and channels → rules.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from prune2deploy.graph.dims import rank as _rank
from prune2deploy.graph.dims import value_dim

__all__ = ["ChannelFacts", "Contraction", "Fixup", "RuleContext", "Slot", "UnionFind"]


@dataclass(frozen=True)
class Slot:
    """One axis of one value."""

    value: ir.Value
    axis: int

    def __repr__(self) -> str:
        return f"{self.value.name}[{self.axis}]"

    @property
    def is_const(self) -> bool:
        return self.value.const_value is not None

    def __hash__(self) -> int:
        return hash((id(self.value), self.axis))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slot) and other.value is self.value and other.axis == self.axis


@dataclass
class Contraction:
    """A node that sums over a channel: the channel ends here (MatMul K, Gemm K, Conv input channels)."""

    node: ir.Node
    lhs: Slot
    rhs: Slot
    groups: int = 1  # a grouped Conv: ``rhs`` (weight axis 1) holds C_in / groups channels, per group of rows


@dataclass
class Fixup:
    """A constant that carries a width (Reshape target, Split sizes, Slice bounds, Conv groups)."""

    kind: str  # "width" | "split" | "slice" | "groups" | "gather"
    node: ir.Node
    slot: Slot  # the slot whose kept indices decide the new value
    data: dict = field(default_factory=dict)


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, item):
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class ChannelFacts(abc.ABC):
    """What the axis rules declared over one graph; :class:`~prune2deploy.analysis.channels.ChannelAnalysis`
    builds groups from it and answers :meth:`zero_mask`, which the zero rules call back into."""

    def __init__(self) -> None:
        self._same = UnionFind()
        self._segments: list[tuple[Slot, Slot, int]] = []
        self._contractions: list[Contraction] = []
        self._blocked: list[tuple[Slot, str, str]] = []
        self._fixups: list[Fixup] = []
        self._norms: list[tuple[ir.Node, Slot]] = []  # (LayerNormalization, its input's normalised axis)

    @abc.abstractmethod
    def zero_mask(self, slot: Slot) -> np.ndarray | None:
        """Boolean per channel: provably zero for every input. ``None`` when the width is unknown."""

    @abc.abstractmethod
    def const_channels(self, slot: Slot) -> np.ndarray | None:
        """Per channel: its value where it is provably the same at every position for every input, else NaN."""


class RuleContext:
    """What an axis rule can say about one node. Every slot of the node must be linked, ended or blocked."""

    def __init__(self, analysis: ChannelFacts, node: ir.Node) -> None:
        self.analysis = analysis
        self.node = node
        self.touched: set[Slot] = set()

    # -- helpers for rules -------------------------------------------------------------------------------
    @staticmethod
    def rank(value: ir.Value | None) -> int | None:
        return _rank(value)

    @staticmethod
    def dim(value: ir.Value, axis: int) -> int | str | None:
        return value_dim(value, axis)

    def slot(self, value: ir.Value, axis: int) -> Slot:
        rank = self.rank(value)
        assert rank is not None
        return Slot(value, axis % rank)

    # -- declarations ---------------------------------------------------------------------------------------
    def same(self, a: Slot, b: Slot) -> None:
        self.touched.update((a, b))
        self.analysis._same.union(a, b)

    def segment(self, part: Slot, whole: Slot, offset: int) -> None:
        """``part[j]`` is ``whole[offset + j]``."""
        self.touched.update((part, whole))
        self.analysis._segments.append((part, whole, offset))

    def contract(self, lhs: Slot, rhs: Slot) -> None:
        self.same(lhs, rhs)
        self.analysis._contractions.append(Contraction(self.node, lhs, rhs))

    def block(self, slot: Slot, reason: str) -> None:
        self.touched.add(slot)
        self.analysis._blocked.append((slot, self.node.name or self.node.op_type, reason))

    def contract_grouped(self, lhs: Slot, rhs: Slot, groups: int) -> None:
        """A grouped Conv sums input channel ``g·k + j`` against weight column ``j`` of group ``g``'s rows:
        the weight axis is narrower than the channel axis, so it is not linked to it, only recorded."""
        self.touched.update((lhs, rhs))
        self.analysis._contractions.append(Contraction(self.node, lhs, rhs, groups))

    def norm(self, slot: Slot) -> None:
        """The node normalises over ``slot``'s channels: a channel may go only where it is zero at ``slot``
        (then the statistics over the kept channels are rescaled exactly by the pass)."""
        self.analysis._norms.append((self.node, slot))

    def fixup(self, kind: str, slot: Slot, **data) -> None:
        self.analysis._fixups.append(Fixup(kind, self.node, slot, data))

    def link_elementwise(self, inputs: Iterable[ir.Value | None], output: ir.Value) -> bool:
        """Numpy broadcasting: aligned axes of equal width are one channel space; width-1 axes broadcast."""
        out_rank = self.rank(output)
        if out_rank is None:
            return False
        for value in inputs:
            if value is None:
                continue
            rank = self.rank(value)
            if rank is None:
                return False
            for axis in range(rank):
                out_axis = out_rank - rank + axis
                d_in, d_out = self.dim(value, axis), self.dim(output, out_axis)
                if d_in == 1 and d_out != 1:
                    self.touched.add(Slot(value, axis))  # broadcast: carries no channel
                    continue
                self.same(Slot(value, axis), Slot(output, out_axis))
        return True
