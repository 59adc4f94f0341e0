"""Quantized genai/ (issue 26): SmolLM2-135M pruned, our int4 / int8 / fp32 decoders vs the builder's int4.

Pruning as ``bench_genai.py``: 50% of MLP neurons by magnitude + the first query head of every GQA group
masked on o_proj. Side by side in one run (onnxruntime-genai CPU, batch 1, 64 new tokens after a 17-token
prompt; ``--rounds`` rounds in which every folder generates once, in turn; median, min and max):

  ours fp32 / int8 / int4   genai/ written by ``outputs.genai.write_genai_folder`` from the sliced masked model
                            (int4/int8: MatMulNBits, block 32, accuracy level 4, symmetric, lm_head int8)
  ours int4 (dense)         the same writer on the dense model: the quantizers side by side with the builder's
  builder int4 (dense)      ``python -m onnxruntime_genai.models.builder -i DENSE_HF -o OUT -p int4 -e cpu``

and, per folder: the decoder's size, genai's 24 greedy tokens against transformers' (on the masked model for
ours, on the dense one for the builder's), and quality on the bundled evaluation text (``quality.lm_quality``,
``--windows`` windows of 128 tokens): KL and top-1 against the model the folder was built from, perplexity.

    PYTHONPATH=. python benchmarks/bench_genai_quant.py --out build/bench-genai-quant --rounds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    from bench_genai import PROMPT, head_masks, hf_greedy, tok_s
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks.bench_genai import PROMPT, head_masks, hf_greedy, tok_s


def decoder_fn(folder: Path, threads: int | None):
    """logits of a genai/ decoder on whole windows (empty past): a ``quality.ModelFn``."""
    from prune2deploy.ort_session import make_session

    session = make_session(folder / "model.onnx", threads=threads)
    inputs = session.get_inputs()
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    kv, head_size = decoder["num_key_value_heads"], decoder["head_size"]  # the builder's shapes are symbolic

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        for arg in inputs:
            if arg.name.startswith("past_key_values."):
                dtype = np.float16 if "float16" in arg.type else np.float32
                heads = arg.shape[1] if isinstance(arg.shape[1], int) else kv
                feeds[arg.name] = np.zeros((ids.shape[0], heads, 0, head_size), dtype=dtype)
            elif arg.name == "position_ids":
                feeds[arg.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return session.run(["logits"], feeds)[0].astype(np.float32)

    return run


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx") or p.suffix == ".data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/bench-genai-quant"))
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every folder once)")
    parser.add_argument("--windows", type=int, default=4, help="evaluation-text windows of 128 tokens")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the quality sessions")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from prune2deploy.demo import mlp_neuron_masks
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.frontends.masks import apply_masks_torch
    from prune2deploy.generate import genai_tokens
    from prune2deploy.outputs.genai import reference_outputs, write_genai_folder
    from prune2deploy.outputs.hf import write_hf_checkpoint
    from prune2deploy.outputs.quantize import GenaiPrecision
    from prune2deploy.outputs.slice import slice_causal_lm
    from prune2deploy.quality import lm_quality

    loaded = load_hf_model("smollm2-135m")
    dense, tokenizer = loaded.module, loaded.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    masked = apply_masks_torch(dense, {**mlp_neuron_masks(dense, 0.5), **head_masks(dense)})
    reference = reference_outputs(masked)
    results: dict = {"prompt_tokens": len(ids), "folders": {}}
    want = hf_greedy(masked, ids, 24)
    dense_want = hf_greedy(dense, ids, 24)
    dense_reference = reference_outputs(dense)
    folders: dict[str, Path] = {}
    for name, model in (("fp32", "pruned"), ("int8", "pruned"), ("int4", "pruned"), ("int4", "dense")):
        folder = out / f"ours-{name}-{model}"
        module, check = (masked, reference) if model == "pruned" else (dense, dense_reference)
        start = time.perf_counter()
        section = write_genai_folder(
            slice_causal_lm(module), tokenizer, folder, reference=check, precision=GenaiPrecision(name)
        )
        keys = ("precision", "projections", "lm_head", "decoder_bytes", "weight_bytes", "bits_per_weight", "check",
                "genai", "quantized_weights", "warning")  # fmt: skip
        row = {k: section.get(k) for k in keys}
        row["write_and_check_s"] = time.perf_counter() - start
        got = genai_tokens(folder, ids, 24, min_new_tokens=24)[0]
        row["greedy_24_vs_torch"] = sum(a == b for a, b in zip(got, want if model == "pruned" else dense_want,
                                                             strict=True))  # fmt: skip
        results["folders"][f"ours {name} ({model})"] = row
        folders[f"ours {name} ({model})"] = folder

    dense_hf = out / "dense_hf"
    if not (dense_hf / "config.json").is_file():
        write_hf_checkpoint(slice_causal_lm(dense), tokenizer, dense_hf)
    builder = out / "builder-int4-dense"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(dense_hf), "-o", str(builder),
                    "-p", "int4", "-e", "cpu"], check=True, capture_output=True)  # fmt: skip
    got = genai_tokens(builder, ids, 24, min_new_tokens=24)[0]
    results["folders"]["builder int4 (dense)"] = {
        "decoder_bytes": size(builder),
        "build_s": time.perf_counter() - start,
        "greedy_24_vs_torch": sum(a == b for a, b in zip(got, dense_want, strict=True)),
    }
    folders["builder int4 (dense)"] = builder
    for name, row in results["folders"].items():
        base = dense if "dense" in name else masked
        quality = lm_quality(base, decoder_fn(folders[name], args.threads), tokenizer=tokenizer,
                             max_windows=args.windows)  # fmt: skip
        row["quality_vs_torch"] = quality.to_dict()
    results["tokens_per_s_64"] = tok_s(folders, ids, rounds=args.rounds)
    print(json.dumps(results, indent=2, default=str))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
