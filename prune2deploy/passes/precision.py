"""Convert a float32 graph to fp16 or bf16 tensor types, keeping chosen parts in float32.

TensorRT 11 and TensorRT for RTX removed the precision builder flags: a network is strongly typed and its
precision *is* the ONNX tensor types. So precision becomes a graph pass. Approximate: rounding weights and
activations changes the outputs; the caller reports the error against the fp32 reference.

Why not ``onnxruntime.transformers.float16.convert_float_to_float16``: it works on our dynamo-exported
graphs (max |diff| ≈ 2e-4 on the tiny Llama), but it only knows fp16, works on a whole in-memory
``ModelProto`` (no memory-mapped weights, 2 GB protobuf limit) and is not an onnx_ir pass. This pass does
the same job in place on onnx_ir, for fp16 and bf16, keeps node metadata (``p2d.sparsity``) and keeps
numerically sensitive chains (the sum of squares of a norm, softmax) in fp32; the tests check it against
ONNX Runtime's converter.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from prune2deploy.errors import ConfigError, UnsupportedModelError
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import PassSpec, register_pass

__all__ = ["DEFAULT_KEEP_FP32_OPS", "PRECISIONS", "ConvertPrecisionPass"]

log = logging.getLogger(__name__)

PRECISIONS: dict[str, ir.DataType] = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}

#: Ops whose fp16 rounding hurts most: norm statistics (x², mean, 1/sqrt) and softmax.
DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = (
    "Pow",
    "ReduceMean",
    "ReduceSumSquare",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
)

# Ops that must stay in fp32 whatever the user asks: a float input with a fixed type (Resize scales),
# a dtype attribute, quantisation, or a subgraph that this pass does not rewrite.
_TYPE_BOUND_OPS = frozenset(
    {
        "Resize",
        "Upsample",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "EyeLike",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "If",
        "Loop",
        "Scan",
    }
)

# Elementwise ops that stay in fp32 when every non-constant float input is already kept in fp32, so that a
# kept Pow→ReduceMean continues through Add(eps)→Sqrt→Reciprocal instead of bouncing through fp16.
_FOLLOWERS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Max", "Min"})

_FP16_MAX = float(np.finfo(np.float16).max)


class ConvertPrecisionPass(P2DPass):
    """Retypes float32 weights and activations to fp16 or bf16.

    Args:
        precision: ``"fp16"`` or ``"bf16"``.
        keep_io_types: graph inputs and outputs stay float32 (Casts are inserted), so callers and
            verification feed and read the same types as the reference.
        keep_fp32_ops: op types kept in float32, extended through elementwise followers fed only by
            kept nodes and constants (a norm's ``Add(eps)→Sqrt→Reciprocal``). Empty keeps nothing.
        keep_fp32_nodes: node names kept in float32 (for a layer that overflows in fp16).
    """

    name = "convert-precision"

    def __init__(
        self,
        precision: str = "fp16",
        *,
        keep_io_types: bool = True,
        keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
        keep_fp32_nodes: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {sorted(PRECISIONS)} for {self.name}.")
        self.precision = precision
        self.target = PRECISIONS[precision]
        self.keep_io_types = keep_io_types
        self.keep_fp32_ops = frozenset(keep_fp32_ops)
        self.keep_fp32_nodes = frozenset(keep_fp32_nodes)

    def __repr__(self) -> str:
        return (
            f"ConvertPrecisionPass({self.precision!r}, keep_io_types={self.keep_io_types}, "
            f"keep_fp32_ops={sorted(self.keep_fp32_ops)})"
        )

    # -- the pass -------------------------------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        """Every node output is typed: casts are decided from types, never guessed."""
        _check_typed(model.graph, self.name)

    def call(self, model: ir.Model) -> P2DResult:
        graph = model.graph
        kept = self._kept_nodes(graph)
        self._casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self._clipped = 0
        converted_inits = self._convert_initializers(graph, kept)
        if not self.keep_io_types:
            for value in graph.inputs:
                if value.dtype == ir.DataType.FLOAT:
                    value.dtype = self.target

        converted = 0
        for node in list(graph):
            low = node not in kept
            for index, value in enumerate(node.inputs):
                if value is None:
                    continue
                if low and value.dtype == ir.DataType.FLOAT:
                    replacement = converted_inits.get(id(value)) or self._cast(graph, node, value, self.target)
                    node.replace_input_with(index, replacement)
                elif not low and value.dtype == self.target:
                    node.replace_input_with(index, self._cast(graph, node, value, ir.DataType.FLOAT))
            if low:
                converted += self._retype_node(node)

        outputs_cast = self._fix_outputs(graph) if self.keep_io_types else 0
        kept_ops: dict[str, int] = {}
        for node in kept:
            kept_ops[node.op_type] = kept_ops.get(node.op_type, 0) + 1
        result = self.result(
            model,
            modified=True,
            exact=False,
            precision=self.precision,
            nodes_converted=converted,
            nodes_kept_fp32=len(kept),
            kept_fp32_ops=kept_ops,
            initializers_converted=self._inits_converted,
            casts_inserted=len(self._casts) + outputs_cast,
            values_clipped=self._clipped,
        )
        log.info("%s: %s", self.name, result.record)
        return result

    def _kept_nodes(self, graph: ir.Graph) -> set[ir.Node]:
        """Nodes that stay in fp32: forced, chosen by the user, and their elementwise followers."""
        kept: set[ir.Node] = set()
        opset = graph.opset_imports.get("", 18)
        for node in graph:  # graph order is topological, so producers are decided first
            has_subgraph = any(
                attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
            )
            if (
                node.domain not in ("", "ai.onnx")
                or has_subgraph
                or node.op_type in _TYPE_BOUND_OPS
                or node.op_type in self.keep_fp32_ops
                or (node.name and node.name in self.keep_fp32_nodes)
                or not _schema_allows(node.op_type, opset, self.target)
            ) or (node.op_type in _FOLLOWERS and self._fed_by_kept(node, kept)):
                kept.add(node)
        return kept

    @staticmethod
    def _fed_by_kept(node: ir.Node, kept: set[ir.Node]) -> bool:
        fed = False
        for value in node.inputs:
            if value is None or value.dtype != ir.DataType.FLOAT or value.const_value is not None:
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                continue
            if producer is None or producer not in kept:
                return False
            fed = True
        return fed

    def _convert_initializers(self, graph: ir.Graph, kept: set[ir.Node]) -> dict[int, ir.Value]:
        """Converts float initializers; one read by fp32 and low nodes alike gets a converted copy."""
        converted: dict[int, ir.Value] = {}
        self._inits_converted = 0
        graph_inputs = {id(v) for v in graph.inputs}
        for value in list(graph.initializers.values()):
            if value.dtype != ir.DataType.FLOAT or value.const_value is None or id(value) in graph_inputs:
                continue
            users = [use.node for use in value.uses()]
            if all(user in kept for user in users):
                continue
            tensor = self._convert_tensor(value.const_value)
            self._inits_converted += 1
            if any(user in kept for user in users) or value in graph.outputs:
                copy = ir.Value(
                    name=f"{value.name}_{self.precision}",
                    shape=value.shape,
                    type=ir.TensorType(self.target),
                    const_value=tensor,
                )
                graph.register_initializer(copy)
                converted[id(value)] = copy
            else:
                value.const_value = tensor
                value.dtype = self.target
        return converted

    def _convert_tensor(self, tensor: ir.TensorProtocol) -> ir.Tensor:
        array = tensor.numpy().astype(np.float32, copy=False)
        if self.target == ir.DataType.FLOAT16:
            over = np.abs(array) > _FP16_MAX
            self._clipped += int(np.count_nonzero(over & np.isfinite(array)))
            array = np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)
        else:
            array = array.astype(ml_dtypes.bfloat16)
        return ir.Tensor(array, dtype=self.target, name=tensor.name)

    def _retype_node(self, node: ir.Node) -> int:
        """Moves one low-precision node's float outputs and float attributes to the target type."""
        if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", int(self.target))
        elif node.op_type in ("Constant", "ConstantOfShape"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT:
                node.attributes["value"] = ir.AttrTensor("value", self._convert_tensor(attr.value))
            elif node.op_type == "Constant" and ("value_float" in node.attributes or "value_floats" in node.attributes):
                name = "value_float" if "value_float" in node.attributes else "value_floats"
                data = np.asarray(node.attributes[name].value, dtype=np.float32)
                del node.attributes[name]
                node.attributes["value"] = ir.AttrTensor("value", self._convert_tensor(ir.Tensor(data)))
        changed = 0
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT:
                value.dtype = self.target
                changed = 1
        return changed

    def _cast(self, graph: ir.Graph, before: ir.Node, value: ir.Value, to: ir.DataType) -> ir.Value:
        """One Cast per (value, type), placed before its first consumer in graph order."""
        key = (id(value), to)
        if key not in self._casts:
            cast = ir.node(
                "Cast",
                inputs=[value],
                attributes={"to": int(to)},
                name=f"p2d_cast_{value.name}_{to.name.lower()}",
            )
            out = cast.outputs[0]
            out.name = f"{value.name}_{to.name.lower()}"
            out.dtype = to
            out.shape = value.shape
            graph.insert_before(before, cast)
            self._casts[key] = out
        return self._casts[key]

    def _fix_outputs(self, graph: ir.Graph) -> int:
        """Casts low-precision graph outputs back to float32 under their original names."""
        count = 0
        for index, value in enumerate(list(graph.outputs)):
            if value.dtype != self.target:
                continue
            name = value.name
            value.name = f"{name}_{self.precision}"
            cast = ir.node("Cast", inputs=[value], attributes={"to": int(ir.DataType.FLOAT)}, name=f"p2d_cast_{name}")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = name, ir.DataType.FLOAT, value.shape
            graph.append(cast)
            graph.outputs[index] = out
            count += 1
        return count

    @property
    def options(self) -> dict[str, Any]:
        """The configuration, as the report shows it."""
        return {
            "precision": self.precision,
            "keep_io_types": self.keep_io_types,
            "keep_fp32_ops": sorted(self.keep_fp32_ops),
            "keep_fp32_nodes": sorted(self.keep_fp32_nodes),
        }


def _check_typed(graph: ir.Graph, pass_name: str) -> None:
    """Every node output needs a type: the pass decides casts from types and never guesses them."""
    for node in graph:
        for value in node.outputs:
            if value.dtype is None:
                raise UnsupportedModelError(
                    f"{pass_name}: output {value.name!r} of node {node.name!r} ({node.op_type}) has no "
                    "type; run shape inference (onnx_ir.passes.common.ShapeInferencePass) first."
                )


@functools.lru_cache(maxsize=512)
def _schema_allows(op_type: str, opset: int, target: ir.DataType) -> bool:
    """Whether the ONNX schema lets every float32 type variable of ``op_type`` take ``target``.

    bf16 is missing from many opset-18 schemas (Cos, Sin, Range …); such nodes stay in float32 rather than
    produce a graph that no runtime accepts.
    """
    try:
        schema = onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return False
    wanted = f"tensor({'float16' if target == ir.DataType.FLOAT16 else 'bfloat16'})"
    for constraint in schema.type_constraints:
        allowed = set(constraint.allowed_type_strs)
        if "tensor(float)" in allowed and wanted not in allowed:
            return False
    return True


def _check(options: Any) -> None:
    if options.precision == "fp32":
        raise ConfigError("the convert-precision pass needs --precision fp16 or bf16")


register_pass(
    PassSpec(
        name="convert-precision",
        order=70,
        exactness="no",
        summary="fp16/bf16 ONNX (--precision), for TensorRT 11 / RTX",
        build=lambda o: ConvertPrecisionPass(o.precision),
        check=_check,
        stage="precision",
        in_torch="own-way",
    )
)
