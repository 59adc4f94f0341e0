"""Issue-5 benchmark: dense vs compiled (structured pruning + 2:4) — measured on ONNX Runtime CPU and
predicted by the roofline model on every GPU of the catalog.

Compiles each model with 50% of its MLP neurons removed (magnitude masks, exact) and 2:4 imposed on every
eligible weight (approximate; the LM head stays dense), then:

* measures ONNX Runtime CPU latency of the masked reference vs the compiled model, side by side (2:4 gives
  no CPU speedup: ORT's CPU kernels are dense, so the CPU ratio is the structured part alone);
* predicts fp16 latency per catalog GPU at every (batch, seq) of the grid, 2:4 weights at the sparse
  tensor-core peak where the GPU has one.

    python benchmarks/bench_targets.py --models minilm-l6 smollm2-135m --out /tmp/bench-targets
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
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-targets"))
    parser.add_argument("--measure-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--measure-seq", type=int, nargs="+", default=[128])
    parser.add_argument("--predict-batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--predict-seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--budget", type=float, default=30.0)
    args = parser.parse_args(argv)

    import onnx_ir as ir

    from prune2deploy import api
    from prune2deploy.analysis.cost import model_cost
    from prune2deploy.demo import demo_masks
    from prune2deploy.profiling.roofline import predict_table
    from prune2deploy.spec import CompileOptions

    results = {}
    for name in args.models:
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        masks = demo_masks(name, 0.5, args.out / f"{name}-masks.safetensors")
        options = CompileOptions(
            masks=masks,
            passes=["remove-channels", "sparsify-2:4"],
            profile_batches=args.measure_batch,
            profile_seqs=args.measure_seq,
            profile_budget_s=args.budget,
        )
        report = api.compile(name, out, options).report
        sparse = next(r for r in report["passes"] if r["pass"] == "sparsify-2:4")["record"]
        worst = max(o["max_rel"] for o in report["verification"]["outputs"].values())
        print(
            f"\n## {name}: params {report['model']['reference']['params'] / 1e6:.2f} M -> "
            f"{report['model']['compiled']['params'] / 1e6:.2f} M; 2:4 on {sparse['made_nm'] + sparse['already_nm']} "
            f"of {sparse['eligible']} eligible weights ({100 * sparse['sparse_flops_fraction']:.0f}% of GEMM FLOPs); "
            f"error vs masked reference (2:4 is approximate): max rel {worst:.3g}"
        )
        print("\nONNX Runtime CPU (median ms, same run):\n")
        header = ["batch", "seq", "reference", "compiled", "measured speedup", "structured ideal (FLOP ratio)"]
        print(common.markdown_table(header, common.speedup_rows(report, digits=2, runs=False, percent=False)))
        reference = ir.load(str(out / "reference.onnx"))
        compiled = ir.load(str(out / "model.onnx"))
        rows = []
        for batch in args.predict_batch:
            for seq in args.predict_seq:
                ref_cost = model_cost(reference, batch=batch, seq=seq)
                new_cost = model_cost(compiled, batch=batch, seq=seq)
                rows += predict_table(ref_cost, new_cost, precision=args.precision, batch=batch, seq=seq)
        print(f"\nPredicted {args.precision} latency (roofline, ideal: datasheet peaks, no launch overhead), ms:\n")
        gpus = sorted({r.gpu for r in rows})
        grid = [(b, s) for b in args.predict_batch for s in args.predict_seq]
        by = {(r.gpu, r.batch, r.seq): r for r in rows}
        table = []
        for gpu in gpus:
            cells = [gpu]
            for b, s in grid:
                r = by.get((gpu, b, s))
                cells.append(f"{r.reference_ms:.3g} → {r.compiled_ms:.3g} ({r.speedup:.2f}x)" if r else "-")
            table.append(cells)
        print(common.markdown_table(["GPU", *(f"b{b} s{s}: dense → compiled" for b, s in grid)], table))
        results[name] = {"report": report, "predictions": [r.as_dict() for r in rows]}
        masks.unlink(missing_ok=True)
    (args.out / "bench_targets.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
