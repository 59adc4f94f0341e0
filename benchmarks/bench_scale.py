"""Compile cost against model size: wall time and peak RSS per step, one model per process.

    python benchmarks/bench_scale.py --model 1b --work /tmp/p2d-scale     # generates the HF folder once
    python benchmarks/bench_scale.py --model smollm2 --work /tmp/p2d-scale
    python benchmarks/bench_scale.py --model 3b --work /tmp/p2d-scale --genai-precision int4 --gguf q8_0

Models: ``smollm2`` (the bundled SmolLM2-135M, fp32, 50% of every MLP's neurons masked by magnitude),
``0.5b``, ``1b`` (Llama-3.2-1B-shaped, fp32), ``3b`` (Llama-3.2-3B-shaped, bf16) and ``8b`` (Llama-3.1-8B-shaped,
bf16, untied lm_head; 16 GB): random weights
(normal, std 0.02) written shard by shard straight to safetensors, with half of every MLP's neurons zeroed
in the checkpoint itself (gate/up rows and down columns), so ``compile`` finds them with no mask file.
Never run in CI: the 1B folder is 4.9 GB, the 3B one 6.4 GB, the 8B one 16 GB.

``--genai-precision`` and ``--gguf`` pass the compile options of those names (default: the compile's); the
result then names them (``3b-genai-int4-gguf-q8_0-result.json``) and gives each output folder's size on disk.

Each step's time comes from the compile's progress lines; the peak RSS of each step is sampled every
20 ms by a child process (``RssSampler``), and the whole run's from ``getrusage``. Prints one JSON line and writes it to
``<work>/<model>-result.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

SHAPES = {
    # hidden, layers, heads, kv heads, mlp, vocab, dtype, tie
    "0.5b": (1024, 24, 16, 8, 4096, 128256, "float32", True),
    "1b": (2048, 16, 32, 8, 8192, 128256, "float32", True),
    "3b": (3072, 28, 24, 8, 8192, 128256, "bfloat16", True),
    "8b": (4096, 32, 32, 8, 14336, 128256, "bfloat16", False),  # Llama-3.1-8B: lm_head of its own
}


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


#: The sampler runs in a process of its own: a thread of the compiling process needs the GIL, which a long C
#: call (serialising a graph, creating an ONNX Runtime session) can hold for seconds, so a thread misses the
#: highest points. Every 20 ms it reads ``/proc/<pid>/statm`` of the compiling process and of its descendants
#: (summed: the export of a large checkpoint runs in a child process) and answers each newline on stdin with
#: the peak RSS and peak anonymous RSS (bytes) since the previous one. The sampler itself is not counted.
_SAMPLER = """
import os, select, sys
root, page = int(sys.argv[1]), os.sysconf("SC_PAGE_SIZE")

def tree(pid):
    # the process and its descendants (the compile exports large checkpoints in a child process)
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            for child in handle.read().split():
                if int(child) != os.getpid():
                    pids += tree(int(child))
    return pids

peak = anon = 0
while True:
    rss = shared = 0
    try:
        for pid in tree(root):
            with open(f"/proc/{pid}/statm") as handle:
                fields = handle.read().split()
            rss, shared = rss + int(fields[1]) * page, shared + int(fields[2]) * page
    except (FileNotFoundError, ProcessLookupError):  # a child ended between the listing and the read
        if not os.path.exists(f"/proc/{root}"):
            break
        continue
    peak, anon = max(peak, rss), max(anon, rss - shared)
    if select.select([sys.stdin], [], [], 0.02)[0]:
        if not sys.stdin.readline():
            break
        print(peak, anon, flush=True)
        peak = anon = 0
"""


def mapped_files(min_bytes: int = 100_000_000) -> dict[str, float]:
    """Resident bytes (GB) of each file this process maps, from ``/proc/self/smaps``: which weight files are
    held when a step's RSS exceeds its anonymous memory."""
    resident: dict[str, int] = {}
    path = None
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                path = fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
            elif fields[0] == "Rss:" and path is not None:
                resident[path] = resident.get(path, 0) + int(fields[1]) * 1024
    return {name: round(size / 1e9, 2) for name, size in resident.items() if size >= min_bytes}


class RssSampler:
    """Peak RSS and anonymous RSS of this process between marks, sampled by a child process."""

    def __init__(self) -> None:
        import os
        import subprocess

        self._child = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def mark(self) -> tuple[int, int]:
        """(peak RSS, peak anonymous RSS) in bytes since the previous mark; starts the next interval."""
        self._child.stdin.write("\n")
        self._child.stdin.flush()
        peak, anon = self._child.stdout.readline().split()
        return int(peak), int(anon)

    def close(self) -> None:
        self._child.stdin.close()
        self._child.wait(timeout=10)


