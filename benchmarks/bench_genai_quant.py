"""Quantized genai/ (issue 26): SmolLM2-135M pruned, our int4 / int8 decoders vs the builder's on the same pruning.

Pruning that keeps the model useful, in the issue's shape: 50% of every MLP's neurons and one query head of
every kv group (9 → 6 query heads, 3 kv heads), chosen by ``--criterion`` (Minitron activation importance by
default) calibrated on the bundled calibration text (``pruning.prune_module``; ``head_grouping="uniform"``);
and the same ratios ranked across layers (``per_layer=False``, what ``prune --global`` does), whose per-layer
widths differ. Side by side in one run (onnxruntime-genai CPU, batch 1, 64 new tokens after a 15-token prompt;
``--rounds`` rounds in which every folder generates once, in turn; median, min and max):

  ours fp32 / int8 / int4      genai/ by ``outputs.genai.write_genai_folder`` from the sliced masked model
                               (int4/int8: MatMulNBits, block 32, accuracy level 4, symmetric, the LM head in
                               the body's precision: the builder's choice)
  ours int4, lm_head int8      the same with an int8 LM head (``--genai-lm-head int8``: isolates the head's cost)
  builder int8 / int4 (pruned) ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`` on the
                               same pruning sliced by hand (``slice_causal_lm`` → ``write_hf_checkpoint``)
  builder int8 / int4 (dense)  the builder on the dense model
  ours int4 (dense)            the quantizers side by side on the same weights
  ours int4 (non-uniform)      the global ranking; the builder is run on its sliced HF folder (one config width
                               for all layers cannot describe it: its error is recorded) and on the zero-padded
                               checkpoint ``write_hf_checkpoint`` writes for it

Per folder: decoder size, genai's 24 greedy tokens against transformers' on the model it was built from, ours
against the builder's on the same pruning, and quality on the bundled evaluation text (``quality.lm_quality``,
``--windows`` windows of 128 tokens): KL and top-1 against that torch model, and perplexities.

    PYTHONPATH=. python benchmarks/bench_genai_quant.py --out /tmp/bench-genai-quant --rounds 5
    PYTHONPATH=. python benchmarks/bench_genai_quant.py --out /tmp/bench-genai-quant --rounds 5 --time-only

``--quality-folder HF`` measures only the quantization error of a larger model (``bench_scale.py``'s random-weight
Llama folders, e.g. ``/tmp/p2d-scale/llama-1b``): our int4 and int8 decoders and the builder's int4 of the same
weights, each against our fp32 decoder (ONNX Runtime) on the bundled evaluation text, tokenized by SmolLM2's
tokenizer (the folder has none; with random weights the text only fixes the token ids). The builder gets a folder
of links to the weights with that tokenizer beside them.

    PYTHONPATH=. python benchmarks/bench_genai_quant.py --out /tmp/bq-1b --quality-folder /tmp/p2d-scale/llama-1b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    from bench_genai import PROMPT, builder, hf_greedy, tok_s
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks.bench_genai import PROMPT, builder, hf_greedy, tok_s

#: (folder name, precision, lm_head, model) of our folders; models: pruned, dense, nonuniform
OURS = (
    ("ours-fp32-pruned", "fp32", None, "pruned"),
    ("ours-int8-pruned", "int8", None, "pruned"),
    ("ours-int4-pruned", "int4", None, "pruned"),
    ("ours-int4-head8-pruned", "int4", "int8", "pruned"),
    ("ours-int4-dense", "int4", None, "dense"),
    ("ours-int4-nonuniform", "int4", None, "nonuniform"),
)
#: (folder name, precision, HF folder, model) of the builder's folders
BUILDER = (
    ("builder-int8-pruned", "int8", "hf-pruned", "pruned"),
    ("builder-int4-pruned", "int4", "hf-pruned", "pruned"),
    ("builder-int8-dense", "int8", "hf-dense", "dense"),
    ("builder-int4-dense", "int4", "hf-dense", "dense"),
    ("builder-int4-nonuniform-padded", "int4", "hf-nonuniform-padded-arch", "nonuniform"),
)
#: (numerator, denominator) folders whose tokens/s the issue compares
RATIOS = (
    ("ours-int4-pruned", "builder-int4-pruned"),
    ("ours-int4-pruned", "builder-int4-dense"),
    ("ours-int8-pruned", "builder-int8-pruned"),
    ("ours-int8-pruned", "builder-int8-dense"),
    ("ours-int4-head8-pruned", "builder-int4-pruned"),
    ("ours-int4-dense", "builder-int4-dense"),
    ("ours-int4-nonuniform", "builder-int4-dense"),
    ("ours-int4-nonuniform", "builder-int4-nonuniform-padded"),
)
#: greedy tokens of ours against the builder's on the same weights
PAIRS = (
    ("ours-int4-pruned", "builder-int4-pruned"),
    ("ours-int4-head8-pruned", "builder-int4-pruned"),
    ("ours-int8-pruned", "builder-int8-pruned"),
    ("ours-int4-dense", "builder-int4-dense"),
)


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


def pruning_masks(dense, tokenizer, criterion: str, *, per_layer: bool) -> dict[str, np.ndarray]:
    """50% of MLP neurons + a third of the query heads (one per kv group when ranked per layer), by ``criterion``
    calibrated on the bundled calibration text (the evaluation text is not seen)."""
    from prune2deploy.pruning.calibration import load_calibration
    from prune2deploy.pruning.prune import prune_module

    calibration = load_calibration(None, tokenizer=tokenizer, seq_len=128, num_samples=24)
    _, masks = prune_module(dense, criterion=criterion, structures={"mlp": 0.5, "heads": 1 / 3},
                            per_layer=per_layer, head_grouping="uniform", calibration=calibration)  # fmt: skip
    return {name: mask.detach().numpy().astype(np.float32) for name, mask in masks.items()}


def cached_masks(path: Path, dense, tokenizer, args, per_layer: bool) -> dict[str, np.ndarray]:
    """:func:`pruning_masks`, kept in ``path`` for ``--reuse`` (calibration is the slow part of a rerun)."""
    if not (args.reuse and path.is_file()):
        np.savez(path, **pruning_masks(dense, tokenizer, args.criterion, per_layer=per_layer))
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def matching(a: list[int], b: list[int]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def ratios(rates: dict[str, dict]) -> dict[str, dict]:
    """tok/s ratios: of the medians, and per round (both generated in the same round, under the same load)."""
    out = {}
    for num, den in RATIOS:
        per_round = [a / b for a, b in zip(rates[num]["rounds"], rates[den]["rounds"], strict=True)]
        out[f"{num} / {den}"] = {
            "of_medians": rates[num]["median"] / rates[den]["median"],
            "per_round_median": statistics.median(per_round),
            "per_round_min": min(per_round),
            "per_round_max": max(per_round),
        }
    return out


def builder_refusal(sliced, padded: Path, folder: Path, out: Path) -> str:
    """The builder on the non-uniform model's own sliced weights in an HF folder (each layer's tensors at its
    width; config and tokenizer of the padded checkpoint, whose one width per config field is all a Llama config
    can say): the tail of its error, or '' if it built. (``save_pretrained`` refuses the GGUF-loaded module.)"""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in sliced.module.state_dict().items()}
    if sliced.module.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor, stored once (safetensors refuses shared storage)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for file in padded.iterdir():
        if file.suffix != ".safetensors" and file.is_file():
            (folder / file.name).write_bytes(file.read_bytes())
    return builder_error(folder, out)


def builder_error(folder: Path, out: Path) -> str:
    """The tail of the builder's error on ``folder`` (int4), or '' when it builds."""
    try:
        builder(folder, out, "int4")
    except subprocess.CalledProcessError as exc:
        lines = [line for line in (exc.stderr or "").splitlines() if line.strip()]
        return "\n".join(lines[-4:])
    return ""


