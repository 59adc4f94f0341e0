"""Tiny models for the channel-analysis and remove-channels tests, plus zeroing and comparison helpers.

torch modules are exported once per process (``exported``) and re-read per test (``fresh``), so that each
test can zero its own random channels. Weights are found in the exported graph by value (``find_param``):
the exporter renames and sometimes transposes them (MatMul stores ``W.T``), so names are not reliable.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper, numpy_helper

from prune2deploy.engines.onnxruntime import make_session

__all__ = [
    "MODELS",
    "assert_same_outputs",
    "find_param",
    "fresh",
    "helper_model",
    "init_shapes",
    "zero_in",
    "zero_linear_in",
    "zero_linear_out",
    "zero_out",
]

F = torch.nn.functional
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}


# -- modules ----------------------------------------------------------------------------------------------


class MLP(torch.nn.Module):
    """Linear-act-Linear-act-Linear: two hidden channel groups (24 and 16)."""

    def __init__(self, act: str = "relu", bias: bool = True, widths=(8, 24, 16, 4)) -> None:
        super().__init__()
        self.act = ACTS[act]
        self.fc1 = torch.nn.Linear(widths[0], widths[1], bias=bias)
        self.fc2 = torch.nn.Linear(widths[1], widths[2], bias=bias)
        self.fc3 = torch.nn.Linear(widths[2], widths[3], bias=bias)

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class SwiGLU(torch.nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 20) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedSwiGLU(torch.nn.Module):
    """One Linear producing gate and up, split with ``chunk`` (exported as Split)."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(dim, 2 * hidden, bias=True)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _bn(channels: int) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():  # distinct, non-trivial parameters (the exporter de-duplicates equal tensors)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


