"""Tiny random-weight models from small configs, and helpers to mask their MLP neurons."""

from __future__ import annotations

import numpy as np
import torch

from prune2deploy.frontends.torch import ExportSpec


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


class TinyResNet(torch.nn.Module):
    """Conv-BN-ReLU stem, a residual block with a bottleneck, a depthwise conv, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 24, 1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 16, 1),
            nn.BatchNorm2d(16),
        )
        self.head = nn.Linear(16, 10)
        for module in self.modules():  # non-trivial BN statistics
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
        self.example_inputs = ExportSpec(
            inputs={"x": torch.randn(2, 3, 8, 8)}, dynamic_axes={"x": {0: "batch"}}, output_names=["logits"]
        )

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


def llama_mlp_masks(module, ratio: float, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[int, int]]:
    """Random MLP-neuron masks (gate/up rows, down columns); returns masks and kept width per layer."""
    masks, kept = {}, {}
    for i, layer in enumerate(module.model.layers):
        width = layer.mlp.down_proj.weight.shape[1]
        keep = np.ones(width, dtype=np.float32)
        keep[rng.choice(width, int(ratio * width), replace=False)] = 0
        prefix = f"model.layers.{i}.mlp."
        hidden = layer.mlp.gate_proj.weight.shape[1]
        masks[prefix + "gate_proj.weight"] = np.repeat(keep[:, None], hidden, axis=1)
        masks[prefix + "up_proj.weight"] = np.repeat(keep[:, None], hidden, axis=1)
        masks[prefix + "down_proj.weight"] = np.repeat(keep[None, :], hidden, axis=0)
        kept[i] = int(keep.sum())
    return masks, kept


def save_masks(masks: dict[str, np.ndarray], path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in masks.items()}, str(path))


def pass_record(report: dict, name: str) -> dict:
    """One pass's entry in a compile report, flat: its record plus pass, exact, modified and refused."""
    entry = next(r for r in report["passes"] if r["pass"] == name)
    return {**entry["record"], **{k: v for k, v in entry.items() if k != "record"}}
