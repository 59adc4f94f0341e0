"""A CNN pruned with ``torch.nn.utils.prune`` → compile → exact, smaller, faster, with the numbers.

The workflow most CNN users have: a ResNet whose filters were pruned with PyTorch's own pruning utilities.
Two masks are shown, both as ``torch.nn.utils.prune`` reparametrisations (``weight_orig`` × ``weight_mask``),
which ``api.compile`` accepts as they are (it bakes the masks into a copy before export):

- ``ln_structured``: the output filters of each residual block's first conv with the smallest L1 norm
  (Li et al. 2017). A zeroed filter still leaves BatchNorm's shift, a per-channel constant; it folds into the
  next layer's bias only when that layer has no zero padding, and here the next conv pads. So the example
  masks the BatchNorm's weight and bias of the same channels too (``custom_from_mask``): then the channel is
  exactly zero and is removed exactly.
- SCOP-style: channels chosen by the BatchNorm scale |γ| (the scaling factor SCOP and Network Slimming
  learn), masked on γ and β of the block's first BatchNorm (``custom_from_mask``).

The compile removes the channels physically (weights, BatchNorm statistics, the next conv's inputs),
verifies on ONNX Runtime that the outputs equal the masked model's, and measures both side by side on CPU:
a channel-pruned conv is a smaller dense conv, so unlike 2:4 it is faster on a CPU too.

The model is torchvision's ``resnet18`` (random weights, no download) when torchvision imports, else a
ResNet-18-shaped module defined below (torchvision's PyPI wheels do not import beside every torch build).
BatchNorm statistics are randomised so that the masks meet realistic values. ``--quick``: a 64-pixel input,
a narrower ResNet and a 2-second timing budget.

Run: ``python examples/torch_prune_cnn.py --out build/cnn`` (2 min 38 s on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.utils.prune as prune
from torch import nn

from prune2deploy import api
from prune2deploy.frontends.torch import ExportSpec


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet-18's layout (2 basic blocks per stage) at a chosen base width; 64 is ResNet-18 itself."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(quick: bool) -> tuple[nn.Module, str]:
    """torchvision's resnet18 when it imports (full mode), else the ResNet above; BatchNorm stats randomised."""
    torch.manual_seed(0)
    model, name = None, ""
    if not quick:
        try:
            from torchvision.models import resnet18

            model, name = resnet18(weights=None), "torchvision resnet18 (random weights)"
        except Exception as exc:  # not installed, or a wheel built for another torch
            print(f"   torchvision not usable ({type(exc).__name__}); using the ResNet-18 defined in this example")
    if model is None:
        width = 16 if quick else 64
        model, name = ResNet(width), f"ResNet-18 layout, base width {width} (defined in this example)"
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval(), name


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "conv1") and hasattr(m, "bn2")]


def mask_channels(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    """Zeros BatchNorm's scale and shift of the dropped channels (a torch.nn.utils.prune mask on each)."""
    prune.custom_from_mask(bn, "weight", keep.float())
    prune.custom_from_mask(bn, "bias", keep.float())


def ln_structured(model: nn.Module, amount: float) -> int:
    """L1 filter pruning of every block's conv1 (output filters), BatchNorm masked to match."""
    removed = 0
    for block in blocks(model):
        prune.ln_structured(block.conv1, "weight", amount=amount, n=1, dim=0)
        keep = block.conv1.weight_mask.flatten(1).any(dim=1)
        mask_channels(block.bn1, keep)
        removed += int((~keep).sum())
    return removed


def scop_bn_gamma(model: nn.Module, amount: float) -> int:
    """SCOP-style: the channels of every block's bn1 with the smallest |γ|, masked on γ and β."""
    removed = 0
    for block in blocks(model):
        gamma = block.bn1.weight.detach().abs()
        keep = torch.ones_like(gamma, dtype=torch.bool)
        keep[torch.argsort(gamma)[: round(amount * gamma.numel())]] = False
        mask_channels(block.bn1, keep)
        removed += int((~keep).sum())
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/torch_prune_cnn"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="narrow ResNet, small input, short timing (CI)")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of each block's conv1 channels")
    args = parser.parse_args(argv)
    out: Path = args.out
    size, budget = (64, 2.0) if args.quick else (224, 10.0)
    results = {}
    for label, method in (("ln_structured", ln_structured), ("scop_bn_gamma", scop_bn_gamma)):
        model, name = build_model(args.quick)
        removed = method(model, args.amount)
        print(f"{label}: {name}; {removed} channels masked with torch.nn.utils.prune")
        # Not a transformers model: say what the input looks like (batch 2: batch 1 would be specialised).
        model.example_inputs = ExportSpec(
            inputs={"x": torch.randn(2, 3, size, size)}, dynamic_axes={"x": {0: "batch"}}, output_names=["logits"]
        )
        options = api.CompileOptions(
            overwrite=True, profile_batches=[1], profile_budget_s=budget, gpus=["l4", "jetson-orin-nano"]
        )
        result = api.compile(model, out / label, options)
        report = result.report
        ref, new = report["model"]["reference"], report["model"]["compiled"]
        speed = report["speedup"][0]
        lat = {r["model"]: r for r in report["latency"]}
        print(f"   {api.verdict_line(report['verification'])}")
        print(
            f"   params {ref['params']:,} → {new['params']:,} ({new['params'] / ref['params']:.0%}), "
            f"FLOPs {ref['flops']:,} → {new['flops']:,} ({new['flops'] / ref['flops']:.0%})"
        )
        print(
            f"   CPU batch 1, {size}×{size}: {lat['reference']['median_ms']:.2f} ms → "
            f"{lat['compiled']['median_ms']:.2f} ms, {speed['measured']:.2f}× "
            f"(95% CI {speed['ci'][0]:.2f}–{speed['ci'][1]:.2f}; ideal {speed['ideal_speedup']:.2f}×, "
            f"{speed['runs']} runs)"
        )
        for row in report["predictions"]:
            print(f"   predicted {row['gpu']}: {row['speedup']:.2f}× ({row['precision']})")
        print(f"   → {result.out_dir}/model.onnx, report.html")
        results[label] = {
            "model": name,
            "channels_masked": removed,
            "verification": report["verification"]["status"],
            "params": [ref["params"], new["params"]],
            "flops": [ref["flops"], new["flops"]],
            "cpu_speedup": speed,
        }
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\noutputs: {out}/ln_structured/, {out}/scop_bn_gamma/, {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
