"""Which criterion and MLP ratio keep the demo's SmolLM2 useful: masked vs dense on the bundled evaluation text.

For each criterion and ratio the masks of ``prune`` (or the old demo's magnitude masks) are applied in torch and
the masked model is compared with the dense one on the evaluation windows the compile's quality step uses:
top-1 agreement and perplexity. The compile itself is exact, so this is the quality the demo's output keeps.

    PYTHONPATH=. python benchmarks/bench_demo_criteria.py --criteria magnitude-demo,wanda,minitron --ratios 0.1,0.3,0.5
"""

from __future__ import annotations

import argparse
import time

import torch

from prune2deploy.demo import mlp_neuron_masks
from prune2deploy.frontends.hf import load_hf_model
from prune2deploy.pruning.calibration import bundled_text, load_calibration
from prune2deploy.pruning.masks import apply_masks
from prune2deploy.pruning.prune import prune_module


def _windows(tokenizer, count: int, length: int = 128) -> torch.Tensor:
    ids = tokenizer(bundled_text("evaluation.txt"), return_tensors="pt")["input_ids"][0]
    return torch.stack([ids[i * length : (i + 1) * length] for i in range(count)])


def _agreement(logits: torch.Tensor, dense: torch.Tensor, windows: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the dense model, perplexity) of ``logits`` on ``windows``."""
    top1 = (logits.argmax(-1) == dense.argmax(-1)).float().mean().item()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, windows[:, 1:, None])[..., 0]
    return top1, float(torch.exp(-logp.mean()))


def smollm2_reference(window_count: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SmolLM2-135M, ``window_count`` evaluation windows, its dense logits on them and the calibration set
    ``prune`` scores on (printing the dense perplexity): what every masked variant is compared with."""
    loaded = load_hf_model("smollm2-135m")
    module, tokenizer = loaded.module.eval(), loaded.tokenizer
    windows = _windows(tokenizer, window_count)
    with torch.no_grad():
        dense = module(windows).logits.float()
    print(f"dense perplexity {_agreement(dense, dense, windows)[1]:.1f}")
    calibration = load_calibration(None, tokenizer=tokenizer, seq_len=128, num_samples=24)
    return module, windows, dense, calibration


def masked_quality(module, masks: dict[str, torch.Tensor], dense: torch.Tensor, windows: torch.Tensor):
    """Top-1 vs dense and perplexity of ``module`` with ``masks`` applied in place (restored afterwards)."""
    saved = {n: p.detach().clone() for n, p in module.named_parameters() if n in masks}
    apply_masks(module, masks)
    try:
        with torch.no_grad():
            return _agreement(module(windows).logits.float(), dense, windows)
    finally:
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name in saved:
                    param.copy_(saved[name])


def _masks(module, criterion: str, ratio: float, calibration) -> dict[str, torch.Tensor]:
    if criterion == "magnitude-demo":  # the demo's masks before: product of weight norms per neuron
        return {k: torch.from_numpy(v) for k, v in mlp_neuron_masks(module, ratio).items()}
    _, masks = prune_module(module, criterion=criterion, structures={"mlp": ratio}, calibration=calibration)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", default="magnitude-demo,wanda,minitron")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--windows", type=int, default=4, help="windows of 128 tokens (the compile's default)")
    args = parser.parse_args()
    module, windows, dense, calibration = smollm2_reference(args.windows)
    print("| criterion | MLP ratio | top-1 vs dense | perplexity | seconds |\n|---|---|---|---|---|")
    for criterion in args.criteria.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            start = time.perf_counter()
            masks = _masks(module, criterion, ratio, calibration)
            top1, ppl = masked_quality(module, masks, dense, windows)
            print(f"| {criterion} | {ratio:.2f} | {top1:.3f} | {ppl:,.1f} | {time.perf_counter() - start:.0f} |")


if __name__ == "__main__":
    main()