def with_architecture(folder: Path, out: Path) -> None:
    """``out``: ``folder``'s files by link, and its config.json with ``architectures`` (LlamaForCausalLM, the
    bundled model's class) when it lacks them: the padded hf/ config does, and the builder needs them."""
    out.mkdir(exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("architectures", ["LlamaForCausalLM"])
    for file in folder.iterdir():
        if file.name != "config.json" and not (out / file.name).exists():
            (out / file.name).symlink_to(file.resolve())
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/bench-genai-quant"))
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every folder once)")
    parser.add_argument("--windows", type=int, default=4, help="evaluation-text windows of 128 tokens")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the quality sessions")
    parser.add_argument("--criterion", default="minitron", help="pruning criterion (prune2deploy.pruning)")
    parser.add_argument("--time-only", action="store_true", help="re-time the folders of an earlier run in --out")
    parser.add_argument("--quality-folder", type=Path, help="only the quantization error of this HF folder")
    parser.add_argument("--reuse", action="store_true", help="keep the folders an earlier run wrote in --out")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.time_only:
        return time_again(out, args.rounds)
    if args.quality_folder:
        return folder_quality(args.quality_folder, out, args.windows, args.threads)

    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.frontends.masks import apply_masks_torch
    from prune2deploy.generate import genai_tokens
    from prune2deploy.outputs.genai import reference_outputs, write_genai_folder
    from prune2deploy.outputs.hf import write_hf_checkpoint
    from prune2deploy.outputs.quantize import GenaiPrecision
    from prune2deploy.outputs.slice import slice_causal_lm
    from prune2deploy.quality import lm_quality

    loaded = load_hf_model("smollm2-135m")
    dense, tokenizer = loaded.module.eval(), loaded.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    models = {
        "dense": dense,
        "pruned": apply_masks_torch(dense, cached_masks(out / "masks-uniform.npz", dense, tokenizer, args, True)),
        "nonuniform": apply_masks_torch(dense, cached_masks(out / "masks-global.npz", dense, tokenizer, args, False)),
    }
    sliced = {name: slice_causal_lm(module) for name, module in models.items()}
    results: dict = {"prompt_tokens": len(ids), "criterion": args.criterion, "models": {}, "folders": {}}
    for name, module in models.items():
        widths = sliced[name].layers
        results["models"][name] = {
            "mlp_widths": sorted({w.intermediate for w in widths}),
            "heads_per_layer": sorted({(w.num_heads, w.kv_heads) for w in widths}),
            "params": sum(p.numel() for p in sliced[name].module.parameters()),
            "quality_vs_dense": lm_quality(dense, module, tokenizer=tokenizer, max_windows=args.windows).to_dict(),
        }
    want = {name: hf_greedy(module, ids, 24) for name, module in models.items()}
    tokens: dict[str, list[int]] = {}
    folders: dict[str, Path] = {}
    for name, precision, head, model in OURS:
        folder = out / name
        saved = folder / "bench-section.json"  # not a file of the folder's: what its write and check reported
        if not (args.reuse and saved.is_file()):
            start = time.perf_counter()
            quant = GenaiPrecision(precision, lm_head=head)
            section = write_genai_folder(sliced[model], tokenizer, folder, precision=quant,
                                         reference=reference_outputs(models[model]))  # fmt: skip
            keys = ("precision", "projections", "lm_head", "decoder_bytes", "weight_bytes", "bits_per_weight", "check",
                    "genai", "quantized_weights", "warning")  # fmt: skip
            row = {
                "model": model,
                **{k: section.get(k) for k in keys},
                "write_and_check_s": time.perf_counter() - start,
            }
            saved.write_text(json.dumps(row, default=str))
        results["folders"][name] = json.loads(saved.read_text())
        folders[name] = folder

    hf = {"hf-pruned": sliced["pruned"], "hf-dense": sliced["dense"], "hf-nonuniform-padded": sliced["nonuniform"]}
    for name, model_sliced in hf.items():
        if not (out / name / "config.json").is_file():
            results.setdefault("hf", {})[name] = write_hf_checkpoint(model_sliced, tokenizer, out / name).get("padding")
    results["builder_on_padded_hf"] = builder_error(out / "hf-nonuniform-padded", out / "builder-padded-as-written")
    with_architecture(out / "hf-nonuniform-padded", out / "hf-nonuniform-padded-arch")
    for name, precision, source, model in BUILDER:
        saved = out / f"{name}.build_s"
        if not (args.reuse and saved.is_file() and (out / name / "genai_config.json").is_file()):
            saved.write_text(str(builder(out / source, out / name, precision)))
        results["folders"][name] = {
            "model": model,
            "decoder_bytes": size(out / name),
            "build_s": float(saved.read_text()),
        }
        folders[name] = out / name
    results["builder_on_nonuniform_sliced_hf"] = builder_refusal(
        sliced["nonuniform"], out / "hf-nonuniform-padded-arch", out / "hf-nonuniform-sliced", out / "builder-int4-nu"
    )

    for name, folder in folders.items():
        row, model = results["folders"][name], results["folders"][name]["model"]
        tokens[name] = genai_tokens(folder, ids, 24, min_new_tokens=24)[0]
        row["greedy_24_vs_torch"] = matching(tokens[name], want[model])
        quality = lm_quality(models[model], decoder_fn(folder, args.threads), tokenizer=tokenizer,
                             max_windows=args.windows)  # fmt: skip
        row["quality_vs_torch"] = quality.to_dict()
    results["greedy_24_ours_vs_builder"] = {f"{a} vs {b}": matching(tokens[a], tokens[b]) for a, b in PAIRS}
    report(results, folders, ids, out, args.rounds)


