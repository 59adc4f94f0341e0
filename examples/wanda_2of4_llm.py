"""Wanda 2:4 on an LLM: score SmolLM2-135M with Wanda, keep 2 of every 4 weights, compile, measure, predict.

The workflow: ``api.prune`` scores every Linear of the decoder blocks with Wanda (|W| × ‖X‖ on calibration
text) and keeps the best 2 of every 4 weights along the input dimension (``masks.safetensors`` +
``plan.yaml``). ``api.compile`` applies the masks, runs the default passes plus ``sparsify-2:4`` (which
checks every eligible MatMul weight is 2:4 and tags it for the engine) and verifies against the masked
model. Then the example measures what users ask about:

- quality: KL divergence, top-1 agreement and perplexity of the 2:4 model against the *dense* model on the
  bundled evaluation text (2:4 is approximate: this is its error, not a pass/fail);
- CPU latency: dense vs 2:4 side by side. The honest caveat: **on CPU, 2:4 sparsity gives no speedup** —
  ONNX Runtime has no sparse kernels, a 2:4 matrix is a dense matrix with zeros in it;
- what 2:4 buys per GPU: the cost model's predicted TensorRT fp16 latency dense vs 2:4 for GPUs with and
  without sparse tensor cores (Ampere and later have them; Turing's T4 does not).

``--quick`` runs the same steps on a tiny random-weight Llama with SmolLM2's head layout (built in code,
see ``_common.py``) with little calibration and no CPU timing, so CI can run it in well under a minute;
its numbers say nothing about SmolLM2.

Run: ``python examples/wanda_2of4_llm.py --out build/wanda24`` (20 min, 5.5 GB peak RSS on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this file

from _common import llm_source, load_tokenizer, say

from prune2deploy import api
from prune2deploy.quality import lm_quality

#: Targets of the prediction: two Ampere data-centre GPUs, Hopper, Ada, and Turing (no sparse tensor cores).
GPUS = ["a100", "h100", "l4", "jetson-orin-nano", "t4"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/wanda_2of4"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny model, little calibration, no timing (CI)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = llm_source(args.quick, out)
    samples, seq_len, seq = (4, 32, 32) if args.quick else (24, 128, 128)

    print(f"1. Wanda 2:4 masks for {source}")
    pruned = api.prune(
        source, out / "pruned", criterion="wanda", structures={}, nm=(2, 4), num_samples=samples, seq_len=seq_len,
        overwrite=True,
    )  # fmt: skip
    print(f"   {pruned.summary['zeroed_weights']:,} weights zeroed in {pruned.summary['masked_tensors']} tensors")
    print(f"   → {pruned.masks_path}, {pruned.plan_path}")

    print("2. dense baseline (no masks; the export is cached and reused by step 3)")
    timing = {"profile": not args.quick, "profile_batches": [1], "profile_seqs": [seq], "profile_budget_s": 10.0}
    dense = api.compile(source, out / "dense", api.CompileOptions(overwrite=True, genai=False, **timing), progress=say)

    print("3. compile the masked model with sparsify-2:4")
    options = api.CompileOptions(plan=pruned.plan_path, overwrite=True, genai=False, gpus=GPUS, **timing)
    options = options.replace(passes=[*options.passes, "sparsify-2:4"])
    compiled = api.compile(source, out / "compiled", options, progress=say)
    report = compiled.report
    record = next(p["record"] for p in report["passes"] if p["pass"] == "sparsify-2:4")
    print(f"   {api.verdict_line(report['verification'])}")
    print(
        f"   2:4 weights: {record['already_nm'] + record['made_nm']} of {record['eligible']} eligible MatMul weights "
        f"({record['made_nm']} changed by the pass); {record['sparse_flops_fraction']:.0%} of the FLOPs can use "
        "sparse tensor cores"
    )

    print("4. quality against the dense model (bundled evaluation text)")
    quality = lm_quality(
        dense.out_dir / "model.onnx", compiled.out_dir / "model.onnx", tokenizer=load_tokenizer(source),
        window=seq_len, max_windows=4 if args.quick else 16,
    )  # fmt: skip
    print(
        f"   KL {quality.kl_mean:.4f} nats/token, top-1 agreement {quality.top1_agreement:.1%}, perplexity "
        f"{quality.ppl_reference:.2f} (dense) → {quality.ppl_candidate:.2f} (2:4) over {quality.tokens} tokens"
    )

    print("5. CPU latency, dense vs 2:4 (ONNX Runtime)")
    cpu = None
    if args.quick:
        print("   skipped with --quick")
    else:
        cpu = api.profile(
            compiled.out_dir / "model.onnx", against=dense.out_dir / "model.onnx", batches=[1], seqs=[seq], budget_s=10
        )
        latency = {r["model"]: r for r in cpu if r["kind"] == "latency"}
        ratio = next(r["measured"] for r in cpu if r["kind"] == "speedup")
        print(
            f"   batch 1, seq {seq}: dense {latency['reference']['median_ms']:.2f} ms "
            f"(p90 {latency['reference']['p90_ms']:.2f}), 2:4 {latency['compiled']['median_ms']:.2f} ms "
            f"(p90 {latency['compiled']['p90_ms']:.2f}): {ratio:.2f}× (medians of {latency['compiled']['runs']} runs)"
        )
    print(
        "   caveat: on CPU, 2:4 sparsity gives no speedup — ONNX Runtime has no sparse kernels; the zeros are "
        "multiplied like any other number. The speed comes from sparse tensor cores (TensorRT, fp16/int8)."
    )

    print("6. what 2:4 buys per GPU (predicted, TensorRT fp16, dense vs 2:4)")
    batch, pseq = (4, 32) if args.quick else (8, 512)  # sparse tactics need more than 64 rows (batch x seq)
    predictions = api.predict(
        compiled.out_dir / "model.onnx", against=dense.out_dir / "model.onnx", gpus=GPUS, precision="fp16",
        engine="tensorrt", batch=batch, seq=pseq,
    )  # fmt: skip
    for row in predictions:
        sparse = "sparse tensor cores" if row["sparse_used"] else (row.get("cause") or "dense kernels")
        print(
            f"   {row['gpu']:<22} {row['reference_ms']:8.3f} ms → {row['compiled_ms']:8.3f} ms  "
            f"{row['speedup']:.2f}×  ({sparse}; batch {batch}, seq {pseq}, bound: {row['binding']})"
        )
    summary = {
        "source": source,
        "verification": report["verification"]["status"],
        "sparsify": {k: record[k] for k in ("eligible", "already_nm", "made_nm", "sparse_flops_fraction")},
        "quality_vs_dense": quality.to_dict(),
        "cpu_profile": cpu,
        "predictions": predictions,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\noutputs: {compiled.out_dir}/model.onnx (report.json, report.html, manifest.json), {out}/summary.json")
    print(f"deploy: prune2deploy compile {source} --plan {pruned.plan_path} --out build/trt --sparse-2-4 "
          "--engine tensorrt --precision fp16   (on an Ampere or later GPU)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
