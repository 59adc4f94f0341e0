"""Magnitude vs Wanda on SmolLM2-135M: perplexity and KL to the dense model at 50% and 2:4 sparsity.

Weight-only masks (no shape change), evaluated in torch fp32 on the bundled evaluation text, which is
disjoint from the calibration text. Wanda should beat magnitude clearly at both patterns (Sun et al. 2023,
Table 2 shows the same ordering on LLaMA at 50% and 2:4); the gap is what calibration data buys.

    python benchmarks/bench_pruning.py --json out/bench_pruning.json
    python benchmarks/bench_pruning.py --criteria magnitude wanda taylor --patterns 0.5 2:4 4:8
    python benchmarks/bench_pruning.py --criteria magnitude wanda taylor minitron --patterns mlp=0.25

Calibration: the bundled text (``--samples`` windows of ``--seq-len`` tokens; the Wanda paper used
128 × 2048 tokens of C4, so absolute numbers here are for this small setting only).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common

log = logging.getLogger("bench_pruning")


def _pattern(text: str) -> tuple[dict[str, float], tuple[int, int] | None]:
    """``0.5`` (unstructured), ``2:4`` (N:M) or structure ratios such as ``mlp=0.25,heads=0.33``."""
    if "=" in text:
        pairs = (item.split("=") for item in text.split(","))
        return {key: float(value) for key, value in pairs}, None
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        return {}, (n, m)
    return {"unstructured": float(text)}, None


def _structured_sparsity(module, masks) -> float:
    """Fraction of the blocks' Linear weights that the masks zero (embeddings excluded)."""
    from prune2deploy.pruning import detect_structure

    names = detect_structure(module).linear_weights()
    params = dict(module.named_parameters())
    zeros = sum(int((masks[n] == 0).sum()) for n in names if n in masks)
    return round(zeros / sum(params[n].numel() for n in names), 6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or HF folder")
    parser.add_argument("--criteria", nargs="+", default=["magnitude", "wanda"])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4"], help="a ratio, N:M, or structure=ratio[,...]")
    parser.add_argument("--head-grouping", default="uniform", choices=["free", "uniform", "whole-group"])
    parser.add_argument("--samples", type=int, default=24, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    parser.add_argument("--window", type=int, default=128, help="evaluation window length")
    common.add_threads(parser, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.pruning import apply_masks, load_calibration, prune_module
    from prune2deploy.quality import lm_quality

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_hf_model(args.model)
    calib = load_calibration(None, tokenizer=model.tokenizer, num_samples=args.samples, seq_len=args.seq_len)
    log.info("calibration: %d x %d tokens, sha256 %s", calib.num_samples, calib.seq_len, calib.sha256[:12])
    rows = []
    for pattern in args.patterns:
        structures, nm = _pattern(pattern)
        for criterion in args.criteria:
            t0 = time.perf_counter()
            plan, masks = prune_module(
                model.module,
                criterion=criterion,
                structures=structures,
                nm=nm,
                calibration=calib,
                head_grouping=args.head_grouping,
            )
            prune_s = time.perf_counter() - t0
            masked = apply_masks(copy.deepcopy(model.module), masks)
            q = lm_quality(model.module, masked, tokenizer=model.tokenizer, window=args.window)
            sparsity = plan.sparsity["achieved"] if plan.sparsity else _structured_sparsity(model.module, masks)
            del masked, masks
            row = {
                "criterion": criterion,
                "pattern": pattern,
                "sparsity": sparsity,
                "ppl_dense": q.ppl_reference,
                "ppl": q.ppl_candidate,
                "kl_mean": q.kl_mean,
                "top1_agreement": q.top1_agreement,
                "eval_tokens": q.tokens,
                "prune_s": round(prune_s, 1),
            }
            log.info("%s", row)
            rows.append(row)
    print(f"{'pattern':>8} {'criterion':>10} {'sparsity':>8} {'ppl':>9} {'dense ppl':>9} {'KL':>7} {'top-1':>6}")
    for r in rows:
        print(
            f"{r['pattern']:>8} {r['criterion']:>10} {r['sparsity']:>8.3f} {r['ppl']:>9.2f} "
            f"{r['ppl_dense']:>9.2f} {r['kl_mean']:>7.3f} {r['top1_agreement']:>6.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": args.model,
            "calibration": calib.info(),
            "window": args.window,
            "torch": torch.__version__,
            "python": common.machine()["python"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
