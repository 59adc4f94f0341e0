"""FLOPs, bytes moved and parameters per node, at concrete input shapes.

The roofline predictor and the before/after report both need, for each node, how much arithmetic it does
and how many bytes it must move. Both depend on concrete shapes, so everything here is evaluated at one
input shape (an explicit shape per input, or a batch and sequence length applied to the dynamic dims).

Conventions (one FLOP is one multiply or one add, so a multiply-add is 2):

- MatMul: ``2 * prod(Y.shape) * K`` (= 2·M·N·K·batch, broadcast batch dims included).
- Gemm: ``2 * M * N * K``. Conv: ``2 * prod(Y.shape) * (Cin/groups) * prod(kernel)``
  (= 2·Cout·(Cin/groups)·kh·kw·Hout·Wout·N).
  ConvTranspose: ``2 * prod(X.shape) * (Cout/groups) * prod(kernel)``.
  Bias adds and alpha/beta scaling are not counted: engines fuse them into the GEMM epilogue.
- Elementwise ops (Add, Mul, Relu, Sigmoid, Where, Cast …): one FLOP per output element.
- Softmax and normalisations: a small constant per element (:data:`FLOPS_PER_ELEMENT`), e.g. Softmax 5
  (max, subtract, exp, sum, divide). Reductions: one per input element. Pooling: one per window element.
- Data movement (Transpose, Gather, Concat, Slice, Expand …): 0 FLOPs but its bytes count.
- Views (Reshape, Squeeze, Unsqueeze, Flatten, Identity, Shape, Size, Constant): free, 0 bytes, no kernel.

Bytes moved = distinct activation inputs read + outputs written + constant weights read, each at its own
dtype size. Weights shared between nodes count once per reading node (each kernel reads them).

Shapes come from :mod:`prune2deploy.analysis.shapes` (shape inference, with one ONNX Runtime run as
the fallback for small models); nodes whose shapes stay unknown are costed as lower bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.contrib_cost import CONTRIB_FLOPS, CONTRIB_KINDS, contrib_flops
from prune2deploy.analysis.nm import NM_OPS, is_nm, nm_eligibility
from prune2deploy.analysis.shapes import PROBE_MAX_BYTES, ShapeInfo, concrete_shapes
from prune2deploy.feeds import feed_specs
from prune2deploy.graph import scopes
from prune2deploy.graph.mapped import release_tensor
from prune2deploy.graph.op_categories import (
    ACTIVATIONS,
    CONTRIB_ACTIVATIONS,
    CONVS,
    DATA_MOVEMENT,
    ELEMENTWISE_BINARY,
    ELEMENTWISE_UNARY,
    MATMULS,
    NORMALIZATIONS,
    POOLS,
    REDUCTIONS,
    VIEWS,
)

__all__ = [
    "FLOPS_PER_ELEMENT",
    "SCOPE_KEY",
    "SPARSITY_KEY",
    "UNSCOPED",
    "LayerCost",
    "ModelCost",
    "NodeCost",
    "compare_layers",
    "layer_of",
    "model_cost",
    "param_count",
]

SCOPE_KEY = scopes.SCOPE_KEY
SPARSITY_KEY = "p2d.sparsity"
UNSCOPED = "(unscoped)"

FLOPS_PER_ELEMENT: dict[str, int] = {
    "Softmax": 5,
    "LogSoftmax": 5,
    "LayerNormalization": 8,  # mean, centre, square, mean, rsqrt, scale, shift
    "SimplifiedLayerNormalization": 4,  # RMSNorm: square, mean, rsqrt, scale
    "RMSNormalization": 4,
    "SkipLayerNormalization": 9,
    "SkipSimplifiedLayerNormalization": 5,
    "BatchNormalization": 2,  # inference: one scale, one shift
    "InstanceNormalization": 8,
    "GroupNormalization": 8,
}

# FLOPS_PER_ELEMENT prices exactly the table's normalizations (tested).
_ELEMENTWISE = ELEMENTWISE_UNARY | ACTIVATIONS | CONTRIB_ACTIVATIONS | ELEMENTWISE_BINARY


@dataclass(frozen=True)
class NodeCost:
    """What one node computes and moves at concrete shapes.

    Attributes:
        name: Node name. op_type: ONNX op. layer: See :func:`layer_of`.
        kind: ``matmul``, ``conv``, ``elementwise``, ``normalization``, ``reduction``, ``data``, ``free``
            or ``other`` (unknown op: bytes counted, FLOPs 0).
        flops: Arithmetic per the module's conventions.
        bytes_read: Distinct non-constant inputs. bytes_written: Outputs. weight_bytes: Constant inputs.
        float_elements: Float elements among the activations read and written, and float_bytes their
            bytes (lets a predictor re-price them at another precision). weight_float_elements,
            weight_float_bytes: The same for the weights.
        sparsity: ``"2:4"`` (or another N:M) when the node's weight is N:M along K, else ``None``.
        shapes_known: False when some input or output shape was unknown (costs are then lower bounds).
    """

    name: str
    op_type: str
    kind: str
    layer: str
    flops: int
    bytes_read: int
    bytes_written: int
    weight_bytes: int
    float_elements: int = 0
    float_bytes: int = 0
    weight_float_elements: int = 0
    weight_float_bytes: int = 0
    sparsity: str | None = None
    shapes_known: bool = True

    @property
    def bytes(self) -> int:
        """Total bytes moved at the model's own dtypes."""
        return self.bytes_read + self.bytes_written + self.weight_bytes

    @property
    def is_kernel(self) -> bool:
        """Whether an engine launches a kernel for this node (views are free)."""
        return self.kind != "free"

    def bytes_at(self, float_itemsize: float | None = None, *, weight_factor: float = 1.0) -> float:
        """Bytes moved with float tensors stored at ``float_itemsize`` bytes per element.

        Args:
            float_itemsize: Bytes per float element at the target precision (2 for fp16); ``None`` keeps
                the model's dtypes. Integer tensors (ids, masks, shapes) keep their own size.
            weight_factor: Multiplies the weight bytes (a 2:4 weight stores about half, plus indices).
        """
        act = self.bytes_read + self.bytes_written
        weights = self.weight_bytes
        if float_itemsize is not None:
            act += self.float_elements * float_itemsize - self.float_bytes
            weights += self.weight_float_elements * float_itemsize - self.weight_float_bytes
        return act + weights * weight_factor


