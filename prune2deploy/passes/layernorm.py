"""A LayerNormalization over fewer channels that keeps the statistics of the full width: shared by the passes
that narrow a normalised channel axis (``prune-hidden`` for residual streams, ``remove-channels`` for CNN
channel groups such as ConvNeXt's, where the norm sits on the residual stream through permutes).

With ``d`` channels of which the dropped ``d - d'`` are zero at the norm's input, ``r = d'/d`` and m', v'
the mean and variance over the kept channels, the reference statistics are

    mean_d = r · m'        var_d = r · v' + r(1 - r) · m'²

(the second form avoids the cancellation of E[x²] - mean²), so ``γ · (x - mean_d) / sqrt(var_d + eps) + β``
over the kept channels equals the reference norm there, exactly up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

__all__ = ["rescale_layernorm"]


def rescale_layernorm(
    model: ir.Model, node: ir.Node, r: float, new_initializer: Callable[[np.ndarray, str], ir.Value], tag: str
) -> tuple[ir.Value, ir.Value]:
    """Replaces ``node`` (a LayerNormalization over its last axis, already narrowed) by the decomposed norm
    with the statistics of the original width (``r`` = kept / original channels).

    Returns (old output, new output); the new output takes the old one's name where that was a graph output.
    """
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    eps = node.attributes.get_float("epsilon", 1e-5)
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    reduced = ir.Shape([*list(x.shape)[:-1], 1]) if x.shape is not None else None
    built: list[ir.Node] = []

    def const(value: float, base: str) -> ir.Value:
        return new_initializer(np.asarray(value, dtype=dtype), base)

    def op(op_type: str, inputs: list[ir.Value], what: str, shape, **attributes) -> ir.Value:
        made = ir.node(op_type, inputs, attributes=attributes, name=f"{tag}_{what}")
        made.outputs[0].name = f"{tag}_{what}"
        made.outputs[0].shape, made.outputs[0].type = shape, x.type
        built.append(made)
        return made.outputs[0]

    axes = new_initializer(np.asarray([-1], dtype=np.int64), "ln_axes")
    mean = op("ReduceMean", [x, axes], "mean", reduced, keepdims=1)  # m'
    centered = op("Sub", [x, mean], "centered", x.shape)
    variance = op("ReduceMean", [op("Mul", [centered, centered], "sq", x.shape), axes], "var", reduced)
    mean_sq = op("Mul", [mean, mean], "mean_sq", reduced)
    var_d = op(
        "Add",
        [
            op("Mul", [variance, const(r, "ln_ratio")], "var_r", reduced),
            op("Mul", [mean_sq, const(r * (1 - r), "ln_ratio_mean")], "mean_r", reduced),
        ],
        "var_d",
        reduced,
    )
    std = op("Sqrt", [op("Add", [var_d, const(eps, "ln_eps")], "var_eps", reduced)], "std", reduced)
    shifted = op("Sub", [x, op("Mul", [mean, const(r, "ln_ratio")], "mean_d", reduced)], "shifted", x.shape)
    result = op("Mul", [op("Div", [shifted, std], "normed", x.shape), scale], "scaled", x.shape)
    if bias is not None:
        result = op("Add", [result, bias], "biased", x.shape)
    for made in built:
        model.graph.insert_before(node, made)
    was_output = out.is_graph_output()
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    if was_output:
        name = out.name
        out.name = f"{name}__layernorm"
        result.name = name
    model.graph.remove(node, safe=True)
    return out, result
