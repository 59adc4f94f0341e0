"""Issue-3 benchmark: heads, layers and hidden width removed from SmolLM2-135M (9 q / 3 kv heads, 30 layers, 576).

Three structures, each compiled from one dense ONNX export (``--cache``, written once) with a mask file:

- **heads**: 3 of 9 query heads per layer, one per GQA group (the head with the smallest o_proj column-block
  norm in each group of 3), so every layer keeps 3 kv heads and uniform groups of 2; o_proj columns masked,
  pass ``remove-heads`` (exact vs the masked model).
- **layers**: 6 of 30 layers by a depth plan (``drop_layers``), chosen by ShortGPT's block influence
  (1 − cos(x_in, x_out), lowest first) on the bundled calibration text; pass ``remove-layers`` (approximate).
- **hidden**: 144 of 576 residual channels (25%), the smallest by embedding-column norm × geometric mean of the
  writers' row norms, zeroed
  in ``model.embed_tokens.weight`` (columns) and every o_proj / down_proj (output rows); pass ``prune-hidden``
  rescales the RMSNorms (exact vs the masked model).

For each: parameters, FLOPs, compile time, ONNX Runtime CPU latency of the masked reference vs the compiled
model side by side at batch 1 and 8, seq 128 (compile's profile, median of ≥ 5 runs), measured vs ideal
speedup (FLOP ratio), verification error vs the masked reference, and quality vs the dense model on the
bundled evaluation text (per-token KL, top-1 agreement, perplexity; ``prune2deploy.quality.lm_quality`` on the
ONNX models).

    python benchmarks/bench_structures.py --out /tmp/bench-structures --cache .p2d-cache --budget 20
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common

MODEL = "smollm2-135m"
HEAD_DIM = 64


def head_masks(module) -> tuple[dict[str, np.ndarray], dict[int, list[int]]]:
    """Per layer, per kv group, the query head with the smallest o_proj column-block norm."""
    config = module.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // kv
    masks, removed = {}, {}
    for index, layer in enumerate(module.model.layers):
        weight = layer.self_attn.o_proj.weight.detach().double().numpy()  # [hidden, heads * d]
        norms = np.linalg.norm(weight.reshape(weight.shape[0], heads, HEAD_DIM), axis=(0, 2))
        drop = [g * per_group + int(np.argmin(norms[g * per_group : (g + 1) * per_group])) for g in range(kv)]
        mask = np.ones(weight.shape, dtype=np.float32)
        for h in drop:
            mask[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        masks[f"model.layers.{index}.self_attn.o_proj.weight"] = mask
        removed[index] = drop
    return masks, removed


def block_influence(module, tokenizer, windows: int, window: int) -> np.ndarray:
    """ShortGPT block influence per layer: mean over tokens of 1 − cos(layer input, layer output)."""
    import torch

    from prune2deploy.pruning.calibration import bundled_text
    from prune2deploy.pruning.criteria import block_importance
    from prune2deploy.quality import text_windows

    ids = tokenizer(bundled_text("calibration.txt"), add_special_tokens=False)["input_ids"]
    batch = torch.from_numpy(text_windows(ids, window, windows))
    layers = module.model.layers
    totals = np.zeros(len(layers))
    handles = []

    def hook(index):
        def run(_mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, (tuple, list)) else out
            totals[index] += float(block_importance(x_in, x_out).mean())

        return run

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(index), with_kwargs=True))
    try:
        with torch.no_grad():
            module(input_ids=batch, attention_mask=torch.ones_like(batch))
    finally:
        for handle in handles:
            handle.remove()
    return totals


def hidden_masks(module, count: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Zeroes ``count`` residual channels: embedding columns and every writer's output rows."""
    embed = module.model.embed_tokens.weight.detach().double().numpy()  # [vocab, hidden]
    logs = [np.log(np.linalg.norm(embed, axis=0))]
    writers = {}
    for index, layer in enumerate(module.model.layers):
        for name, linear in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
            weight = linear.weight.detach().double().numpy()  # [hidden, in]
            writers[f"model.layers.{index}.{name}.weight"] = weight.shape
            logs.append(np.log(np.linalg.norm(weight, axis=1)))
    # embedding-column norm × geometric mean of the writers' row norms (each relative to its tensor's mean)
    logs = [x - x.mean() for x in logs]
    score = logs[0] + np.mean(logs[1:], axis=0)
    channels = sorted(int(c) for c in np.argsort(score, kind="stable")[:count])
    masks = {}
    mask = np.ones(embed.shape, dtype=np.float32)
    mask[:, channels] = 0
    masks["model.embed_tokens.weight"] = mask
    for name, shape in writers.items():
        mask = np.ones(shape, dtype=np.float32)
        mask[channels, :] = 0
        masks[name] = mask
    return masks, channels


def compile_variant(name, dense: Path, out: Path, options, args) -> dict:
    from safetensors.numpy import save_file

    from prune2deploy import api

    if options.get("masks"):
        path = out / f"{name}-masks.safetensors"
        save_file(options["masks"], str(path))
        options["masks"] = path
    from prune2deploy.spec import CompileOptions

    opts = CompileOptions(
        profile_batches=args.batch,
        profile_seqs=args.seq,
        profile_budget_s=args.budget,
        threads=args.threads,
        overwrite=True,
        **options,
    )
    clock = common.Stopwatch()
    result = api.compile(dense, out / name, opts)
    return {"wall_s": clock.seconds, "report": result.report}