@dataclass(frozen=True)
class LayerCost:
    """Parameters, FLOPs and bytes of one layer (a group of nodes sharing a scope)."""

    layer: str
    params: int
    flops: int
    bytes: int
    nodes: int


@dataclass
class ModelCost:
    """Per-node costs of a model at one input shape, with totals and per-layer sums.

    ``batch`` and ``seq`` are the values applied to dynamic dims (``None`` when shapes were explicit).
    """

    nodes: list[NodeCost]
    params: int
    layer_params: dict[str, int]
    input_shapes: dict[str, tuple[int, ...]]
    shape_source: str
    unknown: tuple[str, ...] = ()
    batch: int | None = None
    seq: int | None = None

    @property
    def flops(self) -> int:
        return sum(node.flops for node in self.nodes)

    @property
    def bytes(self) -> int:
        return sum(node.bytes for node in self.nodes)

    @property
    def gemm_flops(self) -> int:
        """FLOPs of MatMul/Gemm/Conv nodes (the work tensor cores do)."""
        return sum(node.flops for node in self.nodes if node.kind in ("matmul", "conv"))

    @property
    def sparse_flops(self) -> int:
        """FLOPs of MatMul/Gemm/Conv nodes whose weight is N:M along K."""
        return sum(node.flops for node in self.nodes if node.kind in ("matmul", "conv") and node.sparsity)

    @property
    def sparse_flops_fraction(self) -> float:
        """Share of the tensor-core FLOPs that can run on sparse tensor cores (0 when there are none)."""
        total = self.gemm_flops
        return self.sparse_flops / total if total else 0.0

    def per_layer(self) -> dict[str, LayerCost]:
        """Sums per layer, in first-appearance order; parameters go to the layer that first reads them."""
        order: dict[str, list[NodeCost]] = {}
        for node in self.nodes:
            order.setdefault(node.layer, []).append(node)
        for layer in self.layer_params:
            order.setdefault(layer, [])
        return {
            layer: LayerCost(
                layer,
                self.layer_params.get(layer, 0),
                sum(n.flops for n in nodes),
                sum(n.bytes for n in nodes),
                len(nodes),
            )
            for layer, nodes in order.items()
        }