def folder_quality(source: Path, out: Path, windows: int, threads: int | None) -> None:
    """int4 / int8 decoders (ours) and the builder's int4 against our fp32 decoder of ``source`` on the text."""
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.outputs.genai import write_genai_folder
    from prune2deploy.outputs.quantize import GenaiPrecision
    from prune2deploy.outputs.slice import slice_causal_lm
    from prune2deploy.quality import lm_quality

    tokenizer = load_hf_model("smollm2-135m").tokenizer
    results: dict = {"source": str(source), "reference": "ours-fp32 (ONNX Runtime)", "folders": {}}
    sliced = slice_causal_lm(load_hf_model(source).module)
    results["params_sliced"] = sum(p.numel() for p in sliced.module.parameters())
    folders = {}
    for precision in ("fp32", "int8", "int4"):
        start = time.perf_counter()
        section = write_genai_folder(sliced, None, out / f"ours-{precision}", precision=GenaiPrecision(precision))
        results["folders"][f"ours-{precision}"] = {
            "decoder_bytes": section["decoder_bytes"], "write_s": time.perf_counter() - start,
            "lm_head": section["lm_head"], "quantized_weights": section.get("quantized_weights"),
        }  # fmt: skip
        folders[f"ours-{precision}"] = out / f"ours-{precision}"
    del sliced
    linked = out / "hf-linked"  # the weights by link, SmolLM2's tokenizer beside them: the input is not changed
    if not linked.is_dir():
        linked.mkdir()
        for file in source.iterdir():
            (linked / file.name).symlink_to(file.resolve())
        tokenizer.save_pretrained(str(linked))
    try:
        results["folders"]["builder-int4"] = {"build_s": builder(linked, out / "builder-int4", "int4")}
        results["folders"]["builder-int4"]["decoder_bytes"] = size(out / "builder-int4")
        folders["builder-int4"] = out / "builder-int4"
    except subprocess.CalledProcessError as exc:
        results["folders"]["builder-int4"] = {"error": "\n".join((exc.stderr or "").splitlines()[-6:])}
    reference = decoder_fn(folders.pop("ours-fp32"), threads)
    for name, folder in folders.items():
        quality = lm_quality(reference, decoder_fn(folder, threads), tokenizer=tokenizer, max_windows=windows)
        results["folders"][name]["quality_vs_fp32"] = quality.to_dict()
    print(json.dumps(results, indent=2, default=str))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def time_again(out: Path, rounds: int) -> None:
    """Times the folders of an earlier run (its results.json) again, keeping its other numbers."""
    from prune2deploy.frontends.hf import load_hf_model

    results = json.loads((out / "results.json").read_text())
    ids = load_hf_model("smollm2-135m").tokenizer(PROMPT)["input_ids"]
    report(results, {name: out / name for name in results["folders"]}, ids, out, rounds)


def report(results: dict, folders: dict[str, Path], ids: list[int], out: Path, rounds: int) -> None:
    rates = tok_s(folders, ids, rounds=rounds)
    results["tokens_per_s_64"] = rates
    results["ratios"] = ratios(rates)
    results["timed_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results["load_average_after"] = list(os.getloadavg())
    print(json.dumps(results, indent=2, default=str))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
