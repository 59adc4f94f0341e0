"""Global MLP ranking on a common scale: per-layer widths and quality of ``prune --global`` plans for SmolLM2.

For each ranking (per layer; global on raw scores; global on per-layer standardized scores, with and without a
``--min-keep`` floor) the masks of ``prune_module`` are applied in torch and compared with the dense model on
the evaluation windows the compile's quality step reads (as ``bench_demo_criteria.py`` does): top-1 agreement
and perplexity, plus the kept widths per layer. Deterministic (no timing), so one run is the measurement.

    PYTHONPATH=. python benchmarks/bench_global_ranking.py --criterion wanda --ratio 0.5 --round-to 32 \
        --rankings per-layer,raw,standardize,standardize:0.25
"""

from __future__ import annotations

import argparse

from benchmarks.bench_demo_criteria import masked_quality, smollm2_reference
from prune2deploy.pruning.prune import prune_module


def _options(ranking: str) -> dict:
    """``per-layer``, ``raw``, ``standardize`` or ``SCALE:MIN_KEEP`` → prune_module's ranking arguments."""
    if ranking == "per-layer":
        return {"per_layer": True}
    scale, _, floor = ranking.partition(":")
    return {"per_layer": False, "global_scale": scale, "min_keep": float(floor or 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", default="wanda")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=32)
    parser.add_argument("--rankings", default="per-layer,raw,standardize,standardize:0.25")
    parser.add_argument("--windows", type=int, default=4, help="windows of 128 tokens (the compile's default)")
    args = parser.parse_args()
    module, windows, dense, calibration = smollm2_reference(args.windows)
    print("| ranking | kept MLP neurons | widths min–max | widths per layer | top-1 vs dense | perplexity |")
    print("|---|---|---|---|---|---|")
    for ranking in args.rankings.split(","):
        plan, masks = prune_module(
            module, criterion=args.criterion, structures={"mlp": args.ratio}, round_to=args.round_to,
            calibration=calibration, **_options(ranking),
        )  # fmt: skip
        widths = [len(layer.mlp.kept) for layer in plan.layers]
        top1, ppl = masked_quality(module, masks, dense, windows)
        print(
            f"| {ranking} | {sum(widths):,} | {min(widths)}–{max(widths)} | {' '.join(map(str, widths))} "
            f"| {top1:.3f} | {ppl:,.1f} |"
        )


if __name__ == "__main__":
    main()