def layer_of(node: ir.Node) -> str:
    """The layer a node's cost and parameters are reported under.

    The outermost numbered module (``model.layers.3``), else the innermost module (``lm_head``), else
    :data:`UNSCOPED` for nodes without the exporter's metadata (hand-built graphs, passes' new nodes).
    """
    return scopes.layer_of(node) or scopes.module_of(node) or UNSCOPED


def _is_float(dtype: ir.DataType | None) -> bool:
    return dtype is not None and dtype.is_floating_point()


def param_count(model: ir.Model) -> tuple[int, dict[str, int]]:
    """Float initializer elements in total and per layer (each initializer counted once).

    Integer initializers (shape constants, indices) are not parameters. An initializer belongs to the
    layer of the first node that reads it.
    """
    seen: set[str] = set()
    per_layer: dict[str, int] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is None or not value.is_initializer() or value.name in seen:
                continue
            seen.add(value.name)
            tensor = value.const_value
            if tensor is None or not _is_float(tensor.dtype):
                continue
            layer = layer_of(node)
            per_layer[layer] = per_layer.get(layer, 0) + math.prod(tensor.shape.numpy())
    total = sum(per_layer.values())
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if name not in seen and tensor is not None and _is_float(tensor.dtype):
            total += math.prod(tensor.shape.numpy())
    return total, per_layer


def _kind(op_type: str) -> str:
    """How the cost model prices ``op_type``, from its category in :mod:`prune2deploy.graph.op_categories`."""
    if op_type in MATMULS:
        return "matmul"
    if op_type in CONVS:
        return "conv"
    if op_type in NORMALIZATIONS:
        return "normalization"
    if op_type in REDUCTIONS:
        return "reduction"
    if op_type in POOLS:
        return "pool"
    if op_type in VIEWS:
        return "free"
    if op_type in DATA_MOVEMENT:
        return "data"
    return "elementwise" if op_type in _ELEMENTWISE else "other"


def _flops(node: ir.Node, kind: str, shape_of, out_shape) -> int | None:
    """FLOPs of one node, ``None`` when a needed shape is unknown."""
    op = node.op_type
    if kind in ("free", "data", "other"):
        return 0
    if out_shape is None:
        return None
    out_elems = math.prod(out_shape)
    if op == "MatMul":
        a = shape_of(node.inputs[0])
        return None if a is None else 2 * out_elems * a[-1]
    if op == "Gemm":
        a = shape_of(node.inputs[0])
        if a is None:
            return None
        k = a[0] if node.attributes.get_int("transA", 0) else a[1]
        return 2 * out_elems * k
    if op == "Conv":
        w = shape_of(node.inputs[1])
        return None if w is None else 2 * out_elems * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = shape_of(node.inputs[0]), shape_of(node.inputs[1])
        return None if x is None or w is None else 2 * math.prod(x) * math.prod(w[1:])
    if kind == "normalization":
        return FLOPS_PER_ELEMENT[op] * out_elems
    if kind == "reduction":
        x = shape_of(node.inputs[0])
        return None if x is None else math.prod(x)
    if kind == "pool":
        return out_elems * math.prod(node.attributes.get_ints("kernel_shape", [1]))
    return out_elems


