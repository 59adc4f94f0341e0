"""Issue-6 benchmark, width pruning: quality of masks written by `prune2deploy prune`, against the dense model.

Run `prune` first (one folder per criterion), then this script evaluates each folder's masks on the bundled
evaluation text (per-token KL, top-1 agreement, perplexity). The compiled model equals the masked one up to
float rounding (the structural passes are exact), so the masked torch model stands for it.

    prune2deploy prune smollm2-135m --out /tmp/minitron25 --criterion minitron --mlp 0.25 --heads 0.25 \\
        --head-grouping uniform --samples 16 --compile
    prune2deploy prune smollm2-135m --out /tmp/magnitude25 --criterion magnitude --mlp 0.25 --heads 0.25 \\
        --head-grouping uniform
    python benchmarks/bench_width.py /tmp/minitron25 /tmp/magnitude25
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("folders", type=Path, nargs="+", help="prune output folders (masks.safetensors + plan.yaml)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 128 tokens")
    args = parser.parse_args(argv)

    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.frontends.masks import apply_masks_torch, load_masks
    from prune2deploy.pruning.plan import load_plan
    from prune2deploy.quality import lm_quality

    loaded = load_hf_model(args.model)
    text = resources.files("prune2deploy").joinpath("data/evaluation.txt").read_text()
    print("| criterion | structures | perplexity (dense → pruned) | KL vs dense (nats/token) | top-1 agreement |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        plan = load_plan(folder / "plan.yaml")
        masked = apply_masks_torch(loaded.module, load_masks(folder / "masks.safetensors"))
        q = lm_quality(loaded.module, masked, tokenizer=loaded.tokenizer, text=text, max_windows=args.windows)
        ratios = ", ".join(f"{k} {v:.0%}" for k, v in plan.ratios.items())
        print(
            f"| {plan.criterion} | {ratios} | {q.ppl_reference:.2f} → {q.ppl_candidate:.2f} | {q.kl_mean:.3f} "
            f"| {q.top1_agreement:.3f} |"
        )
        del masked
    return 0


if __name__ == "__main__":
    sys.exit(main())
