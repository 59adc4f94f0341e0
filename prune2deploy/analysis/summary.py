"""Reports over the analyses: what ``inspect`` shows per layer.

Kept apart from the analyses it combines (residual blocks, the hidden stream) so that they import each
other in one direction only: summary → hidden → blocks.
"""

from __future__ import annotations

import onnx_ir as ir

from prune2deploy.analysis.blocks import find_layers
from prune2deploy.analysis.hidden import analyze_hidden

__all__ = ["layer_summary"]


def layer_summary(model: ir.Model) -> list[dict]:
    """Per layer: residual sub-blocks (zero / removable / what blocks removal), hidden width, zero channels.

    The hidden stream is analysed once for the whole model (it is one channel space shared by every
    layer), so ``hidden_width`` and ``zero_hidden_channels`` repeat on each row; ``hidden_blocked`` says
    why the stream cannot be narrowed, if it cannot.
    """
    stream = analyze_hidden(model)
    zero = stream.zero_channels() if stream.ok else []
    rows = []
    for layer in find_layers(model):
        blocks = [b.summary() for b in layer.blocks]
        rows.append(
            {
                "layer": layer.name,
                "index": layer.index,
                "sub_blocks": blocks,
                "zero_sub_blocks": [b["scope"] for b in blocks if b["zero"]],
                "removable": bool(blocks) and all(b["zero"] for b in blocks),
                "droppable_by_plan": not layer.reason,
                "blocked_by": layer.reason,
                "hidden_width": stream.width,
                "zero_hidden_channels": len(zero),
                "hidden_blocked": stream.reason,
            }
        )
    return rows