def _node_sparsity(node: ir.Node, n: int, m: int, detect: bool) -> str | None:
    """N:M tag of a node: the pass's metadata, or (``detect``) the pattern read from the weight itself."""
    tag = node.metadata_props.get(SPARSITY_KEY)
    if tag:
        return tag
    if not detect or node.op_type not in NM_OPS:
        return None
    verdict = nm_eligibility(node, n=n, m=m)
    if not verdict.eligible:
        return None
    weight = verdict.weight.const_value.numpy()
    if weight.ndim == 2 and not is_nm(_first_rows(weight, verdict.axis, m), n=n, m=m, axis=verdict.axis):
        return None  # a dense weight shows it in its first rows: the rest is not read
    found = is_nm(weight, n=n, m=m, axis=verdict.axis)
    del weight
    release_tensor(verdict.weight)  # a whole mapped weight was read: its pages need not stay resident
    return f"{n}:{m}" if found else None


#: Leading rows of a weight read first when looking for an N:M pattern (a few pages of it).
_PROBE_ROWS = 16


def _first_rows(weight: np.ndarray, axis: int, m: int) -> np.ndarray:
    """The leading rows of a row-major 2-D ``weight`` (contiguous memory) holding whole N:M groups: along
    ``axis`` 0 the groups run down the rows, so ``m`` × :data:`_PROBE_ROWS` of them; along 1, within a row."""
    return weight[: m * _PROBE_ROWS] if axis % 2 == 0 else weight[:_PROBE_ROWS]


class _Sizes:
    """Concrete shapes and sizes of values, from one shape inference."""

    def __init__(self, info: ShapeInfo) -> None:
        self.info = info

    def shape_of(self, value: ir.Value | None) -> tuple[int, ...] | None:
        return None if value is None or not value.name else self.info.shapes.get(value.name)

    def size_of(self, value: ir.Value) -> tuple[int, int, bool, bool]:
        """(bytes, elements, is float, known) of one value."""
        shape = self.shape_of(value)
        dtype = self.info.dtypes.get(value.name) or value.dtype
        if shape is None or dtype is None:
            return 0, 0, False, False
        elements = math.prod(shape)
        return math.ceil(elements * dtype.itemsize), elements, _is_float(dtype), True


@dataclass
class _Traffic:
    """Bytes one node moves (module docstring): activations read, outputs written, weights read, and the
    float part of each (elements and bytes, for the cost model's precision scaling)."""

    read: int = 0
    written: int = 0
    weights: int = 0
    float_elements: int = 0
    float_bytes: int = 0
    weight_float_elements: int = 0
    weight_float_bytes: int = 0
    known: bool = True


def _traffic(node: ir.Node, sizes: _Sizes) -> _Traffic:
    """Each distinct input counts once (a value read twice by one kernel is read once); constant
    initializers count as weights, everything else as activations."""
    t = _Traffic()
    seen: set[str] = set()
    for value in node.inputs:
        if value is None or value.name in seen:
            continue
        seen.add(value.name)
        nbytes, elements, is_float, ok = sizes.size_of(value)
        t.known &= ok
        is_weight = value.const_value is not None and value.is_initializer()
        if is_weight:
            t.weights += nbytes
            if is_float:
                t.weight_float_elements += elements
                t.weight_float_bytes += nbytes
        else:
            t.read += nbytes
            if is_float:
                t.float_elements += elements
                t.float_bytes += nbytes
    for value in node.outputs:
        if not value.name:
            continue
        nbytes, elements, is_float, ok = sizes.size_of(value)
        t.known &= ok
        t.written += nbytes
        if is_float:
            t.float_elements += elements
            t.float_bytes += nbytes
    return t


