"""Issue-4 benchmark: GQA / MQA regrouping (``regroup-gqa``) — KV-cache size, decode latency and quality.

SmolLM2-135M (9 query heads over 3 kv heads, 30 layers, head dim 64): G kv heads per layer, G ∈ {9, 3, 1}
(G must divide 9; 9 is the exact MHA expansion, 3 is the model as trained, 1 is MQA).

- KV-cache bytes per token from the exported KV-cache graph (``export_decoder``) after ``RegroupGQAPass``
  (``kv_cache_bytes_per_token``, read from the graph's ``present.*`` outputs).
- Decode latency per token (``generate.decode_latency``, ONNX Runtime CPU) at past length 512 and 2048,
  batch 1 and 8, for G = 3 vs G = 1, measured one after the other at each point.
- Quality vs the original on the bundled evaluation text (no-cache graph, ``quality.lm_quality``): per-token
  KL, top-1 agreement, perplexity, for mean pooling vs "first" and adjacent vs similarity grouping.

MiniLM-L6 (12 heads, 6 layers, head dim 32; MHA → GQA), G ∈ {12, 6, 4, 3, 2, 1}: K/V bytes per token by
formula (2 × layers × G × head dim × 4 bytes; an encoder keeps no cache, this is what one would hold) and
cosine similarity of mean-pooled sentence embeddings vs the original (``quality.encoder_quality``) for
mean vs first and adjacent vs similarity.

    python benchmarks/bench_gqa.py --cache .p2d-cache --out /tmp/bench-gqa --threads 2
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

SMOL = "smollm2-135m"
MINILM = "minilm-l6"


def regroup(proto_bytes: bytes, groups: int, grouping: str = "adjacent", method: str = "mean") -> tuple[bytes, dict]:
    """Regrouped copy of a serialized model, as compile runs a pass (un-share, pass, re-share, clean up)."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from prune2deploy.passes.regroup_gqa import RegroupGQAPass
    from prune2deploy.passes.sharing import reshare_initializers, unshare_initializers

    model = ir.from_proto(onnx.ModelProto.FromString(proto_bytes))
    unshare_initializers(model)
    result = RegroupGQAPass(groups, grouping=grouping, method=method)(model)
    reshare_initializers(model)
    RemoveUnusedNodesPass()(model)
    record = result.record
    blocks = record["per_block"].values()
    summary = {
        "blocks_changed": record["blocks_changed"],
        "kv_heads_after": record["kv_heads_after"],
        "k_error": float(np.mean([b["k_weight_rel_error"] for b in blocks])) if blocks else 0.0,
        "v_error": float(np.mean([b["v_weight_rel_error"] for b in blocks])) if blocks else 0.0,
        "permuted_blocks": sum(bool(b.get("permuted")) for b in blocks),
        "skipped": dict(result.refused),  # where regrouping was refused, and why
    }
    return ir.to_proto(model).SerializeToString(), summary


def smollm2(args, results: dict) -> None:
    from prune2deploy.engines.onnxruntime import make_session
    from prune2deploy.frontends.decoder import kv_cache_bytes_per_token
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.generate import decode_latency
    from prune2deploy.quality import lm_quality

    # KV-cache graph: bytes per token and decode latency
    kv_bytes = common.kv_onnx(args.cache, SMOL).read_bytes()
    sessions, cache_rows = {}, []
    for groups in args.smol_groups:
        regrouped, summary = regroup(kv_bytes, groups) if groups != 3 else (kv_bytes, {})
        session = make_session(regrouped, threads=args.threads)
        cache_rows.append({"G": groups, "bytes_per_token": kv_cache_bytes_per_token(session), **summary})
        print(f"SmolLM2 KV graph G={groups}: {cache_rows[-1]['bytes_per_token']} bytes/token", file=sys.stderr)
        if groups in args.decode_groups:
            sessions[groups] = session
        del regrouped
    del kv_bytes
    results["smollm2_cache"] = cache_rows
    decode = []
    for batch in args.batch:
        for past in args.past:
            for groups, session in sessions.items():
                result = decode_latency(
                    session, past_length=past, batch=batch, warmup=args.warmup, repeats=args.repeats
                )
                decode.append({"G": groups, **result.to_dict()})
                print(f"  decode G={groups} b{batch} past {past}: {result.median_ms:.1f} ms", file=sys.stderr)
    results["smollm2_decode"] = decode
    sessions.clear()

    # quality on the no-cache graph
    dense_bytes = common.dense_onnx(args.cache, SMOL).read_bytes()
    tokenizer = load_hf_model(SMOL).tokenizer
    reference = make_session(dense_bytes)
    rows = []
    for groups in args.smol_groups:
        for grouping in ("adjacent", "similarity"):
            for method in ("mean", "first"):
                candidate, summary = regroup(dense_bytes, groups, grouping, method)
                q = lm_quality(
                    reference, candidate, tokenizer=tokenizer, window=args.window, max_windows=args.eval_windows
                )
                rows.append({"G": groups, "grouping": grouping, "method": method, **summary, **q.to_dict()})
                print(f"  quality G={groups} {grouping} {method}: KL {q.kl_mean:.4f}", file=sys.stderr)
                results["smollm2_quality"] = rows


