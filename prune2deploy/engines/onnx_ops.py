"""ONNX operators as torch functions, one per op type, with ONNX (opset 13-18) semantics.

The torch engine replays a compiled ONNX graph in torch (see ``onnx_to_torch``). Each function takes the
node's inputs as tensors (``None`` for an omitted optional input) and its attributes as keyword arguments of
plain Python values, so that torch.fx can print the graph as code. Shape tensors are int64 tensors, as in
ONNX. Only what our exported transformers and CNNs use is here; anything else is reported by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["OPS", "onnx_dtype_to_torch"]

OPS: dict[str, Callable[..., Any]] = {}

# ONNX TensorProto.DataType → torch dtype.
_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def onnx_dtype_to_torch(code: int) -> torch.dtype:
    """The torch dtype of an ONNX element type code; unknown codes raise ``KeyError``."""
    return _DTYPES[int(code)]


def _op(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


# -- elementwise --


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def apply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fn(a, b)

    return apply


OPS.update(
    {
        "Add": _binary(torch.add),
        "Sub": _binary(torch.sub),
        "Mul": _binary(torch.mul),
        "Equal": _binary(torch.eq),
        "Less": _binary(torch.lt),
        "LessOrEqual": _binary(torch.le),
        "Greater": _binary(torch.gt),
        "GreaterOrEqual": _binary(torch.ge),
        "And": _binary(torch.logical_and),
        "Or": _binary(torch.logical_or),
        "Xor": _binary(torch.logical_xor),
        "BitwiseAnd": _binary(torch.bitwise_and),
        "BitwiseOr": _binary(torch.bitwise_or),
    }
)

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Cos": torch.cos,
    "Sin": torch.sin,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softplus": F.softplus,
    "Identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda fn: lambda x: fn(x))(_fn)


@_op("Div")
def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


@_op("Mod")
def _mod(a: torch.Tensor, b: torch.Tensor, fmod: int = 0) -> torch.Tensor:
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


@_op("Pow")
def _pow(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.pow(x, y).to(x.dtype)  # ONNX: the result has the base's type


@_op("Max")
def _max(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x)
    return out


@_op("Min")
def _min(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(out, x)
    return out


@_op("Sum")
def _sum(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


@_op("Where")
def _where(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, a, b)


@_op("IsInf")
def _isinf(x: torch.Tensor, detect_negative: int = 1, detect_positive: int = 1) -> torch.Tensor:
    return (torch.isposinf(x) & bool(detect_positive)) | (torch.isneginf(x) & bool(detect_negative))


@_op("Clip")
def _clip(x: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> torch.Tensor:
    return torch.clamp(x, min=low, max=high)


@_op("LeakyRelu")
def _leaky_relu(x: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    return F.leaky_relu(x, alpha)


@_op("Elu")
def _elu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return F.elu(x, alpha)


@_op("HardSigmoid")
def _hard_sigmoid(x: torch.Tensor, alpha: float = 0.2, beta: float = 0.5) -> torch.Tensor:
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(x: torch.Tensor) -> torch.Tensor:
    return F.hardswish(x)


@_op("Gelu")
def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


@_op("Cast")
def _cast(x: torch.Tensor, to: int, saturate: int = 1) -> torch.Tensor:
    return x.to(onnx_dtype_to_torch(to))


@_op("CastLike")
def _cast_like(x: torch.Tensor, like: torch.Tensor, saturate: int = 1) -> torch.Tensor:
    return x.to(like.dtype)


# -- linear algebra and normalisation --


@_op("MatMul")
def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@_op("Gemm")
def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    transA: int = 0,  # noqa: N803 - ONNX attribute names
    transB: int = 0,  # noqa: N803
) -> torch.Tensor:
    a = a.t() if transA else a
    b = b.t() if transB else b
    out = torch.matmul(a, b)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


@_op("Einsum")
def _einsum(*xs: torch.Tensor, equation: str) -> torch.Tensor:
    return torch.einsum(equation, *xs)


@_op("Softmax")
def _softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    return torch.softmax(x, dim=axis)


@_op("LogSoftmax")
def _log_softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    return torch.log_softmax(x, dim=axis)


@_op("LayerNormalization")
def _layer_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    axis: int = -1,
    epsilon: float = 1e-5,
    stash_type: int = 1,
) -> torch.Tensor:
    axis = axis % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, epsilon)


@_op("BatchNormalization")
def _batch_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    training_mode: int = 0,
) -> torch.Tensor:
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=epsilon)


@_op("InstanceNormalization")
def _instance_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


# -- convolution and pooling --


def _explicit_padding(
    x: torch.Tensor,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    auto_pad: str,
    pads: Sequence[int] | None,
) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, …, x1_end, x2_end, …] resolved for auto_pad."""
    spatial = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(spatial):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    return list(pads) if pads else [0] * (2 * spatial)


