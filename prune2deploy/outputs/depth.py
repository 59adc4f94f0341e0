"""A depth plan (``--drop-layers``) on the sliced torch model, so that genai/ and hf/ are the model in ``model.onnx``.

``remove-layers`` with a plan drops whole decoder layers that are not zero (Minitron-style depth pruning):
approximate, so the LM outputs, which are built from the torch module, would be another model unless the
module loses the same layers. In a pre-norm decoder (Llama-style, the only kind the slicer takes) the graph
pass rewires each dropped layer's outgoing residual stream to its incoming one; deleting the layer from
``model.layers`` computes exactly that. The caller checks the written decoder against ``model.onnx``, so a
layer that the graph and the module name differently cannot slip through.

Layers are named by the graph's scopes (``model.layers.3``): the pass's record lists them. The module's
layers after the cut are renumbered (their ``layer_idx``, the cache slot each one writes, and the config's
``num_hidden_layers`` / ``layer_types``), so hf/ reloads as a plain shallower model; the widths in the
report keep the original indices (the layers as the user's model names them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.slice import SliceResult

__all__ = ["drop_sliced_layers", "layer_indices"]

log = logging.getLogger(__name__)

_LAYER_SCOPE = re.compile(r"^model\.layers\.(\d+)$")


def layer_indices(scopes: Iterable[str]) -> list[int]:
    """Decoder-layer indices of the graph's layer scopes (``model.layers.3`` → 3).

    Raises:
        UnsupportedModelError: a scope that is not a ``model.layers.N`` decoder layer (the module's layout).
    """
    indices = []
    for scope in scopes:
        match = _LAYER_SCOPE.match(scope)
        if match is None:
            raise UnsupportedModelError(
                f"the depth plan removed layer scope '{scope}', which is not a decoder layer 'model.layers.N' of "
                "the transformers module: genai/ and hf/ cannot drop it"
            )
        indices.append(int(match.group(1)))
    return sorted(set(indices))


def drop_sliced_layers(sliced: SliceResult, indices: Iterable[int]) -> dict[str, Any]:
    """Deletes decoder layers ``indices`` (original numbering) from the sliced module in place.

    Returns:
        ``{"layers_dropped": [...], "layers_before": n, "layers_after": m}`` for the report.

    Raises:
        UnsupportedModelError: an index the module does not have, or a plan that would drop every layer.
    """
    import torch

    drop = sorted(set(int(i) for i in indices))
    model = sliced.module.model
    count = len(model.layers)
    missing = [i for i in drop if not 0 <= i < count]
    if missing:
        raise UnsupportedModelError(f"the depth plan drops layers {missing}, which the module ({count} layers) lacks")
    keep = [i for i in range(count) if i not in drop]
    if not keep:
        raise UnsupportedModelError("the depth plan drops every decoder layer: there is no decoder to write")
    model.layers = torch.nn.ModuleList(model.layers[i] for i in keep)
    for position, layer in enumerate(model.layers):
        for owner in (layer, layer.self_attn):
            if hasattr(owner, "layer_idx"):
                owner.layer_idx = position
    sliced.layers = [sliced.layers[i] for i in keep]  # each keeps its original index: the report's names
    config = sliced.module.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for cfg in {id(config): config, id(text): text}.values():
        cfg.num_hidden_layers = len(keep)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types:
            cfg.layer_types = [layer_types[i] for i in keep]
    log.info("dropped decoder layers %s for genai/ and hf/ (%d → %d)", drop, count, len(keep))
    return {"layers_dropped": drop, "layers_before": count, "layers_after": len(keep)}
