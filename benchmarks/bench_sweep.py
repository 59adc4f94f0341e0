"""Issue-15 benchmark: a sweep on a local Ray cluster (one dense export) vs the same variants as separate
`prune` + `compile` runs (each paying the load and the export), and the Pareto plot.

    python benchmarks/bench_sweep.py benchmarks/sweeps/minilm-2x2.yaml --out /tmp/sweep-minilm --separate 4
    python benchmarks/bench_sweep.py benchmarks/sweeps/smollm2-3x2.yaml --out /tmp/sweep-smollm2 --separate 1

The sweep runs first, with a fresh export cache inside ``--out`` (so it pays its one export); then the first
``--separate`` variants run the old way, one after the other in this process, each from the checkpoint:
``prune2deploy prune`` (loads the model, scores) then ``prune2deploy compile`` (loads it again, exports).
When ``--separate`` is smaller than the grid, the separate total is extrapolated from their mean (and says so).
The separate runs are what the shell loop did: two fresh processes per variant (``prune2deploy prune`` and
``prune2deploy compile --config``), so each pays Python + torch imports, the load and the export. They do
not measure quality against the dense model (that needs a dense export of its own); the sweep's time spent
on quality is reported separately (``quality_s``) so the two can be compared like for like.
``--no-sweep`` reuses ``OUT/sweep/sweep.json`` and only runs the separate variants.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _separate(spec, variant, folder: Path, say) -> dict:
    """One variant the old way: `prune2deploy prune` then `prune2deploy compile`, each a fresh process."""
    import yaml

    p = variant.prune
    folder.mkdir(parents=True, exist_ok=True)
    prune = [sys.executable, "-m", "prune2deploy.cli", "prune", spec.model, "--out", str(folder / "prune")]
    prune += ["--criterion", p.criterion, "--samples", str(p.samples), "--seq-len", str(p.seq_len), "--overwrite"]
    for key, ratio in p.structures().items():
        prune += [f"--{key}", str(ratio)]
    if p.nm:
        prune += ["--nm", f"{p.nm[0]}:{p.nm[1]}"]
    config = folder / "compile.yaml"
    config.write_text(yaml.safe_dump({**variant.compile, "keep_reference": False}))
    compile_ = [sys.executable, "-m", "prune2deploy.cli", "compile", spec.model, "--out", str(folder / "compiled")]
    compile_ += ["--plan", str(folder / "prune" / "plan.yaml"), "--config", str(config), "--overwrite", "--quiet"]
    say(f"separately: prune + compile {variant.id}")
    t0 = time.perf_counter()
    subprocess.run(prune, check=True, capture_output=True)
    prune_s = time.perf_counter() - t0
    subprocess.run(compile_, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    report = json.loads((folder / "compiled" / "report.json").read_text())
    return {"id": variant.id, "seconds": seconds, "prune_s": prune_s, "timings": report["timings"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--separate", type=int, default=0, help="variants also run as separate prune + compile")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-sweep", action="store_true", help="reuse OUT/sweep/sweep.json; run only --separate")
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
    previous = json.loads((args.out / "bench.json").read_text()) if args.no_sweep else {}
    start = time.perf_counter()
    if args.no_sweep:
        record = json.loads((args.out / "sweep" / "sweep.json").read_text())
        sweep_s = previous["sweep_wall_s"]
    else:
        record = api.sweep(spec, args.out / "sweep", cache_dir=args.out / "cache", progress=say).record
        sweep_s = time.perf_counter() - start
    png = pareto_plot(record["variants"], "png")
    if png:
        (args.out / "pareto.png").write_bytes(png)

    separate = []
    for variant in expand(spec)[: args.separate]:
        separate.append(_separate(spec, variant, args.out / "separate" / variant.id, say))
    rows = {v["id"]: v for v in record["variants"]}
    summary = {
        "sweep_wall_s": sweep_s,
        "exports": record["exports"],
        "export_s": record["export"]["seconds"],
        "model_load_s": record["timings"].get("model_load_s"),
        "sweep_total_s": record["timings"].get("total_s"),
        "quality_s": sum(v.get("timings", {}).get("quality_s", 0) for v in record["variants"]),
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