def minilm(args, results: dict) -> None:
    from prune2deploy.engines.onnxruntime import make_session
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.quality import encoder_quality

    dense_bytes = common.dense_onnx(args.cache, MINILM).read_bytes()
    loaded = load_hf_model(MINILM)
    config, tokenizer = loaded.module.config, loaded.tokenizer
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads
    reference = make_session(dense_bytes)
    rows = []
    for groups in args.minilm_groups:
        for grouping in ("adjacent", "similarity"):
            for method in ("mean", "first"):
                candidate, summary = regroup(dense_bytes, groups, grouping, method)
                q = encoder_quality(reference, candidate, tokenizer=tokenizer, max_sentences=args.sentences)
                rows.append(
                    {
                        "G": groups,
                        "grouping": grouping,
                        "method": method,
                        "kv_bytes_per_token": 2 * layers * groups * head_dim * 4,
                        **summary,
                        **q.to_dict(),
                    }
                )
                print(f"  MiniLM G={groups} {grouping} {method}: cos {q.cosine_mean:.5f}", file=sys.stderr)
    results["minilm"] = {"layers": layers, "heads": heads, "head_dim": head_dim, "rows": rows}


def print_tables(args, results: dict) -> None:
    if "smollm2_cache" in results:
        print("\nSmolLM2-135M KV cache (fp32, from the regrouped KV-cache graph):\n")
        base = next((r["bytes_per_token"] for r in results["smollm2_cache"] if r["G"] == 3), None)
        rows = []
        for r in results["smollm2_cache"]:
            ratio = f"{r['bytes_per_token'] / base:.2f}x" if base else "–"
            rows.append([r["G"], f"{r['bytes_per_token']:,}", ratio, r.get("blocks_changed", 0)])
        print(common.markdown_table(["G (kv heads / layer)", "bytes per token", "vs G = 3", "regrouped blocks"], rows))
    if results.get("smollm2_decode"):
        threads = args.threads or "ORT default"
        print(f"\nSmolLM2-135M decode, ORT CPU, {threads} threads, median of {args.repeats} steps (ms per token):\n")
        groups = sorted({r["G"] for r in results["smollm2_decode"]}, reverse=True)
        head = " | ".join(f"G = {g} ms (p10–p90)" for g in groups)
        print(f"| batch | past | {head} | KV read G = {groups[0]} → G = {groups[-1]} (MB) | speedup |")
        print("|---|---|" + "---|" * len(groups) + "---|---|")
        table = {(r["G"], r["batch"], r["past_length"]): r for r in results["smollm2_decode"]}
        for batch in args.batch:
            for past in args.past:
                cells = [table[(g, batch, past)] for g in groups]
                text = " | ".join(f"{c['median_ms']:.1f} ({c['p10_ms']:.1f}–{c['p90_ms']:.1f})" for c in cells)
                print(
                    f"| {batch} | {past} | {text} | {cells[0]['kv_cache_bytes'] / 1e6:.1f} → "
                    f"{cells[-1]['kv_cache_bytes'] / 1e6:.1f} | {cells[0]['median_ms'] / cells[-1]['median_ms']:.2f}x |"
                )
    if results.get("smollm2_quality"):
        print(
            f"\nSmolLM2-135M quality vs the original (evaluation text, {args.eval_windows} windows × {args.window}):\n"
        )
        print("| G | grouping | pooling | K / V weight error | KL mean (nats/token) | top-1 agreement | perplexity |")
        print("|---|---|---|---|---|---|---|")
        for r in results["smollm2_quality"]:
            print(
                f"| {r['G']} | {r['grouping']} | {r['method']} | {r['k_error']:.3f} / {r['v_error']:.3f} "
                f"| {r['kl_mean']:.4f} | {r['top1_agreement']:.3f} "
                f"| {r['ppl_reference']:.2f} → {r['ppl_candidate']:.2f} |"
            )
    if results.get("minilm"):
        m = results["minilm"]
        print(
            f"\nMiniLM-L6 (MHA, {m['heads']} heads × {m['head_dim']}, {m['layers']} layers): K/V bytes per token "
            f"(fp32, formula) and cosine similarity of mean-pooled embeddings vs the original "
            f"({m['rows'][0]['sentences']} sentences):\n"
        )
        print(
            "| G | K/V bytes per token | adjacent + mean | adjacent + first | similarity + mean | similarity + first |"
        )
        print("|---|---|---|---|---|---|")
        table = {(r["G"], r["grouping"], r["method"]): r for r in m["rows"]}
        for g in args.minilm_groups:
            cells = []
            for grouping in ("adjacent", "similarity"):
                for method in ("mean", "first"):
                    r = table[(g, grouping, method)]
                    cells.append(f"{r['cosine_mean']:.4f} (min {r['cosine_min']:.3f})")
            print(f"| {g} | {table[(g, 'adjacent', 'mean')]['kv_bytes_per_token']:,} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    common.add_cache(parser)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-gqa"))
    parser.add_argument("--smol-groups", type=int, nargs="+", default=[9, 3, 1])
    parser.add_argument("--decode-groups", type=int, nargs="+", default=[3, 1])
    parser.add_argument("--minilm-groups", type=int, nargs="+", default=[12, 6, 4, 3, 2, 1])
    parser.add_argument("--past", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    common.add_threads(parser)
    common.add_timing(parser, repeats=10, warmup=2)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--only", nargs="+", choices=["smollm2", "minilm"], default=["smollm2", "minilm"])
    args = parser.parse_args(argv)
    common.quiet_logging()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    clock = common.Stopwatch()
    try:
        if "minilm" in args.only:
            minilm(args, results)
        if "smollm2" in args.only:
            smollm2(args, results)
    finally:
        (args.out / "bench_gqa.json").write_text(json.dumps(results, indent=1, default=str))
    print_tables(args, results)
    print(f"\n(total {clock.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
