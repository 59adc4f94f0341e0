"""Issue-15 benchmark: a sweep on a local Ray cluster (one dense export) vs the same variants as separate
`prune` + `compile` runs (each paying the load and the export), and the Pareto plot.

    python benchmarks/bench_sweep.py benchmarks/sweeps/minilm-2x2.yaml --out /tmp/sweep-minilm --separate 4
    python benchmarks/bench_sweep.py benchmarks/sweeps/smollm2-3x2.yaml --out /tmp/sweep-smollm2 --separate 1

The sweep runs first, with a fresh export cache inside ``--out`` (so it pays its one export); then the first
``--separate`` variants run the old way, one after the other in this process, each from the checkpoint:
``api.prune`` (loads the model, scores) then ``api.compile`` (loads it again, applies the masks, exports).
When ``--separate`` is smaller than the grid, the separate total is extrapolated from their mean (and says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--separate", type=int, default=0, help="variants also run as separate prune + compile")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    args = parser.parse_args(argv)

    from prune2deploy import api
    from prune2deploy.sweep.report import pareto_plot
    from prune2deploy.sweep.spec import expand, load_sweep

    def say(message: str) -> None:
        print(f"· {message}", file=sys.stderr, flush=True)

    spec = load_sweep(args.sweep)
    if args.num_cpus:
        import ray

        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, resources={"p2d_cpu_profiler": 1}
        )
    start = time.perf_counter()
    result = api.sweep(spec, args.out / "sweep", cache_dir=args.out / "cache", progress=say)
    sweep_s = time.perf_counter() - start
    record = result.record
    png = pareto_plot(record["variants"], "png")
    if png:
        (args.out / "pareto.png").write_bytes(png)

    separate = []
    for variant in expand(spec)[: args.separate]:
        folder = args.out / "separate" / variant.id
        p = variant.prune
        t0 = time.perf_counter()
        say(f"separately: prune + compile {variant.id}")
        api.prune(
            spec.model, folder / "prune", criterion=p.criterion, structures=p.structures(), per_layer=p.per_layer,
            round_to=p.round_to, nm=p.nm, calibration=p.calibration, num_samples=p.samples, seq_len=p.seq_len,
            batch_size=p.batch_size, head_grouping=p.head_grouping, overwrite=True,
        )  # fmt: skip
        options = variant.compile_options(plan=folder / "prune" / "plan.yaml", overwrite=True, keep_reference=False)
        report = api.compile(spec.model, folder / "compiled", options).report
        separate.append({"id": variant.id, "seconds": time.perf_counter() - t0, "timings": report["timings"]})
    rows = {v["id"]: v for v in record["variants"]}
    summary = {
        "sweep_wall_s": sweep_s,
        "exports": record["exports"],
        "export_s": record["export"]["seconds"],
        "model_load_s": record["timings"].get("model_load_s"),
        "variants": [
            {
                "id": v["id"],
                "error": v["error"],
                "prune_s": v.get("timings", {}).get("prune_s"),
                "task_s": v.get("seconds"),
                "params": (v.get("params") or {}).get("compiled"),
                "ms": next((r["compiled_ms"] for r in v.get("latency_ms", []) if r["kind"] == "measured"), None),
                "speedup": v.get("speedup"),
                "quality": v.get("quality"),
            }
            for v in record["variants"]
        ],
        "separate": separate,
    }
    if separate:
        mean = sum(s["seconds"] for s in separate) / len(separate)
        summary["separate_total_s"] = mean * len(rows)
        summary["separate_extrapolated"] = len(separate) < len(rows)
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}, indent=2, default=str))
    print("| variant | params | CPU ms | speedup | quality | task s |")
    print("|---|---|---|---|---|---|")
    for v in summary["variants"]:
        q = v["quality"] or {}
        quality = f"KL {q['kl_mean']:.4f}" if "kl_mean" in q else (f"cos {q['cosine_mean']:.5f}" if q else "-")
        ms = f"{v['ms']:.2f}" if v["ms"] else "-"
        speed = f"{v['speedup']:.2f}x" if v["speedup"] else "-"
        print(f"| {v['id']} | {v['params']} | {ms} | {speed} | {quality} | {v['task_s'] or 0:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
