"""Decode per token after GQA regrouping to G kv heads per layer (SmolLM2-135M: G = 3 as trained, G = 1).

Issue 13's target: at batch 8 and 2048 cached tokens, G = 1 should decode ≥ 1.4× faster per token than
G = 3, since the cache a step reads is 3× smaller. Measured side by side in one run (rounds that take
turns, the median of the rounds' medians and the spread over rounds), ONNX Runtime CPU:

  genai/   the GroupQueryAttention decoder of ``outputs.genai`` (reads the un-expanded cache), run by ONNX
           Runtime with random past tensors of 2048 tokens (``generate.decode_latency``): each step's
           ``present`` is a new [batch, G, past + 1, head_dim] tensor, the copy a non-shared cache costs
  plain    the exported KV-cache decoder (``frontends.decoder.export_decoder``) after ``RegroupGQAPass``
           (repeat_kv's Expand turns the G heads back into 9 per step)

genai/ is built from a torch model, so G = 1 is regrouped in torch here the way ``RegroupGQAPass`` does it
by default (adjacent kv heads, K and V weights mean-pooled); decode cost depends only on the shapes.
onnxruntime-genai itself (``--genai-rss``) is run in a subprocess per folder at batch 8 with max_length
past + 16 (its cache buffer is allocated for max_length: ``past_present_share_buffer``): its peak RSS
and its median decode step (ms) over 16 new tokens after a 16-token prompt.

    PYTHONPATH=. python benchmarks/bench_genai_decode.py --out /tmp/bench-genai-decode --threads 2 --genai-rss
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common

MODEL = "smollm2-135m"

#: Runs in a fresh process: onnxruntime-genai at batch 8, the cache allocated for ``past`` + 16 tokens.
_GENAI_RSS = """
import json, resource, sys, time
import numpy as np
import onnxruntime_genai as og
folder, batch, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=max_length, batch_size=batch)
generator = og.Generator(model, params)
generator.append_tokens(np.tile(np.arange(1, 17, dtype=np.int32), (batch, 1)))
times = []
for _ in range(16):
    start = time.perf_counter()
    generator.generate_next_token()
    times.append(time.perf_counter() - start)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "decode_ms_median": 1000 * sorted(times[1:])[len(times[1:]) // 2], "batch": batch,
                  "max_length": max_length}))
"""


def regroup_torch(module, groups: int):
    """A copy of a Llama-style model with ``groups`` kv heads per layer: adjacent K/V heads mean-pooled."""
    import torch

    config = module.config
    kv, d = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    if kv % groups:
        raise SystemExit(f"G={groups} must divide the model's {kv} kv heads")
    if groups == kv:
        return module
    new_config = copy.deepcopy(config)
    new_config.num_key_value_heads = groups
    out = type(module)(new_config).eval()
    state = module.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            rows = tensor.reshape(groups, kv // groups, d, -1).mean(dim=1)
            state[name] = rows.reshape(groups * d, -1)
        elif name.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")):
            state[name] = tensor.reshape(groups, kv // groups, d).mean(dim=1).reshape(-1)
    with torch.no_grad():
        out.load_state_dict(state)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/bench-genai-decode"))
    common.add_cache(parser)
    parser.add_argument("--groups", type=int, nargs="+", default=[3, 1])
    parser.add_argument("--past", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the graphs take turns")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per graph and round")
    parser.add_argument("--genai-rss", action="store_true", help="also run onnxruntime-genai per folder")
    common.add_threads(parser)
    args = parser.parse_args(argv)
    common.quiet_logging("prune2deploy", "bench_genai_decode")
    args.out.mkdir(parents=True, exist_ok=True)

    from bench_gqa import regroup

    from prune2deploy.engines.onnxruntime import make_session
    from prune2deploy.frontends.decoder import decoder_signature
    from prune2deploy.frontends.hf import load_hf_model
    from prune2deploy.generate import decode_latency
    from prune2deploy.outputs.genai import write_genai_folder
    from prune2deploy.outputs.slice import slice_causal_lm

    loaded = load_hf_model(MODEL)
    sessions, results = {}, {"model": MODEL, "past": args.past, "batch": args.batch, "threads": args.threads}
    results["graphs"] = {}
    kv_bytes = common.kv_onnx(args.cache, MODEL).read_bytes()
    for groups in args.groups:
        module = regroup_torch(loaded.module, groups)
        folder = args.out / f"genai-G{groups}"
        if (folder / "bench-check.json").is_file():  # written and checked by an earlier run
            section = json.loads((folder / "bench-check.json").read_text())
        else:
            section = write_genai_folder(slice_causal_lm(module), loaded.tokenizer, folder, reference=module)
            (folder / "bench-check.json").write_text(json.dumps(section, default=str))
        sessions[f"genai G={groups}"] = make_session(folder / "model.onnx", threads=args.threads)
        plain = kv_bytes if groups == 3 else regroup(kv_bytes, groups)[0]
        sessions[f"plain G={groups}"] = make_session(plain, threads=args.threads)
        results["graphs"][f"genai G={groups}"] = {"check": section.get("check"), "folder": str(folder)}
        results["graphs"][f"plain G={groups}"] = {}
    for name, session in sessions.items():
        signature = decoder_signature(session)
        results["graphs"][name].update(
            kv_cache_bytes_per_token=signature.bytes_per_token, kv_heads=sorted({x.kv_heads for x in signature.layers})
        )
        decode_latency(session, past_length=args.past, batch=args.batch, warmup=3, repeats=1)  # warm-up
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            step = decode_latency(session, past_length=args.past, batch=args.batch, warmup=1, repeats=args.repeats)
            medians[name].append(step.median_ms)
            results["graphs"][name]["kv_cache_bytes_read"] = step.kv_cache_bytes
    for name, values in medians.items():
        results["graphs"][name].update(
            median_ms=statistics.median(values), min_ms=min(values), max_ms=max(values), rounds_ms=values
        )
    graphs = results["graphs"]
    for kind in ("genai", "plain"):
        a, b = graphs.get(f"{kind} G=3"), graphs.get(f"{kind} G=1")
        if a and b:
            results[f"{kind}_speedup_G1_vs_G3"] = a["median_ms"] / b["median_ms"]
    if args.genai_rss:
        for groups in args.groups:
            run = subprocess.run(
                [sys.executable, "-c", _GENAI_RSS, str(args.out / f"genai-G{groups}"), str(args.batch),
                 str(args.past + 16)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            lines = run.stdout.strip().splitlines()
            graphs[f"genai G={groups}"]["onnxruntime_genai"] = (
                json.loads(lines[-1]) if run.returncode == 0 and lines else {"error": run.stderr[-500:]}
            )
    rows = [
        [name, str(g["kv_heads"]), f"{g['kv_cache_bytes_per_token']:,}", f"{g['kv_cache_bytes_read'] / 1e6:.1f}",
         f"{g['median_ms']:.1f}", f"{g['min_ms']:.1f}–{g['max_ms']:.1f}"]
        for name, g in graphs.items()
    ]  # fmt: skip
    results["table"] = common.markdown_table(
        ["graph", "kv heads", "KV bytes/token", "KV MB read/step", "median ms/step", "spread (rounds)"], rows
    )
    print(results["table"])
    print(json.dumps({k: v for k, v in results.items() if k != "table"}, indent=1, default=str))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
