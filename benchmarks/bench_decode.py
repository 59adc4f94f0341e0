"""Per-token decode latency of a KV-cache decoder on ONNX Runtime CPU (the serving benchmark).

Decode latency at long context is dominated by reading the KV cache, which is what KV-head pruning and
GQA regrouping shrink; this script gives the dense baseline and, with ``--onnx``, the compiled graph's.

    python benchmarks/bench_decode.py --model smollm2-135m --past 512 2048 --batch 1 8 --threads 2
    python benchmarks/bench_decode.py --onnx out/compiled.onnx --json out/decode.json

Without ``--onnx`` the model is exported once to ``--cache`` (reused by later runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:  # run as ``python benchmarks/bench_x.py``: the script's folder is on sys.path
    import _common as common
except ModuleNotFoundError:  # imported as ``benchmarks.bench_x``
    from benchmarks import _common as common

log = logging.getLogger("bench_decode")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or HF folder to export")
    parser.add_argument("--onnx", type=Path, help="an existing KV-cache graph (skips the export)")
    common.add_cache(parser, help="folder for the export")
    parser.add_argument("--past", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    common.add_threads(parser)
    common.add_timing(parser, repeats=20, warmup=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    common.quiet_logging("prune2deploy", "bench_decode")

    import onnxruntime

    from prune2deploy.engines.onnxruntime import make_session
    from prune2deploy.frontends.decoder import decoder_signature
    from prune2deploy.generate import decode_latency
    from prune2deploy.io import atomic_write_json

    path = args.onnx or common.kv_onnx(args.cache, args.model)
    session = make_session(path, threads=args.threads)
    signature = decoder_signature(session)
    rows = []
    for batch in args.batch:
        for past in args.past:
            result = decode_latency(session, past_length=past, batch=batch, warmup=args.warmup, repeats=args.repeats)
            rows.append(result.to_dict())
    report = {
        "graph": str(path),
        "kv_cache_bytes_per_token": signature.bytes_per_token,
        "layers": len(signature.layers),
        "kv_heads": [layer.kv_heads for layer in signature.layers],
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "machine": common.machine()["machine"],
        "results": rows,
    }
    print(f"{'batch':>5} {'past':>6} {'median ms':>10} {'p10':>8} {'p90':>8} {'KV MB read':>10}")
    for row in rows:
        print(
            f"{row['batch']:>5} {row['past_length']:>6} {row['median_ms']:>10.2f} {row['p10_ms']:>8.2f} "
            f"{row['p90_ms']:>8.2f} {row['kv_cache_bytes'] / 1e6:>10.1f}"
        )
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
