"""Masks for the demo and the benchmark: a fraction of every MLP's neurons, chosen by weight magnitude.

A neuron's magnitude is the product of the L2 norms of the weights that write it (gate and up rows, or the
intermediate row) and the weights that read it (the down/output column): a neuron that is small on either
side contributes little. The mask zeros every tensor that produces the neuron and the one that reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["demo_masks", "mlp_neuron_masks"]

log = logging.getLogger(__name__)


def _mlp_layouts(module) -> list[tuple[list[str], list[str], str]]:
    """(row-producing weights, row-producing biases, column-reading weight) per MLP, by naming convention."""
    names = {name for name, _ in module.named_parameters()}
    layouts = []
    for name in sorted(names):
        if name.endswith("mlp.down_proj.weight"):  # Llama / Qwen2 / Mistral
            prefix = name[: -len("down_proj.weight")]
            producers = [prefix + p for p in ("gate_proj.weight", "up_proj.weight") if prefix + p in names]
            biases = [prefix + p for p in ("gate_proj.bias", "up_proj.bias") if prefix + p in names]
            layouts.append((producers, biases, name))
        elif name.endswith("intermediate.dense.weight"):  # BERT
            prefix = name[: -len("intermediate.dense.weight")]
            biases = [prefix + "intermediate.dense.bias"] if prefix + "intermediate.dense.bias" in names else []
            layouts.append(([name], biases, prefix + "output.dense.weight"))
    return layouts


def mlp_neuron_masks(module, ratio: float) -> dict[str, np.ndarray]:
    """0/1 masks (torch layout) removing ``ratio`` of every MLP's neurons by magnitude."""
    if not 0 <= ratio < 1:
        raise ValueError("ratio must be in [0, 1)")
    params = {name: p.detach().float().numpy() for name, p in module.named_parameters()}
    masks: dict[str, np.ndarray] = {}
    layouts = _mlp_layouts(module)
    if not layouts:
        raise ValueError(f"{type(module).__name__}: no Llama-style or BERT-style MLP found")
    for producers, biases, reader in layouts:
        score = np.linalg.norm(params[reader], axis=0)
        for name in producers:
            score = score * np.linalg.norm(params[name], axis=1)
        width = score.shape[0]
        drop = np.argsort(score, kind="stable")[: round(ratio * width)]
        keep = np.ones(width, dtype=np.float32)
        keep[drop] = 0
        for name in producers:
            masks[name] = np.repeat(keep[:, None], params[name].shape[1], axis=1)
        for name in biases:
            masks[name] = keep.copy()
        masks[reader] = np.repeat(keep[None, :], params[reader].shape[0], axis=0)
    return masks


def demo_masks(model: str, ratio: float, path: Path) -> Path:
    """Writes magnitude masks for a bundled model to ``path`` (safetensors) and returns it."""
    from safetensors.numpy import save_file

    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.io import atomic_write_bytes

    loaded = load_hf_model(model)
    masks = mlp_neuron_masks(loaded.module, ratio)
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(masks, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    log.info("wrote %d masks (%.0f%% of MLP neurons) to %s", len(masks), 100 * ratio, path)
    return path
