"""``prune2deploy predict``: predicted latency per target GPU (engine-aware cost model, roofline bound)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prune2deploy.cli.flags import HelpFormatter, non_negative_int, positive_int
from prune2deploy.cli.render import table

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Predicted latency per target GPU from an ONNX model's graph (side by side with a reference for a speedup), "
    "or from an HF config alone: an engine-aware cost model, with the ideal roofline as its lower bound."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from prune2deploy import api

    r = sub.add_parser(
        "predict", help="predicted latency per target GPU (engine-aware cost model + roofline bound)",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    r.add_argument("model", type=Path, help="ONNX file, or an HF config.json / folder for shape-only prediction")
    r.add_argument("--against", type=Path, help="reference ONNX for a side-by-side speedup")
    r.add_argument("--gpu", nargs="+", help=f"GPU names or unambiguous prefixes (default: the whole catalog): "
                   f"{', '.join(api.gpu_names())}")  # fmt: skip
    r.add_argument("--precision", default="fp16", choices=["fp32", "tf32", "fp16", "bf16", "fp8", "int8"],
                   help="precision the engine runs in")  # fmt: skip
    r.add_argument("--engine", default="tensorrt", choices=["tensorrt", "onnxruntime", "torch", "llama.cpp"],
                   help="whose kernels the cost model prices (fusions, sparse tensor cores)")  # fmt: skip
    r.add_argument("--batch", type=positive_int, nargs=1, default=[1], help="batch size")
    r.add_argument("--seq", type=positive_int, nargs=1, help="sequence length (default 128, or the model's bound)")
    r.add_argument("--decode", action="store_true", help="one decode step (decoders) instead of a prefill")
    r.add_argument("--past", type=non_negative_int, default=0, help="tokens already in the KV cache for --decode")
    r.add_argument("--plan", type=Path, help="pruning plan YAML: per-layer widths for shape-only prediction")
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api
    from prune2deploy.io import dumps_json

    rows = api.predict(
        args.model, against=args.against, gpus=args.gpu, precision=args.precision, batch=args.batch[0],
        seq=args.seq[0] if args.seq else None, engine=args.engine, decode=args.decode, past=args.past, plan=args.plan,
    )  # fmt: skip
    if args.json:
        print(dumps_json(rows, indent=2))
        return 0
    if rows and rows[0].get("source") == "config":
        _print_shape_only(rows)
    elif args.against:
        _print_against(rows)
    else:
        cells = [
            [r["gpu"], r["precision"], f"{r['compiled_ms']:.3f}", f"{r['lower_bound_ms']:.3f}", r["binding"]]
            for r in rows
        ]
        print(table(cells, ["gpu", "precision", "compiled ms", "lower bound ms", "bound"]))
    _print_causes(rows)
    print(
        f"predicted by the {args.engine} cost model (docs/cost-model.md); ideal = FLOP ratio; lower bound = roofline; "
        "gpus.toml for sources"
    )
    return 0


def _print_causes(rows: list[dict[str, Any]]) -> None:
    """Why a GPU realises less than half of the pruning's FLOP ratio (launch-bound, tile quantisation with
    the --round-to that recovers it, too few tiles, untouched parts), once per distinct cause."""
    causes: dict[str, list[str]] = {}
    for row in rows:
        if row.get("cause"):
            causes.setdefault(str(row["cause"]), []).append(row["gpu"])
    for cause, gpus in causes.items():
        print(f"why less than half the FLOP ratio on {', '.join(gpus)}: {cause}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _print_against(rows: list[dict[str, Any]]) -> None:
    """Side by side with the reference: the predicted speedup from pruning, the FLOP ratio and, where the
    reference had to be fused like the compiled graph, what fusion alone adds (never counted in speedup)."""
    fused = any("fusion_speedup" in r for r in rows)
    cells = []
    for r in rows:
        cell = [
            r["gpu"], r["precision"], f"{r['compiled_ms']:.3f}", f"{r['reference_ms']:.3f}", _ratio(r["speedup"]),
            _ratio(r.get("ideal_speedup")), f"{r['lower_bound_ms']:.3f}", r["binding"],
        ]  # fmt: skip
        if fused:
            cell += [_ratio(r.get("fusion_speedup")), r.get("fusion_level", "")]
        cells.append(cell)
    heads = ["gpu", "precision", "compiled ms", "reference ms", "speedup", "ideal (FLOP ratio)"]
    heads += ["lower bound ms", "bound", *(["fusion speedup", "fusion level"] if fused else [])]
    print(table(cells, heads))
    if fused:
        print("fusion speedup: what ONNX Runtime fusion alone adds (unfused / fused reference), not in speedup")


def _print_shape_only(rows: list[dict[str, Any]]) -> None:
    """Prediction from a config: one row per GPU with tokens/s and where the decode step turns compute-bound."""
    first = rows[0]
    where = f"decode step after {first['past']} tokens" if first["mode"] == "decode" else f"prefill of {first['seq']}"
    print(f"{first['params'] / 1e9:.2f}B parameters, batch {first['batch']}, {where}, {first['engine']}")
    cells = [
        [
            r["gpu"], r["precision"], f"{r['compiled_ms']:.3f}", f"{r['lower_bound_ms']:.3f}",
            "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}", r["binding"],
            ", ".join(f"{g}: {b}" for g, b in r["binding_by_group"].items() if g in ("attention", "mlp", "conv")),
            "" if r.get("compute_bound_batch") is None else str(r.get("compute_bound_batch")),
        ]
        for r in rows
    ]  # fmt: skip
    heads = ["gpu", "precision", "predicted ms", "lower bound ms", "tokens/s", "bound", "by layer type"]
    print(table(cells, [*heads, "compute-bound at"]))
