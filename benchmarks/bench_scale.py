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

``--shard-gb X`` writes the same tensors as Hub checkpoints are laid out instead: ``model-0000k-of-0000N``
shards of at most X GB in state-dict order (folder ``llama-8b-shards5``, result ``8b-shards5-result.json``
for ``--shard-gb 5``). A real shard holds several layers, and the compile's slicing step frees a file's
mapping only once all its tensors are copied, so this layout measures the memory a real checkpoint costs.

``--genai-precision`` and ``--gguf`` pass the compile options of those names (default: the compile's); the
result then names them (``3b-genai-int4-gguf-q8_0-result.json``) and gives each output folder's size on disk.

Each step's time comes from the compile's progress lines; the peak RSS of each step is sampled every
20 ms by a child process (``RssSampler``), and the whole run's from ``getrusage``. Prints one JSON line and writes it to
``<work>/<model>-result.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Iterator
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


def _config(spec: tuple):
    """The ``LlamaConfig`` of a ``SHAPES`` row."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv, mlp, vocab, dtype, tie = spec
    return LlamaConfig(
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


def _layer_shapes(spec: tuple) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensor shapes by name suffix, in state-dict order (which is also the draw order)."""
    hidden, _, heads, kv, mlp, *_ = spec
    head_dim = hidden // heads
    return {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv * head_dim, hidden),
        "self_attn.v_proj.weight": (kv * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (mlp, hidden),
        "mlp.up_proj.weight": (mlp, hidden),
        "mlp.down_proj.weight": (hidden, mlp),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def _shapes(spec: tuple) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, in state-dict order: embed_tokens, layers 0..N-1, norm, lm_head (when untied)."""
    hidden, layers, *_, vocab, _, tie = spec
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": shape for k, shape in _layer_shapes(spec).items()})
    shapes["model.norm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _sizes(spec: tuple) -> dict[str, int]:
    """Every tensor's bytes, in state-dict order."""
    itemsize = 2 if spec[6] == "bfloat16" else 4
    return {name: math.prod(shape) * itemsize for name, shape in _shapes(spec).items()}


class _Draw:
    """The random tensors of a ``SHAPES`` row: normal (std 0.02) from one seeded generator, norms at one."""

    def __init__(self, spec: tuple, seed: int) -> None:
        import torch

        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = getattr(torch, spec[6])

    def rand(self, *shape: int):
        import torch

        return (torch.randn(*shape, generator=self.gen) * 0.02).to(self.dtype)

    def ones(self, n: int):
        import torch

        return torch.ones(n, dtype=self.dtype)

    def layer(self, i: int) -> dict:
        """Layer ``i``'s tensors, with a random half of its MLP neurons zeroed (gate/up rows, down columns)."""
        import torch

        mlp = self.spec[4]
        keep = torch.ones(mlp, dtype=self.dtype)
        keep[torch.randperm(mlp, generator=self.gen)[: mlp // 2]] = 0
        mask = {"mlp.gate_proj.weight": keep[:, None], "mlp.up_proj.weight": keep[:, None]}
        mask["mlp.down_proj.weight"] = keep[None, :]
        tensors = {}
        for key, shape in _layer_shapes(self.spec).items():  # draws in this order: q, k, v, o, gate, up, down
            if key.endswith("layernorm.weight"):
                tensors[key] = self.ones(*shape)
            else:
                tensors[key] = self.rand(*shape) * mask.get(key, 1)
        return {f"model.layers.{i}.{k}": v for k, v in tensors.items()}


def _write_per_layer(spec: tuple, folder: Path, seed: int) -> dict[str, str]:
    """One file per layer (plus embed+norm and lm_head); returns the weight map."""
    hidden, layers, *_, vocab, _, tie = spec
    draw = _Draw(spec, seed)
    embed = {"model.embed_tokens.weight": draw.rand(vocab, hidden), "model.norm.weight": draw.ones(hidden)}
    index = _save(embed, folder / "embed.safetensors")
    if not tie:
        index |= _save({"lm_head.weight": draw.rand(vocab, hidden)}, folder / "lm_head.safetensors")
    for i in range(layers):
        index |= _save(draw.layer(i), folder / f"layer{i:03d}.safetensors")
    return index


def _state_dict(spec: tuple, seed: int) -> Iterator[tuple]:
    """(name, tensor) in state-dict order, one layer at a time, with the per-layer layout's values: lm_head is
    drawn right after embed_tokens there, so its generator state is kept and its draw skipped until the end."""
    hidden, layers, *_, vocab, _, tie = spec
    draw = _Draw(spec, seed)
    yield "model.embed_tokens.weight", draw.rand(vocab, hidden)
    head = draw.gen.get_state()
    if not tie:
        draw.rand(vocab, hidden)  # advance the generator past lm_head (dropped here, redrawn at the end)
    for i in range(layers):
        yield from draw.layer(i).items()
    yield "model.norm.weight", draw.ones(hidden)
    if not tie:
        draw.gen.set_state(head)
        yield "lm_head.weight", draw.rand(vocab, hidden)


def _shard_plan(spec: tuple, max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in state-dict order, each shard at most ``max_bytes`` (unless one tensor is more),
    the way ``transformers`` splits a checkpoint."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in _sizes(spec).items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shards(spec: tuple, folder: Path, seed: int, max_bytes: int) -> dict[str, str]:
    """``model-0000k-of-0000N.safetensors`` shards of at most ``max_bytes``, one in memory at a time."""
    plan = _shard_plan(spec, max_bytes)
    tensors = _state_dict(spec, seed)
    index: dict[str, str] = {}
    for k, names in enumerate(plan, 1):
        shard = dict(itertools.islice(tensors, len(names)))
        assert list(shard) == names, f"shard {k}: drawn {list(shard)} but planned {names}"
        index |= _save(shard, folder / f"model-{k:05d}-of-{len(plan):05d}.safetensors")
        del shard
    return index


def _save(tensors: dict, path: Path) -> dict[str, str]:
    """Write ``tensors`` to ``path``; returns their entries of the weight map."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    return dict.fromkeys(tensors, path.name)


def make_folder(name: str, folder: Path, seed: int = 0, shard_gb: float | None = None) -> Path:
    """A Llama-shaped HF folder with random weights and half of each MLP's neurons zeroed: one file per layer,
    or with ``shard_gb`` the same tensors in shards of at most that many GB (1e9 bytes), as on the Hub."""
    if (folder / "config.json").exists():
        return folder
    spec = SHAPES[name]
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    if shard_gb is None:
        index = {"metadata": {}, "weight_map": _write_per_layer(spec, scratch, seed)}
    else:
        weight_map = _write_shards(spec, scratch, seed, int(shard_gb * 1e9))
        index = {"metadata": {"total_size": sum(_sizes(spec).values())}, "weight_map": weight_map}
    (scratch / "model.safetensors.index.json").write_text(json.dumps(index))
    _config(spec).save_pretrained(scratch)
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
        source = make_folder(args.model, work / f"llama-{checkpoint_name(args)}", shard_gb=args.shard_gb)
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
        "model": checkpoint_name(args),
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


def checkpoint_name(args) -> str:
    """``<model>[-shards<X>]``: the generated folder is ``llama-<this>``, so both layouts can share ``--work``."""
    return args.model if args.shard_gb is None else f"{args.model}-shards{args.shard_gb:g}"


def result_name(args) -> str:
    """``<model>[-shards<X>][-genai-<precision>][-gguf-<types>]``: runs with other options do not overwrite
    each other."""
    name = checkpoint_name(args)
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
    parser.add_argument(
        "--shard-gb", type=float, help="write the checkpoint as shards of at most this many GB (default: per layer)"
    )
    args = parser.parse_args()
    if args.shard_gb is not None and (args.model == "smollm2" or args.shard_gb <= 0):
        parser.error("--shard-gb takes a positive size and applies to the generated models, not smollm2")
    if args.make_only:
        folder = Path(args.work) / f"llama-{checkpoint_name(args)}"
        print(make_folder(args.model, folder, shard_gb=args.shard_gb))
        return
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