class ConvBN(torch.nn.Module):
    """conv(3→12, bias)-BN-ReLU-conv(12→10, no bias)-BN-ReLU-conv(10→4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 12, 3, padding=1, bias=True)
        self.bn1 = _bn(12)
        self.conv2 = torch.nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn2 = _bn(10)
        self.conv3 = torch.nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.conv3(y)


class MobileBlock(torch.nn.Module):
    """1x1 expand (3→16) - BN - ReLU - depthwise 3x3 (groups=16) - BN - ReLU - 1x1 project (16→6)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = torch.nn.Conv2d(3, 16, 1, bias=False)
        self.bn1 = _bn(16)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=True)
        self.bn2 = _bn(16)
        self.project = torch.nn.Conv2d(16, 6, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.expand(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        return self.project(y)


class Residual(torch.nn.Module):
    """stem conv (3→8) → x + conv_b(relu(conv_a(x))) (bottleneck 6) → head conv (8→5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv_b(torch.relu(self.conv_a(x)))
        return self.head(torch.relu(x))


class ConcatBranches(torch.nn.Module):
    """Two conv branches (5 and 7 channels) concatenated along channels, then a 1x1 conv (12→4)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 7, 1)
        self.fuse = torch.nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fuse(y)


class WithHiddenOutput(torch.nn.Module):
    """An MLP that also returns its hidden activation: the hidden group touches a graph output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 12)
        self.fc2 = torch.nn.Linear(12, 4)
        self.fc3 = torch.nn.Linear(4, 10)
        self.fc4 = torch.nn.Linear(10, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        y = self.fc2(h)
        g = torch.relu(self.fc3(y))
        return self.fc4(torch.cumsum(g, dim=-1)), h


class MLPZoo(torch.nn.Module):
    """Independent branches on a 2-D input ``x`` [B, 8] (Gemm) and a 3-D input ``s`` [B, 5, 8] (MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = MLP("relu", True)  # 2-D: Gemm with bias
        self.gelu = MLP("gelu", True)  # 3-D: MatMul + Add
        self.silu = MLP("silu", False)  # 2-D, no bias
        self.relu3 = MLP("relu", False)  # 3-D, no bias
        self.sigmoid = MLP("sigmoid", True)  # 2-D
        self.swiglu = SwiGLU()  # 3-D
        self.fused = FusedSwiGLU()  # 3-D
        self.hidden = WithHiddenOutput()  # 2-D, returns its hidden activation

    def forward(self, x, s):
        y, h = self.hidden(x)
        return (
            self.relu(x),
            self.gelu(s),
            self.silu(x),
            self.relu3(s),
            self.sigmoid(x),
            self.swiglu(s),
            self.fused(s),
            y,
            h,
        )


class CNNZoo(torch.nn.Module):
    """Independent CNN branches on one image input [B, 3, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.convbn = ConvBN()
        self.mobile = MobileBlock()
        self.residual = Residual()
        self.concat = ConcatBranches()

    def forward(self, x):
        return self.convbn(x), self.mobile(x), self.residual(x), self.concat(x)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[tuple[int, ...], ...]]]] = {
    "mlps": lambda: (MLPZoo(), ((2, 8), (2, 5, 8))),
    "cnns": lambda: (CNNZoo(), ((2, 3, 8, 8),)),
}


@functools.cache
def _export(name: str) -> tuple[bytes, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    module, shapes = MODELS[name]()
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    args = tuple(torch.randn(*shape) for shape in shapes)
    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=18,
            dynamic_shapes=tuple({0: batch} for _ in args),
            input_names=["x", "s"][: len(args)],
            verbose=False,
        )
    params = {k: v.detach().numpy().copy() for k, v in module.state_dict().items() if v.dtype.is_floating_point}
    return ir.to_proto(program.model).SerializeToString(), params


def exported(name: str) -> dict[str, np.ndarray]:
    """The torch parameters (by state-dict name) of the exported model ``name``."""
    return _export(name)[1]


def fresh(name: str) -> ir.Model:
    """A private copy of the exported model ``name``."""
    proto = onnx.ModelProto()
    proto.ParseFromString(_export(name)[0])
    return ir.from_proto(proto)


# -- finding and zeroing weights ------------------------------------------------------------------------------


def find_param(model: ir.Model, array: np.ndarray) -> tuple[ir.Value, bool]:
    """The initializer holding ``array`` and whether it is stored transposed (MatMul weights are ``W.T``)."""
    hits = []
    for value in model.graph.initializers.values():
        data = value.const_value.numpy()
        if data.shape == array.shape and np.array_equal(data, array):
            hits.append((value, False))
        elif array.ndim == 2 and data.shape == array.T.shape and np.array_equal(data, array.T):
            hits.append((value, True))
    assert len(hits) == 1, f"parameter of shape {array.shape} found {len(hits)} times"
    return hits[0]


def _zero(model: ir.Model, array: np.ndarray, index, axis: int) -> None:
    value, transposed = find_param(model, array)
    if transposed:
        axis = 1 - axis
    data = value.const_value.numpy().copy()
    slicer = [slice(None)] * data.ndim
    slicer[axis] = np.asarray(index, dtype=np.int64)
    data[tuple(slicer)] = 0
    value.const_value = ir.tensor(data, name=value.name)


def zero_out(model: ir.Model, params: dict[str, np.ndarray], prefix: str, index) -> None:
    """Zeroes output channels of a torch Linear/Conv/BN ``prefix`` (weight rows and bias / gamma and beta)."""
    _zero(model, params[f"{prefix}.weight"], index, 0)
    if f"{prefix}.bias" in params:
        _zero(model, params[f"{prefix}.bias"], index, 0)


def zero_in(model: ir.Model, params: dict[str, np.ndarray], prefix: str, index) -> None:
    """Zeroes input channels of a torch Linear/Conv ``prefix`` (the consumer side)."""
    _zero(model, params[f"{prefix}.weight"], index, 1)


zero_linear_out = zero_out
zero_linear_in = zero_in


def init_shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(v.const_value.shape) for name, v in model.graph.initializers.items()}


# -- comparing -----------------------------------------------------------------------------------------------


def _feeds(model: ir.Model, rng: np.random.Generator, batch: int = 3) -> dict[str, np.ndarray]:
    feeds = {}
    for value in model.graph.inputs:
        dims = [d if isinstance(d, int) else batch for d in value.shape]
        if value.dtype == ir.DataType.BOOL:
            feeds[value.name] = np.array(True)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run(model: ir.Model | bytes, feeds) -> list[np.ndarray]:
    blob = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    return make_session(blob, threads=1).run(None, feeds)


def assert_same_outputs(reference: bytes, model: ir.Model, rng: np.random.Generator, *, trials: int = 2) -> None:
    """ORT outputs of ``model`` equal the masked ``reference`` (max |diff| <= 1e-5 of the output scale)."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for _ in range(trials):
        feeds = _feeds(model, rng)
        expected, actual = run(reference, feeds), run(model, feeds)
        assert len(expected) == len(actual)
        for e, a in zip(expected, actual, strict=True):
            assert e.shape == a.shape
            scale = max(1.0, float(np.abs(e).max()))
            assert float(np.abs(e - a).max()) <= 1e-5 * scale, (float(np.abs(e - a).max()), scale)


def snapshot(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# -- onnx.helper graphs ------------------------------------------------------------------------------------------


def helper_model(nodes, inputs, outputs, initializers: dict[str, np.ndarray], *, opset: int = 18) -> ir.Model:
    """An IR-10 model (onnxruntime 1.31 rejects the IR version that onnx 1.23 writes by default)."""
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def tensor_info(name: str, dims, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, dims)


def node_in_scope(model: ir.Model, scope: str, op_type: str) -> ir.Node:
    """The single ``op_type`` node that the exporter placed in module ``scope``."""
    from prune2deploy.analysis.scopes import module_of

    nodes = [n for n in model.graph if n.op_type == op_type and module_of(n) == scope]
    assert len(nodes) == 1, f"{len(nodes)} {op_type} nodes in {scope}"
    return nodes[0]


def zero_conv_out(model: ir.Model, scope: str, index) -> None:
    """Zeroes output channels of the (possibly BN-folded) Conv of module ``scope``: weight rows and bias."""
    node = node_in_scope(model, scope, "Conv")
    for value in node.inputs[1:3]:
        if value is not None:
            data = value.const_value.numpy().copy()
            data[np.asarray(index, dtype=np.int64)] = 0
            value.const_value = ir.tensor(data, name=value.name)


def zero_conv_in(model: ir.Model, scope: str, index) -> None:
    node = node_in_scope(model, scope, "Conv")
    data = node.inputs[1].const_value.numpy().copy()
    data[:, np.asarray(index, dtype=np.int64)] = 0
    node.inputs[1].const_value = ir.tensor(data, name=node.inputs[1].name)


def group_by_id(analysis, group_id: str):
    found = [g for g in analysis.groups if g.id == group_id]
    assert len(found) == 1, [g.id for g in analysis.groups]
    return found[0]