def _pad_input(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Symmetric padding goes to the op; asymmetric padding is applied here with F.pad."""
    spatial = len(pads) // 2
    begin, end = pads[:spatial], pads[spatial:]
    if list(begin) == list(end):
        return x, list(begin)
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):
        torch_pads += [begin[i], end[i]]
    return F.pad(x, torch_pads, value=value), [0] * spatial


@_op("Conv")
def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    auto_pad: str = "NOTSET",
    dilations: Sequence[int] | None = None,
    group: int = 1,
    kernel_shape: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> torch.Tensor:
    spatial = w.dim() - 2
    kernel = list(kernel_shape or w.shape[2:])
    strides = list(strides or [1] * spatial)
    dilations = list(dilations or [1] * spatial)
    x, padding = _pad_input(x, _explicit_padding(x, kernel, strides, dilations, auto_pad, pads))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group)


def _pool(x: torch.Tensor, kind: str, attrs: dict[str, Any]) -> torch.Tensor:
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    pads = _explicit_padding(x, kernel, strides, dilations, attrs.get("auto_pad", "NOTSET"), attrs.get("pads"))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        x, padding = _pad_input(x, pads, value=-math.inf)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return pool(x, kernel, strides, padding, dilations, ceil_mode=ceil_mode)
    include_pad = bool(attrs.get("count_include_pad", 0))
    if not include_pad and pads[:spatial] != pads[spatial:]:
        raise NotImplementedError("AveragePool with asymmetric padding that excludes the pad from the count")
    if pads[:spatial] != pads[spatial:]:
        x, padding = _pad_input(x, pads)
    else:
        padding = pads[:spatial]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return pool(x, kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=include_pad)


@_op("MaxPool")
def _max_pool(x: torch.Tensor, **attrs: Any) -> torch.Tensor:
    if attrs.get("storage_order", 0):
        raise NotImplementedError("MaxPool storage_order=1")
    return _pool(x, "max", attrs)


@_op("AveragePool")
def _avg_pool(x: torch.Tensor, **attrs: Any) -> torch.Tensor:
    return _pool(x, "avg", attrs)


@_op("GlobalAveragePool")
def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# -- reductions --


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def apply(
        x: torch.Tensor, axes: torch.Tensor | None = None, keepdims: int = 1, noop_with_empty_axes: int = 0
    ) -> torch.Tensor:
        dims = _ints(axes)
        if not dims:
            if noop_with_empty_axes:
                return x
            dims = list(range(x.dim()))
        return fn(x, dim=tuple(dims), keepdim=bool(keepdims))

    return apply


OPS["ReduceMean"] = _reduce(torch.mean)
OPS["ReduceSum"] = _reduce(torch.sum)
OPS["ReduceMax"] = _reduce(torch.amax)
OPS["ReduceMin"] = _reduce(torch.amin)
OPS["ReduceSumSquare"] = _reduce(lambda x, dim, keepdim: torch.sum(x * x, dim=dim, keepdim=keepdim))


def _prod_many(x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


OPS["ReduceProd"] = _reduce(_prod_many)


@_op("ArgMax")
def _argmax(x: torch.Tensor, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> torch.Tensor:
    if select_last_index:
        flipped = torch.argmax(x.flip(axis), dim=axis, keepdim=bool(keepdims))
        return x.shape[axis] - 1 - flipped
    return torch.argmax(x, dim=axis, keepdim=bool(keepdims))


@_op("CumSum")
def _cumsum(x: torch.Tensor, axis: torch.Tensor, exclusive: int = 0, reverse: int = 0) -> torch.Tensor:
    dim = int(axis.reshape(-1)[0])
    y = x.flip(dim) if reverse else x
    out = torch.cumsum(y, dim=dim)
    if exclusive:
        out = out - y
    return out.flip(dim) if reverse else out


# -- shapes and indexing --


@_op("Shape")
def _shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    return torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@_op("Size")
def _size(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@_op("Reshape")
def _reshape(x: torch.Tensor, shape: torch.Tensor, allowzero: int = 0) -> torch.Tensor:
    target = _ints(shape)
    if not allowzero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@_op("Flatten")
def _flatten(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


@_op("Transpose")
def _transpose(x: torch.Tensor, perm: Sequence[int] | None = None) -> torch.Tensor:
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


@_op("Expand")
def _expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@_op("Tile")
def _tile(x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    return x.repeat(*_ints(repeats))


@_op("Concat")
def _concat(*xs: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.cat(xs, dim=axis)


@_op("Split")
def _split(
    x: torch.Tensor, split: torch.Tensor | None = None, axis: int = 0, num_outputs: int | None = None
) -> tuple[torch.Tensor, ...]:
    if split is not None:
        return tuple(torch.split(x, _ints(split), dim=axis))
    size = x.shape[axis]
    chunk = math.ceil(size / num_outputs)
    return tuple(torch.split(x, chunk, dim=axis))


@_op("Slice")
def _slice(
    x: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    axes: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    starts_, ends_ = _ints(starts), _ints(ends)
    axes_ = _ints(axes) or list(range(len(starts_)))
    steps_ = _ints(steps) or [1] * len(starts_)
    for start, end, axis, step in zip(starts_, ends_, axes_, steps_, strict=True):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            x = x.narrow(axis, start, max(end - start, 0))[(slice(None),) * axis + (slice(None, None, step),)]
        else:  # negative step: flip, then slice forward
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            index = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, index)
    return x


@_op("Gather")
def _gather(x: torch.Tensor, indices: torch.Tensor, axis: int = 0) -> torch.Tensor:
    axis %= x.dim()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = x.index_select(axis, indices.reshape(-1).long())
    return out.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


@_op("GatherElements")
def _gather_elements(x: torch.Tensor, indices: torch.Tensor, axis: int = 0) -> torch.Tensor:
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return torch.gather(x, axis, indices.long())


@_op("GatherND")
def _gather_nd(x: torch.Tensor, indices: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    indices = indices.long()
    batch = tuple(x.shape[:batch_dims])
    count = math.prod(batch)
    flat_x = x.reshape(count, *x.shape[batch_dims:])
    flat_i = indices.reshape(count, *indices.shape[batch_dims:])
    index = [torch.arange(count, device=x.device).reshape([count] + [1] * (flat_i.dim() - 2))]
    for k in range(indices.shape[-1]):
        part = flat_i[..., k]
        index.append(torch.where(part < 0, part + flat_x.shape[1 + k], part))
    out = flat_x[tuple(index)]  # (count, index dims…, remaining data dims…)
    return out.reshape(*batch, *out.shape[1:])


@_op("ScatterND")
def _scatter_nd(x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    if reduction != "none":
        raise NotImplementedError(f"ScatterND reduction={reduction}")
    out = x.clone()
    out[tuple(indices[..., k].long() for k in range(indices.shape[-1]))] = updates
    return out


@_op("Unsqueeze")
def _unsqueeze(x: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    rank = x.dim() + len(_ints(axes))
    for axis in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(axis)
    return x


@_op("Squeeze")
def _squeeze(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in _ints(axes)), reverse=True):
        x = x.squeeze(axis)
    return x


@_op("Range")
def _range(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@_op("ConstantOfShape")
def _constant_of_shape(shape: torch.Tensor, value: float | int | bool = 0.0, dtype: int = 1) -> torch.Tensor:
    return torch.full(_ints(shape), value, dtype=onnx_dtype_to_torch(dtype), device=shape.device)


@_op("Trilu")
def _trilu(x: torch.Tensor, k: torch.Tensor | None = None, upper: int = 1) -> torch.Tensor:
    offset = 0 if k is None else int(k.reshape(-1)[0])
    return torch.triu(x, offset) if upper else torch.tril(x, offset)


@_op("Pad")
def _pad(
    x: torch.Tensor,
    pads: torch.Tensor,
    constant_value: torch.Tensor | None = None,
    axes: torch.Tensor | None = None,
    mode: str = "constant",
) -> torch.Tensor:
    values = _ints(pads)
    axes_ = [a % x.dim() for a in (_ints(axes) or range(x.dim()))]
    begin, end = values[: len(axes_)], values[len(axes_) :]
    torch_pads = [0] * (2 * x.dim())
    for axis, b, e in zip(axes_, begin, end, strict=True):
        position = 2 * (x.dim() - 1 - axis)
        torch_pads[position], torch_pads[position + 1] = b, e
    if mode == "constant":
        fill = 0.0 if constant_value is None else constant_value.item()
        return F.pad(x, torch_pads, mode="constant", value=fill)
    return F.pad(x, torch_pads[: 2 * (x.dim() - 2)], mode={"reflect": "reflect", "edge": "replicate"}[mode])


@_op("Dropout")
def _dropout(x: torch.Tensor, *unused: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    return x  # inference
