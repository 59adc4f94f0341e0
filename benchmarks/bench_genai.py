"""SmolLM2-135M through genai/: greedy tokens vs transformers on the masked model, tokens/s vs genai's builder.

Side by side in one run (2 cores, batch 1, 64 new tokens, onnxruntime-genai CPU; ``--rounds`` rounds in
which every folder generates once, in turn; median, min and max over the rounds):
  ours    — genai/ built by prune2deploy from the masked model (50% MLP neurons by magnitude + the first
            query head of every GQA group masked on o_proj), and a non-uniform variant (MLP widths per layer)
  builder — onnxruntime-genai's model builder on the same pruning written as an HF folder (our hf/ output,
            i.e. the model sliced by hand), and on the dense model.

    PYTHONPATH=. python benchmarks/bench_genai.py --out build/bench-genai
    PYTHONPATH=. python benchmarks/bench_genai.py --out build/bench-genai --time-only   # re-time only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prune2deploy.demo import mlp_neuron_masks
from prune2deploy.frontends.hf import load_hf_model
from prune2deploy.frontends.masks import apply_masks_torch
from prune2deploy.generate import genai_tokens
from prune2deploy.outputs.genai import write_genai_folder
from prune2deploy.outputs.hf import write_hf_checkpoint
from prune2deploy.outputs.slice import slice_causal_lm

PROMPT = "The three most important things to know about the history of the Roman Empire are"


def head_masks(module, first_of_group: bool = True) -> dict[str, np.ndarray]:
    cfg = module.config
    d = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    masks = {}
    for i, layer in enumerate(module.model.layers):
        o = np.ones(tuple(layer.self_attn.o_proj.weight.shape), dtype=np.float32)
        for g in range(cfg.num_key_value_heads):
            h = g * group
            o[:, h * d : (h + 1) * d] = 0
        masks[f"model.layers.{i}.self_attn.o_proj.weight"] = o
    return masks


def nonuniform_mlp_masks(module) -> dict[str, np.ndarray]:
    masks = {}
    for i, _ in enumerate(module.model.layers):
        ratio = (0.3, 0.5, 0.7)[i % 3]
        layer_masks = mlp_neuron_masks(module, ratio)
        masks.update({k: v for k, v in layer_masks.items() if k.startswith(f"model.layers.{i}.")})
    return masks


def hf_greedy(module, ids, n):
    with torch.no_grad():
        out = module.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def tok_s(folders: dict[str, Path], ids, n=64, rounds=5) -> dict[str, dict]:
    """tokens/s of each folder, side by side: every round runs each folder once, in turn (load shifts on a
    shared machine hit all of them alike); median, min and max over the rounds."""
    for folder in folders.values():
        genai_tokens(folder, ids, 8)  # warm-up (session creation, allocator)
    samples: dict[str, list[float]] = {name: [] for name in folders}
    for _ in range(rounds):
        for name, folder in folders.items():
            samples[name].append(genai_tokens(folder, ids, n, min_new_tokens=n)[1])
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v} for name, v in samples.items()
    }


def builder(hf: Path, out: Path, precision: str = "fp32") -> float:
    """Seconds onnxruntime-genai's model builder takes to write ``out`` from the HF folder ``hf`` (CPU);
    raises ``CalledProcessError`` (its ``stderr`` says why) when the builder fails."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
                    precision, "-e", "cpu"], check=True, capture_output=True, text=True)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("build/bench-genai"))
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every folder once)")
    parser.add_argument(
        "--time-only", action="store_true", help="reuse the folders and results.json of an earlier run in --out"
    )
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.time_only:
        results = json.loads((out / "results.json").read_text())
        ids = load_hf_model("smollm2-135m").tokenizer(PROMPT)["input_ids"]
        return report(results, out, ids, args.rounds)
    loaded = load_hf_model("smollm2-135m")
    dense, tokenizer = loaded.module, loaded.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    results: dict = {"prompt_tokens": len(ids)}

    masks = {**mlp_neuron_masks(dense, 0.5), **head_masks(dense)}
    masked = apply_masks_torch(dense, masks)
    sliced = slice_causal_lm(masked)
    results["uniform_widths"] = sliced.summary()["layers"][0]
    section = write_genai_folder(sliced, tokenizer, out / "ours", reference=masked)
    results["ours_check"] = section["check"]
    want = hf_greedy(masked, ids, 24)
    got = genai_tokens(out / "ours", ids, 24, min_new_tokens=24)[0]
    results["ours_tokens_equal_24"] = sum(a == b for a, b in zip(got, want, strict=True))
    hf = write_hf_checkpoint(sliced, tokenizer, out / "hf", reference=masked)
    results["hf_check"] = hf.get("check")
    write_hf_checkpoint(slice_causal_lm(dense), tokenizer, out / "dense_hf")
    results["builder_s"] = {"pruned": builder(out / "hf", out / "builder_pruned"),
                            "dense": builder(out / "dense_hf", out / "builder_dense")}  # fmt: skip
    results["builder_pruned_tokens_equal_24"] = sum(
        a == b for a, b in zip(genai_tokens(out / "builder_pruned", ids, 24, min_new_tokens=24)[0], want, strict=True)
    )

    nu_masks = {**nonuniform_mlp_masks(dense), **head_masks(dense)}
    nu_masked = apply_masks_torch(dense, nu_masks)
    nu_sliced = slice_causal_lm(nu_masked)
    results["nonuniform_intermediate"] = sorted({w.intermediate for w in nu_sliced.layers})
    nu = write_genai_folder(nu_sliced, tokenizer, out / "ours_nonuniform", reference=nu_masked)
    results["nonuniform_check"] = nu["check"]
    nu_want = hf_greedy(nu_masked, ids, 24)
    results["nonuniform_tokens_equal_24"] = sum(
        a == b
        for a, b in zip(genai_tokens(out / "ours_nonuniform", ids, 24, min_new_tokens=24)[0], nu_want, strict=True)
    )
    results["nonuniform_hf"] = write_hf_checkpoint(nu_sliced, tokenizer, out / "hf_nonuniform").get("reason")

    report(results, out, ids, args.rounds)


def report(results: dict, out: Path, ids, rounds: int) -> None:
    names = ("builder_dense", "builder_pruned", "ours", "ours_nonuniform")
    rates = tok_s({name: out / name for name in names}, ids, rounds=rounds)
    results["tokens_per_s_64"] = rates
    results["ours_vs_builder_pruned"] = rates["ours"]["median"] / rates["builder_pruned"]["median"]
    results["ours_vs_builder_dense"] = rates["ours"]["median"] / rates["builder_dense"]["median"]
    results["ours_nonuniform_vs_builder_dense"] = rates["ours_nonuniform"]["median"] / rates["builder_dense"]["median"]
    print(json.dumps(results, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
