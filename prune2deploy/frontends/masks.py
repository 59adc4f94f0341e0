"""Mask files: 0/1 tensors keyed by torch parameter name, in the parameter's own layout.

Masks are applied in torch before export when the source is a module or a model folder (the exported
graph then simply has zeros), and to ONNX initializers when the source is an ``.onnx`` file. In ONNX the
exporter renames and transposes weights (a Linear's [out, in] weight becomes a MatMul B of [in, out] named
``val_42``), so the mapping goes through the nodes' name-scope metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from prune2deploy.errors import BadInputError, MaskError
from prune2deploy.graph.initializers import replace_const
from prune2deploy.graph.scopes import module_of

__all__ = ["apply_masks_onnx", "apply_masks_torch", "combine_masks", "load_masks"]

log = logging.getLogger(__name__)


def load_masks(path: Path) -> dict[str, np.ndarray]:
    """Reads a safetensors mask file and checks that every tensor holds only 0 and 1."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"mask file {path} does not exist")
    try:
        masks = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as exc:  # fp8: no numpy dtype
        raise MaskError(
            f"{path}: not a readable safetensors file of 0/1 masks ({type(exc).__name__}: {str(exc)[:200]}); "
            "masks are bool, integer, float16/32/64 or bfloat16 tensors"
        ) from exc
    for name, mask in masks.items():
        values = np.unique(mask)
        if not np.all(np.isin(values, (0, 1))):
            raise MaskError(
                f"{path}: mask '{name}' holds values other than 0 and 1 (e.g. {values[~np.isin(values, (0, 1))][:3]}). "
                "Masks are 0/1 tensors; 0 marks a pruned weight."
            )
    if not masks:
        raise MaskError(f"{path}: the mask file holds no tensors")
    return masks


def combine_masks(given: Mapping[str, np.ndarray] | None, attached: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A mask file's masks and the masks a checkpoint carries (attached by the pruning tool), as one set.

    A parameter named by both keeps what both keep (the product): the file prunes further, never revives.

    Raises:
        MaskError: the two masks of one parameter have different shapes.
    """
    combined = dict(attached)
    for name, mask in (given or {}).items():
        if name in combined:
            if tuple(mask.shape) != tuple(combined[name].shape):
                raise MaskError(
                    f"mask '{name}' has shape {tuple(mask.shape)} but the checkpoint's attached mask is "
                    f"{tuple(combined[name].shape)}. Masks use the parameter's own layout."
                )
            combined[name] = (np.asarray(mask) != 0) & (np.asarray(combined[name]) != 0)
        else:
            combined[name] = mask
    return combined


def _suggest(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def apply_masks_torch(module, masks: Mapping[str, np.ndarray], *, source: str = "mask file"):
    """Returns a copy of ``module`` whose parameters are multiplied by their masks.

    The copy shares the storage of every parameter no mask names with ``module``: neither is to be changed
    in place afterwards (the outputs built from it, genai/ and hf/, copy what they change).

    Raises:
        MaskError: a mask names a parameter the module does not have, or has another shape.
    """
    import copy

    import torch

    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise MaskError(
                f"{source}: mask '{name}' names no parameter of {type(module).__name__}.{_suggest(name, list(params))} "
                "Masks are keyed by torch parameter name (model.named_parameters())."
            )
        if tuple(mask.shape) != tuple(params[name].shape):
            raise MaskError(
                f"{source}: mask '{name}' has shape {tuple(mask.shape)} but the parameter is "
                f"{tuple(params[name].shape)}. Masks use the parameter's own layout."
            )
    # A deep copy of a 1B model would hold its 4.9 GB twice. The memo makes the copy's masked parameters new
    # tensors (weight × mask) and every other parameter and buffer the input's own, so the copy costs only
    # the masked tensors and the input is left as it was; tied parameters stay tied (one memo entry each).
    memo: dict[int, Any] = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            product = param.detach() * torch.from_numpy(np.ascontiguousarray(mask)).to(param.dtype)
            memo[id(param)] = torch.nn.Parameter(product, requires_grad=param.requires_grad)
    masked = copy.deepcopy(module, memo)
    log.info("applied %d masks", len(masks))
    return masked


def _matmul_weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(weight value, stored transposed relative to torch's [out, in]) for Linear/Conv-like nodes."""
    if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return node.inputs[1], True
    if node.op_type == "Gemm" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        trans_b = node.attributes.get("transB")
        return node.inputs[1], not (trans_b is not None and trans_b.value)
    if node.op_type == "Conv" and node.inputs[1].const_value is not None:
        return node.inputs[1], False
    return None


def _bias_after(node: ir.Node) -> ir.Value | None:
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        return node.inputs[2]
    for use in node.outputs[0].uses():
        consumer = use.node
        if consumer.op_type == "Add":
            other = consumer.inputs[1 - use.idx]
            if other is not None and other.const_value is not None and len(other.shape or ()) == 1:
                return other
    return None


def _onnx_targets(model: ir.Model) -> dict[str, tuple[ir.Value, bool]]:
    """torch parameter name -> (ONNX constant, transposed?) for every parameter the graph reveals."""
    targets: dict[str, tuple[ir.Value, bool]] = {}
    for name, value in model.graph.initializers.items():
        targets[name] = (value, False)
    for node in model.graph:
        module = module_of(node)
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if module and table is not None and table.const_value is not None:
            # an embedding table: the exporter may name it after a tied head (``lm_head.weight``)
            targets.setdefault(f"{module}.weight", (table, False))
            continue
        weight = _matmul_weight(node)
        if not module or weight is None:
            continue
        targets.setdefault(f"{module}.weight", weight)
        bias = _bias_after(node)
        if bias is not None:
            targets.setdefault(f"{module}.bias", (bias, False))
    return targets


def apply_masks_onnx(model: ir.Model, masks: Mapping[str, np.ndarray], *, source: str = "mask file") -> int:
    """Multiplies ONNX constants by the masks of the torch parameters they came from (in place).

    Returns the number of masks applied. Raises MaskError for a name with no counterpart or a wrong shape.
    """
    targets = _onnx_targets(model)
    edits = []
    for name, mask in masks.items():
        if name not in targets:
            # An export wrapper prefixes every scope (``model.model.layers.0``): accept a unique dotted suffix.
            suffixed = [t for t in targets if t.endswith("." + name)]
            if len(suffixed) == 1:
                targets[name] = targets[suffixed[0]]
        if name not in targets:
            raise MaskError(
                f"{source}: mask '{name}' matches no tensor of the ONNX model.{_suggest(name, sorted(targets))} "
                "Masks are keyed by torch parameter name; the model must carry the exporter's name-scope metadata."
            )
        value, transposed = targets[name]
        array = value.const_value.numpy()
        expected = array.T.shape if transposed else array.shape
        if tuple(mask.shape) != tuple(expected):
            raise MaskError(
                f"{source}: mask '{name}' has shape {tuple(mask.shape)} but the parameter is {tuple(expected)}. "
                "Masks use the torch parameter's own layout."
            )
        edits.append((value, mask.T if transposed else mask))
    for value, mask in edits:
        array = value.const_value.numpy() * mask.astype(value.const_value.numpy().dtype)
        replace_const(value, array)
    return len(edits)
