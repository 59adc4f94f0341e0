"""Replay a compiled ONNX graph as a torch.fx module, with 2:4 weights on sparse tensor cores where possible.

The torch engine serves GPUs without TensorRT. Re-running the original ``nn.Module`` would lose everything the
passes did (removed channels, heads, layers), so the engine runs the *compiled graph*: one fx node per ONNX
node, calling the op functions of ``onnx_ops``; weights become buffers. A constant MatMul/Gemm weight whose
zeros follow the 2:4 pattern along K becomes a ``torch.sparse.to_sparse_semi_structured`` weight
(cuSPARSELt/CUTLASS) when the module is on an sm80+ GPU in fp16/bf16; otherwise it stays dense and the
report says why. An op without a torch function is an ``UnsupportedModelError`` naming the node.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
import torch.fx

from prune2deploy.engines.onnx_ops import OPS
from prune2deploy.errors import UnsupportedModelError

__all__ = [
    "ConvertedGraph",
    "SemiStructuredLinear",
    "is_24_sparse",
    "onnx_to_torch",
    "semi_structured_support",
]

log = logging.getLogger(__name__)

_MULTI_OUTPUT = frozenset({"Split"})


@dataclass
class ConvertedGraph:
    """The fx module plus what the report needs: I/O names and where sparse kernels were (not) used."""

    module: torch.fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    op_counts: dict[str, int] = field(default_factory=dict)
    semi_structured: list[str] = field(default_factory=list)
    dense_24: dict[str, str] = field(default_factory=dict)


class SemiStructuredLinear(torch.nn.Module):
    """``x @ W.T + b`` with W (out, in) stored 2:4-compressed for sparse tensor cores."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.weight = torch.nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def semi_structured_support(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if 2:4 semi-structured kernels can run here, else the reason they cannot."""
    if device.type != "cuda":
        return f"device is {device.type}: 2:4 semi-structured kernels need an NVIDIA GPU (sm80+)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU is sm{major}{minor}: 2:4 sparse tensor cores need sm80 or newer"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.int8):
        return f"weights are {dtype}: 2:4 kernels need fp16/bf16 (build with precision fp16 or bf16)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def is_24_sparse(weight: np.ndarray) -> bool:
    """Whether W (out, in) has at least 2 zeros in every group of 4 consecutive inputs (along K)."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    groups = weight.reshape(weight.shape[0], -1, 4)
    return bool((np.count_nonzero(groups, axis=-1) <= 2).all())


def _attribute(node: ir.Node, attr: ir.Attr) -> Any:
    kind = attr.type
    if kind in (ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING):
        return attr.value
    if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attr.value)
    if kind == ir.AttributeType.TENSOR and node.op_type == "ConstantOfShape":
        return attr.value.numpy().reshape(-1)[0].item()
    raise UnsupportedModelError(
        f"node {node.name!r} ({node.op_type}) has a {kind.name} attribute {attr.name!r}, which the "
        "torch engine does not support."
    )


class _Builder:
    """Walks the ONNX graph once, emitting fx nodes; constants become buffers of the root module."""

    def __init__(self, model: ir.Model, device: torch.device, semi_structured: bool) -> None:
        self.model = model
        self.device = device
        self.semi_structured = semi_structured
        self.root = torch.nn.Module()
        self.graph = torch.fx.Graph()
        self.env: dict[int, torch.fx.Node] = {}
        self.result = ConvertedGraph(module=None, input_names=[], output_names=[])  # type: ignore[arg-type]
        self._buffers = 0

    def constant(self, value: ir.Value | None, tensor: torch.Tensor | None = None) -> torch.fx.Node:
        key = id(value) if value is not None else id(tensor)
        if key not in self.env:
            if tensor is None:
                tensor = _to_torch(value.const_value.numpy())
            name = f"c{self._buffers}"
            self._buffers += 1
            self.root.register_buffer(name, tensor.to(self.device))
            self.env[key] = self.graph.get_attr(name)
        return self.env[key]

    def lookup(self, node: ir.Node | None, value: ir.Value | None) -> torch.fx.Node | None:
        if value is None:
            return None
        if id(value) in self.env:
            return self.env[id(value)]
        if value.const_value is not None:
            return self.constant(value)
        where = f"node {node.name!r}" if node is not None else "the graph outputs"
        raise UnsupportedModelError(f"value {value.name!r} read by {where} has no producer in the graph.")

    def build(self) -> ConvertedGraph:
        graph = self.model.graph
        initializers = set(graph.initializers)
        for value in graph.inputs:
            if value.name in initializers:
                continue
            self.env[id(value)] = self.graph.placeholder(_identifier(value.name))
            self.result.input_names.append(value.name)
        for node in graph:
            self.emit(node)
            self.result.op_counts[node.op_type] = self.result.op_counts.get(node.op_type, 0) + 1
        outputs = [self.lookup(None, v) for v in graph.outputs]
        self.graph.output(tuple(outputs))
        self.result.output_names = [v.name for v in graph.outputs]
        self.result.module = torch.fx.GraphModule(self.root, self.graph, class_name="CompiledOnnx")
        return self.result

    def emit(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedModelError(
                f"node {node.name!r} is {node.domain}::{node.op_type}, a custom-domain op the torch engine cannot run."
            )
        if node.op_type == "Constant":
            self._constant_node(node)
            return
        if node.op_type not in OPS:
            raise UnsupportedModelError(
                f"node {node.name!r} ({node.op_type}) has no torch implementation in the torch engine. "
                f"Supported ops: {', '.join(sorted(OPS))}."
            )
        if self.semi_structured and node.op_type in ("MatMul", "Gemm") and self._sparse_linear(node):
            return
        kwargs = {name: _attribute(node, attr) for name, attr in node.attributes.items()}
        args = [self.lookup(node, v) for v in node.inputs]
        while args and args[-1] is None:
            args.pop()
        call = self.graph.call_function(OPS[node.op_type], tuple(args), kwargs)
        if node.op_type in _MULTI_OUTPUT:
            for index, value in enumerate(node.outputs):
                self.env[id(value)] = self.graph.call_function(operator.getitem, (call, index))
            return
        for value in node.outputs[1:]:
            if value.uses() or value.is_graph_output():
                raise UnsupportedModelError(
                    f"node {node.name!r} ({node.op_type}) output {value.name!r} is used; the torch engine "
                    "computes only the first output of this op."
                )
        self.env[id(node.outputs[0])] = call

    def _constant_node(self, node: ir.Node) -> None:
        attr = next(iter(node.attributes.values()))
        if attr.type == ir.AttributeType.TENSOR:
            tensor = _to_torch(attr.value.numpy())
        elif attr.name in ("value_float", "value_floats"):
            tensor = torch.tensor(attr.value, dtype=torch.float32)
        elif attr.name in ("value_int", "value_ints"):
            tensor = torch.tensor(attr.value, dtype=torch.int64)
        else:
            raise UnsupportedModelError(f"Constant node {node.name!r} with attribute {attr.name!r} is not supported.")
        self.env[id(node.outputs[0])] = self.constant(None, tensor)

    def _sparse_linear(self, node: ir.Node) -> bool:
        """Emits a SemiStructuredLinear for a 2:4 constant weight; False leaves the node to the dense path."""
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        weight_value = node.inputs[1]
        if weight_value is None or weight_value.const_value is None:
            return False
        weight = weight_value.const_value.numpy()
        if weight.ndim != 2:
            return False
        bias = None
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return False
            weight = weight if attrs.get("transB", 0) else weight.T
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if node.inputs[2].const_value is None or len(node.inputs[2].const_value.shape) != 1:
                    return False
                bias = _to_torch(node.inputs[2].const_value.numpy())
        else:
            weight = weight.T  # MatMul B is (K, N); linear wants (N, K)
        if not is_24_sparse(weight):
            return False
        dense = _to_torch(weight).to(self.device)
        reason = semi_structured_support(self.device, dense.dtype)
        if reason is None:
            try:
                module = SemiStructuredLinear(dense, None if bias is None else bias.to(self.device))
            except (RuntimeError, ValueError) as exc:  # shape or dtype the kernels do not take
                reason = f"to_sparse_semi_structured refused {tuple(dense.shape)}: {exc}"
        if reason is not None:
            self.result.dense_24[node.name] = reason
            return False
        name = f"sparse{len(self.result.semi_structured)}"
        self.root.add_module(name, module)
        x = self.lookup(node, node.inputs[0])
        self.env[id(node.outputs[0])] = self.graph.call_module(name, (x,))
        self.result.semi_structured.append(node.name)
        return True


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch copy of a numpy array, bf16 (ml_dtypes, which torch cannot read) included."""
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _identifier(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"input_{cleaned}"


def onnx_to_torch(
    model: ir.Model, *, device: str | torch.device = "cpu", semi_structured: bool = True
) -> ConvertedGraph:
    """Converts ``model`` to a torch.fx module on ``device`` whose outputs match ONNX Runtime's.

    Args:
        model: the compiled graph (any opset the ``onnx_ops`` functions cover, 13-18 in practice).
        device: where weights live and the module runs.
        semi_structured: use 2:4 sparse kernels for 2:4 constant MatMul/Gemm weights where the device
            supports them; where it does not, ``dense_24`` records each such node with the reason.
    """
    if any(node.op_type in ("If", "Loop", "Scan") for node in model.graph):
        node = next(n for n in model.graph if n.op_type in ("If", "Loop", "Scan"))
        raise UnsupportedModelError(
            f"node {node.name!r} ({node.op_type}) has a subgraph; the torch engine runs flat graphs."
        )
    builder = _Builder(model, torch.device(device), semi_structured)
    with torch.no_grad():
        return builder.build()