def quality(dense: Path, candidate: Path, tokenizer, args) -> dict:
    from prune2deploy.quality import lm_quality

    return lm_quality(
        dense, candidate, tokenizer=tokenizer, window=args.window, max_windows=args.eval_windows
    ).to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-structures"))
    common.add_cache(parser, help="folder for the dense export")
    common.add_profile_grid(parser, budget=20.0)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--drop-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=144)
    parser.add_argument(
        "--only", nargs="+", choices=["heads", "layers", "hidden"], default=["heads", "layers", "hidden"]
    )
    args = parser.parse_args(argv)
    common.quiet_logging()

    from prune2deploy.frontends.hf import load_hf_model

    args.out.mkdir(parents=True, exist_ok=True)
    dense = common.dense_onnx(args.cache, MODEL)
    loaded = load_hf_model(MODEL)
    module, tokenizer = loaded.module, loaded.tokenizer

    variants: dict[str, dict] = {}
    if "heads" in args.only:
        masks, removed = head_masks(module)
        variants["heads"] = {
            "what": "3 of 9 query heads per layer (1 per kv group), o_proj columns masked",
            "plan": {str(k): v for k, v in removed.items()},
            "options": {"masks": masks, "passes": ["remove-heads"]},
        }
    if "layers" in args.only:
        influence = block_influence(module, tokenizer, args.calib_windows, args.window)
        drop = sorted(int(i) for i in np.argsort(influence, kind="stable")[: args.drop_layers])
        variants["layers"] = {
            "what": f"{args.drop_layers} of 30 layers by depth plan (lowest block influence): {drop}",
            "plan": {"layers": drop, "block_influence": [round(float(x), 5) for x in influence]},
            "options": {"passes": ["remove-layers"], "drop_layers": drop},
        }
    if "hidden" in args.only:
        masks, channels = hidden_masks(module, args.hidden)
        variants["hidden"] = {
            "what": f"{args.hidden} of 576 hidden channels zeroed (embedding columns, o_proj/down_proj rows)",
            "plan": {"channels": channels},
            "options": {"masks": masks, "passes": ["prune-hidden"], "drop_hidden": channels},
        }
    del module

    results = {}
    for name, variant in variants.items():
        print(f"compiling {name}: {variant['what']}", file=sys.stderr)
        compiled = compile_variant(name, dense, args.out, dict(variant["options"]), args)
        print(f"  quality of {name} vs dense", file=sys.stderr)
        q = quality(dense, args.out / name / "model.onnx", tokenizer, args)
        results[name] = {"what": variant["what"], "plan": variant["plan"], "quality": q, **compiled}
        (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))

    if "layers" in results:  # the usual fixed choice, for comparison (quality only, no compile)
        from prune2deploy.frontends.onnx import load_onnx, save_onnx
        from prune2deploy.passes.remove_layers import RemoveLayersPass

        model = load_onnx(dense)
        RemoveLayersPass(layers=list(range(20, 26)))(model)
        fixed = args.out / "layers-20-25.onnx"
        save_onnx(model, fixed)
        del model
        results["layers"]["quality_layers_20_25"] = quality(dense, fixed, tokenizer, args)
        fixed.unlink()

    threads = args.threads or "ORT default"
    print(f"\nSmolLM2-135M, ONNX Runtime CPU, batch {args.batch}, seq {args.seq}, threads {threads}")
    print(
        "\n| structure | params (M) | GFLOPs b1 s128 | compile s (load / passes / verify) | error vs masked (max rel) |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rep = r["report"]
        ref, new = rep["model"]["reference"], rep["model"]["compiled"]
        t = rep["timings"]
        worst = max(o["max_rel"] for o in rep["verification"]["outputs"].values())
        exact = all(p.get("exact", True) for p in rep["passes"])
        print(
            f"| {name}: {r['what']} | {ref['params'] / 1e6:.2f} → {new['params'] / 1e6:.2f} "
            f"| {ref['flops'] / 1e9:.2f} → {new['flops'] / 1e9:.2f} "
            f"| {t['load_and_export_s'] + t['passes_s'] + t['verify_s']:.1f} "
            f"({t['load_and_export_s']:.1f} / {t['passes_s']:.1f} / {t['verify_s']:.1f}) "
            f"| {worst:.2e} ({'exact' if exact else 'approximate'}) |"
        )
    header = ["structure", "batch", "seq", "reference ms", "compiled ms", "runs", "measured speedup", "ideal"]
    rows = [[name, *row] for name, r in results.items() for row in common.speedup_rows(r["report"])]
    print("\n" + common.markdown_table([*header, "% of ideal"], rows))
    print(
        f"\nQuality vs the dense model (bundled evaluation text, {args.eval_windows} windows × {args.window} tokens):"
    )
    print("\n| structure | KL mean (nats/token) | KL max | top-1 agreement | perplexity dense → pruned |")
    print("|---|---|---|---|---|")
    rows = [(name, r["quality"]) for name, r in results.items()]
    if "layers" in results and "quality_layers_20_25" in results["layers"]:
        rows.append(("layers 20-25 (fixed plan, for comparison)", results["layers"]["quality_layers_20_25"]))
    for name, q in rows:
        print(
            f"| {name} | {q['kl_mean']:.4f} | {q['kl_max']:.3f} | {q['top1_agreement']:.3f} "
            f"| {q['ppl_reference']:.2f} → {q['ppl_candidate']:.2f} |"
        )
    (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
