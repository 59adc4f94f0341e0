"""Issue-2 benchmark: SmolLM2-135M with 50% of every MLP's neurons masked by magnitude.

Measures end-to-end compile time and peak memory, parameters and FLOPs before/after, and ONNX Runtime CPU
latency of the masked reference (same shapes as the dense model) vs the compiled model at batch 1 and 8,
sequence 128, side by side in one run (median of repeated runs), next to the ideal speedup (FLOP ratio).

    python benchmarks/bench_foundation.py --out /tmp/bench-foundation [--model smollm2-135m] [--ratio 0.5]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-foundation"))
    common.add_profile_grid(parser, budget=30.0)
    args = parser.parse_args(argv)

    from prune2deploy import api
    from prune2deploy.demo import demo_masks
    from prune2deploy.spec import CompileOptions

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    masks = demo_masks(args.model, args.ratio, args.out.parent / f"{args.out.name}-masks.safetensors")
    options = CompileOptions(
        masks=masks,
        profile_batches=args.batch,
        profile_seqs=args.seq,
        threads=args.threads,
        profile_budget_s=args.budget,
        keep_reference=False,
    )
    clock = common.Stopwatch()
    report = api.compile(args.model, args.out, options).report
    wall = clock.seconds
    peak_mb = common.peak_rss_mb()
    ref, new = report["model"]["reference"], report["model"]["compiled"]
    timings = report["timings"]
    profile_s = wall - timings.get("load_and_export_s", 0) - timings.get("passes_s", 0) - timings.get("verify_s", 0)
    print(f"model: {args.model}, {args.ratio:.0%} of MLP neurons masked by magnitude")
    print(f"compile wall time (incl. export, verification and profiling): {wall:.1f} s; peak RSS {peak_mb:.0f} MB")
    print(
        f"  export {timings['load_and_export_s']:.1f} s, passes {timings['passes_s']:.1f} s, "
        f"verify {timings['verify_s']:.1f} s, profile+report {profile_s:.1f} s"
    )
    print(
        f"parameters {ref['params'] / 1e6:.2f} M -> {new['params'] / 1e6:.2f} M; "
        f"FLOPs at batch {report['model']['cost_shape']['batch']} seq {report['model']['cost_shape']['seq']}: "
        f"{ref['flops'] / 1e9:.2f} G -> {new['flops'] / 1e9:.2f} G (ideal speedup {ref['flops'] / new['flops']:.3f}x)"
    )
    print(
        f"verification: passed={report['verification']['passed']}, worst relative error "
        f"{max(o['max_rel'] for o in report['verification']['outputs'].values()):.2e}"
    )
    header = ["batch", "seq", "reference median ms", "compiled median ms", "runs (ref/comp)"]
    header += ["measured speedup", "ideal", "% of ideal"]
    print(common.markdown_table(header, common.speedup_rows(report)))
    (args.out / "bench.json").write_text(
        json.dumps({"wall_s": wall, "peak_rss_mb": peak_mb, "report": report}, indent=1)
    )
    masks.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
