"""Issue-17 benchmark: the cost model's predictions against published measurements.

For every figure of prune2deploy/profiling/published.json (TensorRT-LLM, TensorRT demoBERT, llama.cpp and
MLPerf Inference results, each with its source), prints the published and predicted milliseconds per step,
the ideal roofline (lower bound), the signed error, the median absolute error and, per workload setting
measured on several GPUs, whether the predicted GPU order is the published one. No GPU, no weights.

Beside the in-sample error (the shipped factors, several of them fitted on these same figures) it prints the
leave-one-source-out cross-validated error: each publication's figures predicted with the fitted factors
(costmodel.FITTED) refit on the other publications only, starting from the cited priors
(validation.PRIORS) (``--by workload``: leave one workload out); then the shipped factors and each fold's.

    python benchmarks/bench_published.py [--json] [--by source|workload]
"""

from __future__ import annotations

import json
import sys

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--by", choices=["source", "workload"], default="source", help="cross-validation groups")
    args = parser.parse_args(argv)

    from prune2deploy.profiling.costmodel import FITTED, factor
    from prune2deploy.profiling.validation import PRIORS, compare_published, cross_validate, orderings, summary

    rows = compare_published()
    result = summary(rows)
    held, fitted = cross_validate(by=args.by)
    cv = summary(held)
    if args.json:
        out = {"rows": [r.as_dict() for r in rows], "orderings": orderings(rows), **result}
        out["cross_validated"] = {"by": args.by, "rows": [r.as_dict() for r in held], "fitted": fitted, **cv}
        print(json.dumps(out, indent=2))
        return 0
    header = (
        f"{'figure':<50} {'gpu':<21} {'published ms':>12} {'predicted':>10} {'ideal':>9} {'error':>7} "
        f"{'cv error':>8}  bound"
    )
    print(header)
    print("-" * len(header))
    for r, h in zip(rows, held, strict=True):
        print(
            f"{r.id:<50} {r.gpu:<21} {r.published_ms:>12.4g} {r.predicted_ms:>10.4g} {r.lower_bound_ms:>9.3g} "
            f"{100 * r.error:>+6.0f}% {100 * h.error:>+7.0f}%  {r.binding}"
        )
    print()
    for o in orderings(rows):
        workload, model, precision, batch, seq, sparse = o["setting"]
        name = f"{workload} {model} {precision}{' 2:4' if sparse else ''} b{batch} s{seq}"
        verdict = "holds" if o["holds"] else f"DIFFERS (predicted {' < '.join(o['predicted'])})"
        print(f"order {name:<44} published {' < '.join(o['published'])}: {verdict}")
    print()
    print(
        f"{result['figures']} figures, {len(result['gpus'])} GPU types, {len(result['workloads'])} workloads; "
        f"median |error| {100 * result['median_abs_error']:.1f}% "
        f"({', '.join(f'{w} {100 * e:.0f}%' for w, e in result['median_abs_error_by_workload'].items())}); "
        f"GPU order held in {result['orderings_held']} of {result['orderings']} settings"
    )
    for name, r in (("in-sample (shipped factors)", result), (f"leave-one-{args.by}-out", cv)):
        print(
            f"{name:<28} median |error| {100 * r['median_abs_error']:.1f}%, median signed error "
            f"{100 * r['median_signed_error']:+.1f}%, {r['optimistic']} of {r['figures']} predicted faster than "
            f"published, GPU order held in {r['orderings_held']} of {r['orderings']}"
        )
    print("fitted factors: " + ", ".join(f"{n} {factor(n):g} (prior {PRIORS[n]:g})" for n in FITTED))
    for group, values in fitted.items():
        print(f"  without {group:<44} " + ", ".join(f"{values[n]:g}" for n in FITTED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
