"""Residual blocks: which Add nodes close a residual branch, what the branch's output projection is, and
how the blocks of one numbered layer chain together.

A transformer layer is found in two independent ways that must agree: by name scope (``model.layers.3``,
``encoder.layer.0``, from the exporter's metadata) and by structure (an ``Add(r, b)`` in that scope whose
branch ``b`` reads ``r``). Scopes alone are not enough: the exporter files shared computations (rotary
tables, the attention mask, Reshape targets) under the first layer that used them, so a layer's nodes are
never deleted by scope; blocks are removed by rewiring the residual Adds and letting dead-code elimination
drop what nothing reads any more.

Anything that does not fit (a branch output that is not a linear projection with a constant weight, a
layer whose residual Adds do not form a chain) is reported with the reason and never removed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from prune2deploy.graph.constants import all_zero, is_const
from prune2deploy.graph.scopes import layer_of, name_scopes

__all__ = ["Layer", "ResidualBlock", "find_layers", "layer_index"]

log = logging.getLogger(__name__)

_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}


@dataclass
class ResidualBlock:
    """One residual sub-block: ``out = Add(residual, branch)`` with ``branch`` computed from ``residual``.

    ``weight``/``bias`` belong to the branch's output projection (o_proj, down_proj, output.dense): the
    branch contributes nothing when the weight is all zero and the bias is absent or zero, and a constant
    (the bias) when only the weight is zero.
    """

    layer: str
    scope: str
    kind: str  # "attention" | "mlp"
    add: ir.Node
    residual_index: int
    projection: ir.Node | None
    weight: ir.Value | None
    bias: ir.Value | None
    reason: str = ""  # why the branch cannot be proven zero (empty when the projection was found)

    @property
    def residual(self) -> ir.Value:
        return self.add.inputs[self.residual_index]

    @property
    def branch(self) -> ir.Value:
        return self.add.inputs[1 - self.residual_index]

    @property
    def weight_zero(self) -> bool:
        return self.weight is not None and all_zero(self.weight)

    @property
    def bias_zero(self) -> bool:
        return self.bias is None or all_zero(self.bias)

    @property
    def zero(self) -> bool:
        """The branch adds exactly zero: the Add can be bypassed."""
        return not self.reason and self.weight_zero and self.bias_zero

    @property
    def constant(self) -> bool:
        """The branch adds its bias and nothing else: the Add can read the bias instead of the branch."""
        return not self.reason and self.weight_zero and not self.bias_zero

    def summary(self) -> dict:
        """JSON-friendly description for ``inspect`` and pass records."""
        blocker = self.reason
        if not blocker and not self.weight_zero:
            blocker = "output projection weight is not zero"
        elif not blocker and not self.bias_zero:
            blocker = "branch output has bias (weight zero: the branch is a constant, foldable into an Add)"
        return {
            "scope": self.scope,
            "kind": self.kind,
            "add": self.add.name,
            "projection": self.projection.name if self.projection is not None else None,
            "weight": self.weight.name if self.weight is not None else None,
            "bias": self.bias.name if self.bias is not None else None,
            "zero": self.zero,
            "constant": self.constant,
            "removable": self.zero or self.constant,
            "blocked_by": "" if self.zero else blocker,
        }


@dataclass
class Layer:
    """A numbered layer: its residual blocks in graph order and the stream value entering and leaving it."""

    name: str
    index: int | None
    blocks: list[ResidualBlock] = field(default_factory=list)
    stream_in: ir.Value | None = None
    stream_out: ir.Value | None = None
    reason: str = ""  # why the layer as a whole cannot be removed (empty when its chain is clear)


def layer_index(name: str) -> int | None:
    """The trailing number of a layer scope (``model.layers.12`` -> 12)."""
    match = re.search(r"\.(\d+)$", name)
    return int(match.group(1)) if match else None


def _branch_nodes(branch: ir.Value, residual: ir.Value, layer: str) -> tuple[list[ir.Node], bool]:
    """Nodes that compute ``branch`` inside ``layer`` and whether they read ``residual``.

    The walk stops at constants, graph inputs and values made outside the layer's scope (shared
    precomputations such as rotary tables or the attention mask are not part of the branch).
    """
    producer = branch.producer()
    if producer is None or layer_of(producer) != layer:
        return [], False
    seen: set[int] = set()
    nodes: list[ir.Node] = []
    reads = False
    stack = [producer]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for value in node.inputs:
            if value is None or is_const(value):
                continue
            if value is residual:
                reads = True
                continue
            source = value.producer()
            if source is not None and layer_of(source) == layer:
                stack.append(source)
    return nodes, reads


def _projection(branch: ir.Value) -> tuple[ir.Node | None, ir.Value | None, ir.Value | None, str]:
    """(projection node, weight, bias, reason) for the value a residual Add receives from its branch."""
    node = branch.producer()
    bias = None
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        consts = [v for v in node.inputs if is_const(v)]
        others = [v for v in node.inputs if not is_const(v)]
        if len(consts) == 1 and len(others) == 1:
            bias = consts[0]
            node = others[0].producer()
    if node is None:
        return None, None, None, "branch output is not computed by a node"
    if node.op_type == "MatMul" and is_const(node.inputs[1]):
        return node, node.inputs[1], bias, ""
    if node.op_type == "Gemm" and is_const(node.inputs[1]):
        gemm_bias = node.inputs[2] if len(node.inputs) > 2 else None
        if gemm_bias is not None and not is_const(gemm_bias):
            return node, node.inputs[1], None, "Gemm bias is computed at run time"
        if gemm_bias is not None and bias is not None:
            return node, node.inputs[1], None, "two biases after the output projection"
        return node, node.inputs[1], gemm_bias if gemm_bias is not None else bias, ""
    return None, None, None, f"branch output comes from {node.op_type} '{node.name}', not a linear projection"


def _sub_scope(node: ir.Node | None, layer: str) -> str:
    """The child module of ``layer`` that owns ``node`` (``model.layers.0.self_attn``)."""
    if node is None:
        return layer
    for scope in name_scopes(node):
        if scope.startswith(layer + "."):
            return layer + "." + scope[len(layer) + 1 :].split(".")[0]
    return layer


def _shapes_match(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None:
        return False
    return len(a.shape) == len(b.shape) and all(str(x) == str(y) for x, y in zip(a.shape, b.shape, strict=True))


def _residual_block(node: ir.Node, layer: str) -> ResidualBlock | None:
    if node.op_type != "Add" or len(node.inputs) != 2 or any(v is None or is_const(v) for v in node.inputs):
        return None
    found = []
    for index in (0, 1):
        residual, branch = node.inputs[index], node.inputs[1 - index]
        nodes, reads = _branch_nodes(branch, residual, layer)
        if reads:
            found.append((index, nodes))
    if len(found) != 1:
        return None  # not a residual Add, or both inputs read each other's sources: ambiguous
    index, nodes = found[0]
    branch = node.inputs[1 - index]
    projection, weight, bias, reason = _projection(branch)
    if not reason and not _shapes_match(node.inputs[index], node.outputs[0]):
        reason = "residual input and Add output shapes differ (the Add broadcasts)"
    kind = "attention" if any(n.op_type == "Softmax" for n in nodes) else "mlp"
    return ResidualBlock(
        layer=layer,
        scope=_sub_scope(projection, layer),
        kind=kind,
        add=node,
        residual_index=index,
        projection=projection,
        weight=weight,
        bias=bias,
        reason=reason,
    )


def _single_norm_consumer(value: ir.Value, layer: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type in _NORMS and uses[0].idx == 0 and layer_of(node) == layer:
        return node
    return None


def find_layers(model: ir.Model) -> list[Layer]:
    """The numbered layers of ``model`` with their residual blocks, in graph order."""
    graph = model.graph
    layers: dict[str, Layer] = {}
    for node in graph:
        name = layer_of(node)
        if not name:
            continue
        layer = layers.setdefault(name, Layer(name, layer_index(name)))
        block = _residual_block(node, name)
        if block is not None:
            layer.blocks.append(block)
    for layer in layers.values():
        _chain(layer)
    return list(layers.values())


def _chain(layer: Layer) -> None:
    """Finds the stream value entering and leaving ``layer``; sets ``reason`` when they are not clear.

    Pre-norm (Llama): ``h = x + attn(x); out = h + mlp(h)``. Post-norm (BERT): ``h = LN(x + attn(x));
    out = LN(h + mlp(h))``. Each block's residual input must be the previous block's output, possibly
    through one normalization node of the same layer.
    """
    if not layer.blocks:
        layer.reason = "no residual Add found in this layer's scope"
        return
    first = layer.blocks[0]
    producer = first.residual.producer()
    if producer is not None and layer_of(producer) == layer.name:
        layer.reason = f"the residual input of '{first.add.name}' is computed inside the layer"
        return
    layer.stream_in = first.residual
    previous = first.add.outputs[0]
    for block in layer.blocks[1:]:
        norm = _single_norm_consumer(previous, layer.name)
        if block.residual is previous or (norm is not None and block.residual is norm.outputs[0]):
            previous = block.add.outputs[0]
            continue
        layer.reason = f"'{block.add.name}' does not continue the residual chain of '{layer.blocks[0].add.name}'"
        return
    norm = _single_norm_consumer(previous, layer.name)
    out = norm.outputs[0] if norm is not None else previous
    inside = [u.node.name for u in out.uses() if layer_of(u.node) == layer.name]
    if inside:  # e.g. parallel attention + MLP (x + attn(x) + mlp(x)): the last Add found is not the exit
        layer.reason = f"the layer's last residual output is read inside the layer ({inside[0]})"
        return
    layer.stream_out = out