def make_folder(name: str, folder: Path, seed: int = 0) -> Path:
    """A Llama-shaped HF folder with random weights and half of each MLP's neurons zeroed."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "config.json").exists():
        return folder
    hidden, layers, heads, kv, mlp, vocab, dtype, tie = SHAPES[name]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=mlp,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        rope_theta=500000.0,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    head_dim = hidden // heads

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch_dtype)

    index: dict[str, str] = {}

    def write(tensors: dict, shard: str) -> None:
        save_file(tensors, str(scratch / shard), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, shard))

    write(
        {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch_dtype)},
        "embed.safetensors",
    )
    if not tie:
        write({"lm_head.weight": rand(vocab, hidden)}, "lm_head.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        keep = torch.ones(mlp, dtype=torch_dtype)
        keep[torch.randperm(mlp, generator=gen)[: mlp // 2]] = 0
        write(
            {
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(mlp, hidden) * keep[:, None],
                p + "mlp.up_proj.weight": rand(mlp, hidden) * keep[:, None],
                p + "mlp.down_proj.weight": rand(hidden, mlp) * keep[None, :],
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch_dtype),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch_dtype),
            },
            f"layer{i:03d}.safetensors",
        )
    (scratch / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(scratch)
    scratch.rename(folder)
    return folder


def run(args) -> dict:
    from prune2deploy import api
    from prune2deploy.spec import CompileOptions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{args.model}-out"
    options: dict = {"profile": False, "overwrite": True, "verify_mode": args.verify_mode}
    if args.no_cache:
        options["export_cache"] = False
    if args.no_genai:
        options["genai"] = False
    if args.genai_precision:
        options["genai_precision"] = args.genai_precision
    if args.gguf:
        options["gguf"] = args.gguf.split(",")
    options["export_cache_dir"] = work / "cache"
    if args.model == "smollm2":
        from prune2deploy.demo import demo_masks

        source = "smollm2-135m"
        options["masks"] = demo_masks(source, 0.5, work / "smollm2-masks.safetensors")
    else:
        t0 = time.perf_counter()
        source = make_folder(args.model, work / f"llama-{args.model}")
        print(f"folder ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    phases: list[dict] = []
    sampler = RssSampler()
    state = {"label": "start", "t": time.perf_counter()}
    start = state["t"]
    overall = {"anon": 0}

    def progress(line: str) -> None:
        now = time.perf_counter()
        peak, anon = sampler.mark()
        overall["anon"] = max(overall["anon"], anon)
        phases.append(
            {
                "step": state["label"],
                "s": round(now - state["t"], 2),
                "peak_rss_gb": round(peak / 1e9, 2),
                "peak_anon_gb": round(anon / 1e9, 2),
            }
        )
        if args.mappings:
            phases[-1]["mapped_gb"] = mapped_files()
        step = phases[-1]
        done = f"[previous step: {step['s']} s, peak RSS {step['peak_rss_gb']} GB, anon {step['peak_anon_gb']} GB]"
        print(f"{line}   {done}", file=sys.stderr, flush=True)
        state.update(label=line.split("] ", 1)[-1], t=now)

    base_rss = _rss()
    sampler.mark()
    result = api.compile(source, out, CompileOptions(**options), progress=progress)
    progress("[done] done")
    sampler.close()
    report = result.report
    data_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    summary = {
        "model": args.model,
        "params_reference": report["model"]["reference"]["params"],
        "params_compiled": report["model"]["compiled"]["params"],
        "dtype": report["input"].get("dtype", "float32"),
        "wall_s": round(time.perf_counter() - start, 1),
        "timings": {k: round(v, 1) for k, v in report["timings"].items()},
        "peak_rss_gb": max(step["peak_rss_gb"] for step in phases),  # the compile and its children
        "peak_rss_self_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "peak_anon_gb": round(overall["anon"] / 1e9, 2),
        "rss_before_compile_gb": round(base_rss / 1e9, 2),
        "verification": {
            "mode": report["verification"]["mode"],
            "passed": report["verification"]["passed"],
            "worst": max(
                [o["max_rel"] for o in report["verification"]["outputs"].values()]
                + [b["max_rel"] for b in report["verification"].get("blocks", [])]
            ),
        },
        "output_bytes": data_bytes,
        "folder_bytes": {p.name: folder_bytes(p) for p in out.iterdir() if p.is_dir()},
        "outputs": {name: _output_summary(report[name]) for name in ("genai", "gguf", "hf") if name in report},
        "steps": phases[1:],
    }
    (work / f"{result_name(args)}-result.json").write_text(json.dumps(summary, indent=2))
    return summary


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (an output folder: genai/, gguf/, hf/)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _output_summary(section) -> dict:
    """What an output folder's report section says about its size and checks (not its per-layer lists)."""
    if not isinstance(section, dict):
        return {"value": section}
    keys = ("written", "reason", "precision", "lm_head", "decoder_bytes", "weight_bytes", "bits_per_weight",
            "check", "genai", "quantized_weights", "warning", "files")  # fmt: skip
    return {k: section[k] for k in keys if k in section}


def result_name(args) -> str:
    """``<model>[-genai-<precision>][-gguf-<types>]``: runs with other options do not overwrite each other."""
    name = args.model
    if args.genai_precision:
        name += f"-genai-{args.genai_precision}"
    if args.gguf:
        name += f"-gguf-{args.gguf.replace(',', '-')}"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", *SHAPES], required=True)
    parser.add_argument("--work", required=True, help="folder for the generated checkpoint, cache and output")
    parser.add_argument("--verify-mode", default="auto", choices=["auto", "whole", "blockwise"])
    parser.add_argument("--no-cache", action="store_true", help="export even when a cached export exists")
    parser.add_argument("--make-only", action="store_true", help="only write the HF folder")
    parser.add_argument(
        "--mappings", action="store_true", help="record the resident bytes of each mapped file per step"
    )
    parser.add_argument("--no-genai", action="store_true", help="skip the genai/ output (compile and verify only)")
    parser.add_argument("--genai-precision", choices=["fp32", "fp16", "int8", "int4"], help="genai/'s decoder")
    parser.add_argument("--gguf", help="gguf/ types, comma-separated (e.g. q8_0)")
    args = parser.parse_args()
    if args.make_only:
        print(make_folder(args.model, Path(args.work) / f"llama-{args.model}"))
        return
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
