"""Tiny ONNX models built in code for engine and pass tests: an MLP, a CNN and a Llama with random weights.

Each builder writes ``<folder>/<name>.onnx`` once and returns its path, so that session fixtures can share
exports (the Llama export takes a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["export_cnn", "export_mlp", "export_tiny_llama"]


def _export(module: torch.nn.Module, args: tuple, path: Path, names: list[str], dynamic: tuple) -> Path:
    if not path.exists():
        module.eval()
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=dynamic,
            )
    return path


def export_mlp(folder: Path, *, sparse_24: bool = False, seed: int = 0) -> Path:
    """Linear(64→128)-ReLU-Linear(128→32), dynamic batch.

    ``sparse_24`` zeroes 2 of every 4 weights along K, as 2:4 pruning does.
    """
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    if sparse_24:
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.view(-1, 4)[:, :2] = 0
    batch = torch.export.Dim("batch", min=1, max=1024)
    name = "mlp_24" if sparse_24 else "mlp"
    return _export(model, (torch.randn(2, 64),), folder / f"{name}.onnx", ["x"], ({0: batch},))


class _SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        y = torch.nn.functional.max_pool2d(torch.sigmoid(self.dw(y)) * y, 2)
        return self.fc(torch.flatten(self.pool(y), 1))


def export_cnn(folder: Path, *, seed: int = 0) -> Path:
    """Conv-BN-ReLU with a residual, a depthwise conv, max/avg pooling and a classifier; dynamic batch."""
    torch.manual_seed(seed)
    model = _SmallCNN()
    with torch.no_grad():  # non-trivial running statistics, so that BatchNormalization is exercised
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    batch = torch.export.Dim("batch", min=1, max=64)
    return _export(model, (torch.randn(2, 3, 16, 16),), folder / "cnn.onnx", ["pixels"], ({0: batch},))


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, 4 query / 2 kv heads, vocab 128) with dynamic batch and sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = folder / "tiny_llama.onnx"
    if path.exists():
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = _LogitsOnly(LlamaForCausalLM(config))
    batch, seq = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("seq", min=2, max=64)
    ids = torch.randint(0, 128, (2, 8))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    return _export(model, (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"], dynamic)
