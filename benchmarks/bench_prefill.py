"""Prefill latency on ONNX Runtime CPU: our compile (unfused / fused) vs the same pruning sliced by hand.

Issue 13's target: the default compile of SmolLM2-135M with 50% of every MLP's neurons masked (by
magnitude) should take ≤ 0.90× the prefill latency of the same pruning sliced by hand in torch and exported
plainly with the same exporter. Measured side by side in one run (``profiling.measure.compare_models``:
the models take turns at every grid point, same feeds, same threads), batch 1 and 8, seq 128:

  compiled          ``api.compile`` with ``portable=True`` (the structural passes, standard ONNX ops)
  compiled-fused    ``api.compile`` with the defaults (``fuse-ort``: onnxscript's ORT fusions after pruning)
  hand-sliced       ``outputs.slice.slice_causal_lm`` on the masked torch model, exported by
                    ``frontends.torch.export_module`` (the exporter compile uses)
  hand-sliced-ort   (``--ort-optimizer``) onnxruntime.transformers' optimizer on hand-sliced

    PYTHONPATH=. python benchmarks/bench_prefill.py --out /tmp/bench-prefill --ort-optimizer               # build
    PYTHONPATH=. python benchmarks/bench_prefill.py --out /tmp/bench-prefill --ort-optimizer --time-only --threads 2

Building and timing run in separate processes: the compiles and the torch export leave gigabytes behind
that would otherwise sit beside the four timed sessions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common

MODEL = "smollm2-135m"


def compile_variant(masks: Path, out: Path, fuse: bool) -> tuple[Path, dict]:
    """``api.compile`` of the bundled model with ``masks`` (no profile, no genai/): model.onnx and its record."""
    from prune2deploy import api
    from prune2deploy.spec import CompileOptions

    # The default compile for ONNX Runtime fuses; portable=True is the unfused graph.
    options = CompileOptions(masks=masks, portable=not fuse, profile=False, genai=False, overwrite=True)
    start = time.perf_counter()
    result = api.compile(MODEL, out, options)
    record = {
        "compile_s": time.perf_counter() - start,
        "verification": {k: result.report["verification"].get(k) for k in ("passed", "worst", "exact")},
        "params": result.report["model"]["compiled"]["params"],
    }
    fused = next((p for p in result.report["passes"] if p["pass"] == "fuse-ort"), None)
    if fused:
        record["fuse_ort"] = {
            "modified": fused.get("modified"),
            **fused.get("record", {}),
            "refused": fused.get("refused"),
        }
    return out / "model.onnx", record


def hand_sliced(masks_np: dict, out: Path) -> tuple[Path, dict]:
    """The same pruning sliced in torch and exported plainly (same exporter and export shape as compile)."""
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.frontends.masks import apply_masks_torch
    from prune2deploy.frontends.onnx import save_onnx
    from prune2deploy.frontends.torch import export_module, hf_export_spec
    from prune2deploy.outputs.slice import slice_causal_lm

    loaded = load_hf_model(MODEL)
    sliced = slice_causal_lm(apply_masks_torch(loaded.module, masks_np))
    module = sliced.module
    module.config.use_cache = False
    spec = hf_export_spec("causal-lm", batch=2, seq=8, vocab_size=module.config.vocab_size)
    start = time.perf_counter()
    path = out / "hand-sliced.onnx"
    save_onnx(export_module(module, spec), path)
    params = sum(p.numel() for p in module.parameters())
    return path, {
        "export_s": time.perf_counter() - start,
        "params": int(params),
        "widths": sliced.summary()["layers"][0],
    }


def ort_optimized(path: Path, out: Path, config) -> tuple[Path | None, dict]:
    """onnxruntime.transformers' optimizer (model_type gpt2: its generic decoder fusions) on ``path``."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        head_dim = config.hidden_size // config.num_attention_heads
        model = optimize_model(
            str(path), model_type="gpt2", num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
            opt_level=1, use_gpu=False,
        )  # fmt: skip
        target = out / "hand-sliced-ort.onnx"
        model.save_model_to_file(str(target))
        return target, {"fused_operators": model.get_fused_operator_statistics(), "head_dim": head_dim}
    except Exception as exc:  # optional peer: record why it is missing
        return None, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/bench-prefill"))
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of every MLP's neurons masked")
    parser.add_argument("--ort-optimizer", action="store_true", help="also time ORT's transformers optimizer")
    parser.add_argument("--time-only", action="store_true", help="time the graphs an earlier run built in --out")
    common.add_profile_grid(parser, budget=20.0)
    args = parser.parse_args(argv)
    common.quiet_logging("prune2deploy", "bench_prefill")
    args.out.mkdir(parents=True, exist_ok=True)

    from safetensors.numpy import save_file

    from prune2deploy.demo import mlp_neuron_masks
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.profiling.measure import compare_models

    results: dict = {"model": MODEL, "ratio": args.ratio, **common.machine()}
    models: dict[str, Path] = {
        "compiled": args.out / "compiled" / "model.onnx",
        "compiled-fused": args.out / "fused" / "model.onnx",
        "hand-sliced": args.out / "hand-sliced.onnx",
    }
    if args.ort_optimizer:
        models["hand-sliced-ort"] = args.out / "hand-sliced-ort.onnx"
    if args.time_only:
        missing = [str(p) for p in models.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"--time-only: {', '.join(missing)} missing; run without --time-only first")
        results["built"] = (
            json.loads((args.out / "build.json").read_text()) if (args.out / "build.json").is_file() else {}
        )
    else:
        dense = load_hf_model(MODEL).module
        masks = mlp_neuron_masks(dense, args.ratio)
        config = dense.config
        del dense
        mask_path = args.out / "masks.safetensors"
        save_file(masks, str(mask_path))
        built: dict = {}
        _, built["compiled"] = compile_variant(mask_path, args.out / "compiled", fuse=False)
        _, built["compiled-fused"] = compile_variant(mask_path, args.out / "fused", fuse=True)
        _, built["hand-sliced"] = hand_sliced(masks, args.out)
        if args.ort_optimizer:
            path, built["hand-sliced-ort"] = ort_optimized(models["hand-sliced"], args.out, config)
            if path is None:
                del models["hand-sliced-ort"]
        (args.out / "build.json").write_text(json.dumps(built, indent=1, default=str))
        results["built"] = built
        print(json.dumps(built, indent=1, default=str), file=sys.stderr)
        print("built; time in a fresh process to keep this one's memory out: --time-only", file=sys.stderr)
        return 0
    grid = [(b, s) for b in args.batch for s in args.seq]
    rows = compare_models(
        models, grid, threads=args.threads, reference="hand-sliced", budget_s=args.budget, min_runs=10
    )
    results["rows"] = rows
    latency = {(r["model"], r["batch"], r["seq"]): r for r in rows if r["kind"] == "latency"}
    table = []
    for batch, seq in grid:
        base = latency[("hand-sliced", batch, seq)]["median_ms"]
        for name in models:
            r = latency[(name, batch, seq)]
            table.append([str(batch), str(seq), name, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
                          f"{r['p90_ms']:.1f}", str(r["runs"]), f"{r['median_ms'] / base:.3f}x"])  # fmt: skip
    results["table"] = common.markdown_table(
        ["batch", "seq", "model", "median ms", "min ms", "p90 ms", "runs", "latency / hand-sliced"], table
    )
    print(results["table"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
