"""The hidden (residual-stream) channel space: every tensor that carries it, every constant that must shrink
with it, the reductions that average over it, and which of its channels are provably zero.

The generic channel analysis (``analysis.channels``) treats the residual stream as one class and blocks it
at the normalisations, because a reduction over the channel axis changes value when the axis shrinks. That
is the right answer for a generic pass; this module is the specialised one. It walks the stream from the
residual Adds (``analysis.blocks``) with a small rule per op, and records the reductions instead of
refusing them, so that ``passes.prune_hidden`` can correct RMSNorm exactly and report LayerNorm as
approximate.

A channel is zero in the stream when every *source* leaves it zero: embedding columns, the output columns
(and biases) of every projection that writes into the stream, per-channel constants added to it, and the
scale and bias of each LayerNormalization on it (RMSNorm and products preserve zeros). A channel that no
reader uses but that some writer fills is *not* removable exactly: it still enters every norm's statistics.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.blocks import find_layers
from prune2deploy.graph.attributes import int_attr
from prune2deploy.graph.constants import zero_channels

__all__ = ["ConstUse", "HiddenStream", "analyze_hidden"]

log = logging.getLogger(__name__)

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
_UNARY = {"Identity", "Cast", "Neg"}


@dataclass
class ConstUse:
    """One constant input of one node that carries the hidden axis on ``axes`` (slice a copy per use)."""

    node: ir.Node
    index: int
    axes: set[int]
    role: str  # "embedding" | "writer" | "reader" | "norm-scale" | "norm-bias" | "per-channel"

    @property
    def value(self) -> ir.Value:
        return self.node.inputs[self.index]


@dataclass
class HiddenStream:
    """Result of :func:`analyze_hidden`; ``reason`` is empty when the stream can be narrowed."""

    width: int | None = None
    values: list[ir.Value] = field(default_factory=list)
    consts: dict[tuple[int, int], ConstUse] = field(default_factory=dict)
    reductions: list[tuple[ir.Node, str]] = field(default_factory=list)  # (node, "mean" | "layernorm")
    outputs: list[ir.Value] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    sources: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (what, zero mask over channels)
    transposes: list[ir.Node] = field(default_factory=list)  # Transpose(constant) weights: reshape outputs

    @property
    def ok(self) -> bool:
        return not self.blocked and bool(self.width)

    @property
    def reason(self) -> str:
        if self.blocked:
            node, reason = self.blocked[0]
            return f"{node}: {reason}" if node else reason
        return "" if self.width else "no residual stream found"

    def zero_channels(self) -> list[int]:
        """Channels that every source leaves zero: zero everywhere in the stream, for every input."""
        if not self.width:
            return []
        mask = np.ones(self.width, dtype=bool)
        for _, zero in self.sources:
            mask &= zero
        return [int(i) for i in np.flatnonzero(mask)]

    def uses(self, role: str) -> list[ConstUse]:
        return [u for u in self.consts.values() if u.role == role]

    def summary(self) -> dict:
        return {
            "width": self.width,
            "tensors": len(self.values),
            "constants": len(self.consts),
            "embeddings": len(self.uses("embedding")),
            "writers": len(self.uses("writer")),
            "readers": len(self.uses("reader")),
            "rms_reductions": sum(kind == "mean" for _, kind in self.reductions),
            "layernorms": sum(kind == "layernorm" for _, kind in self.reductions),
            "graph_outputs": [v.name for v in self.outputs],
            "zero_channels": len(self.zero_channels()) if self.ok else 0,
            "blocked": self.reason,
        }


def _last_dim(value: ir.Value | None) -> int | str | None:
    if value is None or value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else str(dim)


class _Walker:
    def __init__(self, width: int) -> None:
        self.stream = HiddenStream(width=width)
        self.in_stream: set[int] = set()
        self.queue: deque[ir.Value] = deque()
        self.done: set[tuple[int, str]] = set()

    # -- bookkeeping --------------------------------------------------------------------------------------
    def add(self, value: ir.Value) -> None:
        if id(value) in self.in_stream:
            return
        if _last_dim(value) != self.stream.width:
            self.block(
                value.producer(), f"'{value.name}' joins the hidden stream but its last dim is {_last_dim(value)}"
            )
            return
        self.in_stream.add(id(value))
        self.stream.values.append(value)
        self.queue.append(value)

    def block(self, node: ir.Node | None, reason: str) -> None:
        name = (node.name or node.op_type) if node is not None else ""
        self.stream.blocked.append((name, reason))

    def const(self, node: ir.Node, index: int, axis: int, role: str) -> None:
        key = (id(node), index)
        use = self.stream.consts.get(key)
        if use is None:
            self.stream.consts[key] = ConstUse(node, index, {axis}, role)
        else:
            use.axes.add(axis)

    def source(self, what: str, mask: np.ndarray) -> None:
        self.stream.sources.append((what, np.asarray(mask, dtype=bool)))

    def once(self, node: ir.Node, role: str) -> bool:
        key = (id(node), role)
        if key in self.done:
            return False
        self.done.add(key)
        return True

    # -- walk ---------------------------------------------------------------------------------------------
    def run(self) -> HiddenStream:
        while self.queue:
            value = self.queue.popleft()
            if value.is_graph_output():
                self.stream.outputs.append(value)
            if value.is_graph_input():
                self.block(None, f"graph input '{value.name}' carries the hidden width")
            producer = value.producer()
            if producer is not None:
                self.visit(producer, "out", value.index())
            for use in list(value.uses()):
                self.visit(use.node, "in", use.idx)
        return self.stream

    def visit(self, node: ir.Node, side: str, index: int) -> None:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if op in _ELEMENTWISE:
            if self.once(node, "node"):
                self.elementwise(node)
        elif op in _UNARY or op == "Pow":
            if self.once(node, "node"):
                self.unary(node)
        elif op == "ReduceMean" and side == "in" and index == 0:
            if self.once(node, "node"):
                self.reduce_mean(node)
        elif op == "LayerNormalization" and ((side == "in" and index == 0) or (side == "out" and index == 0)):
            if self.once(node, "node"):
                self.layer_norm(node)
        elif op in ("MatMul", "Gemm") and side == "in" and index == 0:
            if self.once(node, "reader"):
                self.reader(node)
        elif op in ("MatMul", "Gemm") and side == "out":
            if self.once(node, "writer"):
                self.writer(node)
        elif op == "Gather" and not (side == "in" and index == 1):
            if self.once(node, "node"):
                self.gather(node)
        else:
            where = f"output {index}" if side == "out" else f"input {index}"
            self.block(node, f"{op} reads or writes the hidden stream ({where}) and has no hidden-width rule")

    def elementwise(self, node: ir.Node) -> None:
        out = node.outputs[0]
        self.add(out)
        op = node.op_type
        rank = len(out.shape) if out.shape is not None else None
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            last = _last_dim(value)
            if value.const_value is not None:
                array = value.const_value.numpy()
                if array.ndim and last == self.stream.width:
                    self.const(node, index, array.ndim - 1, "per-channel")
                    if op in ("Add", "Sub"):
                        self.source(f"{node.name} constant", zero_channels(array, array.ndim - 1))
                    elif op == "Div" and index == 1 and np.any(array == 0):
                        self.block(node, "divides the hidden stream by a constant with zeros")
                elif array.size == 1 or last == 1:
                    if op in ("Add", "Sub") and np.any(array):
                        self.source(f"{node.name} broadcast constant", np.zeros(self.stream.width, dtype=bool))
                else:
                    self.block(node, f"constant '{value.name}' of shape {array.shape} does not broadcast per channel")
            elif last == self.stream.width and (rank is None or value.shape is None or len(value.shape) == rank):
                if op == "Div" and index == 1:
                    self.block(node, "divides by the hidden stream")
                self.add(value)
            elif last == 1 or (value.shape is not None and len(value.shape) == 0):
                if op in ("Add", "Sub"):  # adds a per-token value to every channel: nothing stays zero
                    self.source(f"{node.name} broadcast input", np.zeros(self.stream.width, dtype=bool))
                if op == "Div" and index == 0:
                    self.block(node, "divides a broadcast value by the hidden stream")
            else:
                self.block(node, f"operand '{value.name}' has last dim {last}, not the hidden width or 1")

    def unary(self, node: ir.Node) -> None:
        if node.op_type == "Pow":
            exponent = node.inputs[1]
            if exponent is None or exponent.const_value is None or exponent.const_value.numpy().size != 1:
                self.block(node, "Pow with a non-scalar or run-time exponent")
                return
            if not float(exponent.const_value.numpy().reshape(())) > 0:
                self.block(node, "Pow with a non-positive exponent does not keep zeros")
                return
        self.add(node.inputs[0])
        self.add(node.outputs[0])

    def reduce_mean(self, node: ir.Node) -> None:
        x = node.inputs[0]
        rank = len(x.shape)
        axes = None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            if node.inputs[1].const_value is None:
                self.block(node, "ReduceMean axes are computed at run time")
                return
            axes = [int(a) % rank for a in node.inputs[1].const_value.numpy().reshape(-1)]
        elif "axes" in node.attributes:
            axes = [int(a) % rank for a in node.attributes["axes"].value]
        if axes != [rank - 1] or int_attr(node, "keepdims", 1) != 1:
            self.block(node, f"ReduceMean over axes {axes} (only a keepdims mean over the hidden axis is handled)")
            return
        self.stream.reductions.append((node, "mean"))

    def layer_norm(self, node: ir.Node) -> None:
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else 0
        if int_attr(node, "axis", -1) % max(rank, 1) != rank - 1:
            self.block(node, "LayerNormalization over more than the hidden axis")
            return
        if any(out is not None and list(out.uses()) for out in node.outputs[1:]):
            self.block(node, "LayerNormalization's mean / inv-std outputs are used")
            return
        self.add(x)
        self.add(node.outputs[0])
        scale = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        zero = np.ones(self.stream.width, dtype=bool)
        for index, value, role in ((1, scale, "norm-scale"), (2, bias, "norm-bias")):
            if value is None:
                continue
            if value.const_value is None or value.const_value.numpy().shape != (self.stream.width,):
                self.block(node, f"LayerNormalization {role} '{value.name}' is not a constant of the hidden width")
                return
            self.const(node, index, 0, role)
            zero &= value.const_value.numpy() == 0
        self.source(f"{node.name} (LayerNorm scale and bias)", zero)
        self.stream.reductions.append((node, "layernorm"))

    def _weight(self, node: ir.Node) -> tuple[np.ndarray, ir.Node, int, list[int]] | None:
        """(weight as the node sees it, node and input holding the constant, perm from seen to stored axes).

        A weight may be a Transpose of a constant that the exporter did not fold (SmolLM2's tied head:
        ``MatMul(x, Transpose(embed_tokens))``); the constant is then sliced under the Transpose.
        """
        weight = node.inputs[1]
        if weight is not None and weight.const_value is None:
            producer = weight.producer()
            if (
                producer is not None
                and producer.op_type == "Transpose"
                and producer.inputs[0].const_value is not None
                and len(producer.inputs[0].const_value.shape) == 2
                and len(list(weight.uses())) == 1
                and not weight.is_graph_output()
            ):
                perm_attr = producer.attributes.get("perm")
                perm = [int(p) for p in perm_attr.value] if perm_attr is not None else [1, 0]
                self.stream.transposes.append(producer)
                return producer.inputs[0].const_value.numpy().transpose(perm), producer, 0, perm
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            self.block(node, f"{node.op_type} with a run-time or non-2-D weight touches the hidden stream")
            return None
        return weight.const_value.numpy(), node, 1, [0, 1]

    def reader(self, node: ir.Node) -> None:
        if node.op_type == "Gemm" and int_attr(node, "transA", 0):
            self.block(node, "Gemm with transA reads the hidden stream")
            return
        found = self._weight(node)
        if found is None:
            return
        _, holder, index, perm = found
        axis = 1 if node.op_type == "Gemm" and int_attr(node, "transB", 0) else 0
        self.const(holder, index, perm[axis], "reader")

    def writer(self, node: ir.Node) -> None:
        found = self._weight(node)
        if found is None:
            return
        weight, holder, index, perm = found
        if node.op_type == "MatMul":
            self.const(holder, index, perm[1], "writer")
            self.source(f"{node.name} weight", zero_channels(weight, 1))
            return
        if int_attr(node, "transA", 0) and len(node.outputs[0].shape or ()) != 2:
            self.block(node, "Gemm writer with an unexpected layout")
            return
        axis = 0 if int_attr(node, "transB", 0) else 1
        self.const(holder, index, perm[axis], "writer")
        zero = zero_channels(weight, axis)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            if bias.const_value is None:
                self.block(node, "Gemm bias computed at run time")
                return
            array = bias.const_value.numpy()
            if array.ndim and array.shape[-1] == self.stream.width:
                self.const(node, 2, array.ndim - 1, "writer")
                zero = zero & zero_channels(array, array.ndim - 1)
            elif np.any(array):
                zero = np.zeros_like(zero)
        self.source(f"{node.name} weight", zero)

    def gather(self, node: ir.Node) -> None:
        data, out = node.inputs[0], node.outputs[0]
        axis = int_attr(node, "axis", 0)
        if data.const_value is not None:
            array = data.const_value.numpy()
            if array.ndim != 2 or axis % 2 != 0 or array.shape[1] != self.stream.width:
                self.block(node, f"Gather on a constant of shape {array.shape} along axis {axis}")
                return
            self.const(node, 0, 1, "embedding")
            self.source(f"{node.name} table", zero_channels(array, 1))
            self.add(out)
            return
        rank = len(data.shape) if data.shape is not None else 0
        if rank == 0 or axis % rank == rank - 1:
            self.block(node, "Gather along the hidden axis")
            return
        self.add(data)
        self.add(out)


def analyze_hidden(model: ir.Model) -> HiddenStream:
    """Walks the residual stream of ``model`` starting from its residual Adds."""
    seeds = [block.residual for layer in find_layers(model) for block in layer.blocks]
    if not seeds:
        return HiddenStream(blocked=[("", "no residual Add found (not a residual network?)")])
    if seeds[0].shape is not None and len(seeds[0].shape) == 4:
        # A CNN's stream is [N, C, H, W]: its last axis is spatial, not the channels this walker narrows.
        reason = (
            f"the residual stream '{seeds[0].name}' is 4-D (a CNN's [N, C, H, W]): prune-hidden narrows the last "
            "axis of [batch, sequence, hidden] streams; CNN residual channels (LayerNorms included) are removed "
            "as channel groups"
        )
        return HiddenStream(blocked=[("", reason)])
    width = _last_dim(seeds[0])
    if not isinstance(width, int):
        return HiddenStream(blocked=[("", f"hidden width of '{seeds[0].name}' is not static")])
    walker = _Walker(width)
    walker.add(seeds[0])
    stream = walker.run()
    missing = [s.name for s in seeds if id(s) not in walker.in_stream]
    if missing:
        stream.blocked.append(("", f"residual inputs outside the first stream (several streams?): {missing[:3]}"))
    log.debug("hidden stream: %s", stream.summary())
    return stream
