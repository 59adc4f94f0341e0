"""Minitron-style width pruning of an LLM: activation importance for MLP neurons and attention heads, GQA kept.

The workflow: ``api.prune`` with ``criterion="minitron"`` runs calibration text through SmolLM2-135M and
scores each MLP neuron by its activation and each query head by the norm of its attention output
(Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"). Heads are
chosen with ``head_grouping="uniform"``: the same number of query heads is removed from every kv group, so
grouped-query attention stays grouped (SmolLM2: 9 query heads over 3 kv heads → 6 over 3). ``api.compile``
then removes the masked neurons and heads physically (exact: verified against the masked model), writes
``genai/`` (an onnxruntime-genai package whose decoder has the new head counts and a KV cache), and
``api.generate`` produces text from it.

Minitron then distils the pruned model to recover quality; that training step is outside a compiler and
outside this example, so the text of the pruned, undistilled model is worse than the dense model's.

``--quick`` runs the same steps on a tiny random-weight Llama with SmolLM2's head layout (built in code,
see ``_common.py``) with little calibration and no timing; its text is gibberish (random weights).

Run: ``python examples/minitron_width.py --out build/minitron`` (5 min 21 s, 5.2 GB peak RSS on a busy 2-core
machine, with the dense export already cached).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this file

from _common import llm_source, say

from prune2deploy import api

PROMPT = "The capital of France is"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/minitron_width"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny model, little calibration, no timing (CI)")
    parser.add_argument("--mlp", type=float, default=0.25, help="fraction of MLP neurons to remove")
    parser.add_argument("--heads", type=float, default=1 / 3, help="fraction of query heads to remove")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = llm_source(args.quick, out)
    samples, seq_len, new_tokens = (4, 32, 12) if args.quick else (24, 128, 32)

    print(f"1. Minitron activation importance for {source}: -{args.mlp:.0%} MLP neurons, -{args.heads:.0%} heads")
    pruned = api.prune(
        source, out / "pruned", criterion="minitron", structures={"mlp": args.mlp, "heads": args.heads},
        head_grouping="uniform", num_samples=samples, seq_len=seq_len, overwrite=True,
    )  # fmt: skip
    print(f"   → {pruned.masks_path}, {pruned.plan_path} ({pruned.summary['masked_tensors']} masked tensors)")

    print("2. compile: remove the neurons and heads, verify, write genai/")
    options = api.CompileOptions(
        plan=pruned.plan_path, overwrite=True, profile=not args.quick, profile_batches=[1], profile_seqs=[128]
    )
    compiled = api.compile(source, out / "compiled", options, progress=say)
    report = compiled.report
    heads = next(p["record"] for p in report["passes"] if p["pass"] == "remove-heads")
    channels = next(p["record"] for p in report["passes"] if p["pass"] == "remove-channels")
    ref, new = report["model"]["reference"], report["model"]["compiled"]
    print(f"   {api.verdict_line(report['verification'])}")
    print(f"   params {ref['params']:,} → {new['params']:,}; MLP channels removed: {channels['channels_removed']}")
    print(f"   heads removed: {heads.get('heads_removed')}; kv heads removed: {heads.get('kv_heads_removed')}")
    genai = report["genai"]
    print(f"   genai/: per-layer [query heads, kv heads] {genai['per_layer_heads'][:3]}…, "
          f"intermediate {genai['per_layer_intermediate'][:3]}…")  # fmt: skip
    for row in report.get("speedup") or []:
        print(
            f"   CPU prefill batch {row['batch']} seq {row['seq']}: {row['measured']:.2f}×"
            f" (95% CI {row['ci'][0]:.2f}–{row['ci'][1]:.2f}; ideal {row['ideal_speedup']:.2f}×)"
        )

    print(f"3. generate from {compiled.out_dir}/genai")
    result = api.generate(compiled.out_dir, args.prompt, max_new_tokens=new_tokens)
    print(f"   {args.prompt!r} → {result.text!r}")
    print(f"   {len(result.new_tokens)} tokens at {result.tokens_per_s:.1f} tokens/s ({result.engine})")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "source": source,
                "verification": report["verification"]["status"],
                "params": [ref["params"], new["params"]],
                "per_layer_heads": genai["per_layer_heads"],
                "generation": result.to_dict(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\noutputs: {compiled.out_dir}/model.onnx, {compiled.out_dir}/genai/ (report.json, report.html)")
    print(f'run it again: prune2deploy generate {compiled.out_dir} "{args.prompt}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