def _node_cost(node: ir.Node, index: int, sizes: _Sizes, *, n: int, m: int, detect_sparsity: bool) -> NodeCost:
    """One node's FLOPs, traffic and N:M tag; a view ("free" kind) moves nothing, and a node whose shapes
    are unknown is costed as a lower bound with ``shapes_known`` False."""
    contrib = node.domain == "com.microsoft"  # fused ops: the FLOPs of the subgraph they replace
    kind = CONTRIB_KINDS.get(node.op_type, _kind(node.op_type)) if contrib else _kind(node.op_type)
    traffic = _traffic(node, sizes) if kind != "free" else _Traffic()
    known = traffic.known
    out_shape = sizes.shape_of(node.outputs[0]) if node.outputs else None
    if contrib and node.op_type in CONTRIB_FLOPS:
        flops = contrib_flops(node, sizes.shape_of, out_shape)
    else:
        flops = _flops(node, kind, sizes.shape_of, out_shape)
    if flops is None:
        flops, known = 0, False
    sparsity = _node_sparsity(node, n, m, detect_sparsity) if kind in ("matmul", "conv") else None
    return NodeCost(
        name=node.name or f"{node.op_type}_{index}",
        op_type=node.op_type,
        kind=kind,
        layer=layer_of(node),
        flops=int(flops),
        bytes_read=traffic.read,
        bytes_written=traffic.written,
        weight_bytes=traffic.weights,
        float_elements=traffic.float_elements,
        float_bytes=traffic.float_bytes,
        weight_float_elements=traffic.weight_float_elements,
        weight_float_bytes=traffic.weight_float_bytes,
        sparsity=sparsity,
        shapes_known=known,
    )


def model_cost(
    model: ir.Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    seq: int = 128,
    detect_sparsity: bool = True,
    n: int = 2,
    m: int = 4,
    fallback: bool = True,
    fallback_max_bytes: int = PROBE_MAX_BYTES,
    shape_info: ShapeInfo | None = None,
) -> ModelCost:
    """Per-node FLOPs and bytes of ``model``'s main graph at one input shape.

    Args:
        model: The model; it is not modified.
        shapes: Input name -> concrete shape; other inputs get ``batch``/``seq`` on their dynamic dims.
        batch: See :func:`concrete_shapes`. seq: See :func:`concrete_shapes`.
        detect_sparsity: Also tag nodes whose weight already is N:M along K (without the pass's metadata).
        n: N of the pattern to detect. m: M of the pattern to detect.
        fallback: See :func:`concrete_shapes`. fallback_max_bytes: See :func:`concrete_shapes`.
        shape_info: Shapes computed earlier (skips inference).

    Subgraphs (If/Loop bodies) are not costed; their parent node counts its inputs and outputs only.
    """
    info = shape_info or concrete_shapes(
        model, shapes=shapes, batch=batch, seq=seq, fallback=fallback, fallback_max_bytes=fallback_max_bytes
    )
    sizes = _Sizes(info)
    nodes: list[NodeCost] = []
    for node in model.graph:
        nodes.append(_node_cost(node, len(nodes), sizes, n=n, m=m, detect_sparsity=detect_sparsity))
    params, layer_params = param_count(model)
    inputs = {spec.name: info.shapes[spec.name] for spec in feed_specs(model)}
    explicit = bool(shapes) or shape_info is not None
    return ModelCost(
        nodes,
        params,
        layer_params,
        inputs,
        info.source,
        info.unknown,
        batch=None if explicit else batch,
        seq=None if explicit else seq,
    )


def compare_layers(before: ModelCost, after: ModelCost) -> list[dict[str, object]]:
    """Per-layer parameters and FLOPs before and after compilation, in the reference's layer order.

    Layers that only one side has (a removed layer, a pass's new unscoped nodes) get 0 on the other.
    """
    old, new = before.per_layer(), after.per_layer()
    rows = []
    for layer in [*old, *(name for name in new if name not in old)]:
        a, b = old.get(layer), new.get(layer)
        rows.append(
            {
                "layer": layer,
                "params_before": a.params if a else 0,
                "params_after": b.params if b else 0,
                "flops_before": a.flops if a else 0,
                "flops_after": b.flops if b else 0,
            }
        )
    return rows
