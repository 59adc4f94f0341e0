"""`prune2deploy` command line: a thin layer over :mod:`prune2deploy.api`.

Exit codes: 0 done, 1 verification failed, 2 bad input / missing engine / bad option.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from prune2deploy import __version__
from prune2deploy.errors import P2DError

__all__ = ["main"]


def _progress(quiet: bool):
    def say(message: str) -> None:
        if not quiet:
            print(f"· {message}", file=sys.stderr, flush=True)

    return say


def _fmt_int(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- compile ------------------------------------------------------------------------------------------------


def _compile_options(args: argparse.Namespace):
    """Config file first, then flags: core flags, each registered pass's flags, engine options."""
    from prune2deploy import api

    data: dict[str, Any] = api.load_config(args.config) if args.config else {}
    overrides = {
        "masks": args.masks,
        "plan": args.plan,
        "engine": args.engine,
        "precision": args.precision,
        "profile_batches": args.batch,
        "profile_seqs": args.seq,
        "gpus": args.gpu,
        "feeds": args.feeds,
        "threads": args.threads,
        "tolerance": args.tolerance,
        "passes": args.passes.split(",") if args.passes else None,
    }
    for spec in api.pass_specs().values():
        for key, option in spec.options.items():
            if option.flag:
                overrides[key] = getattr(args, key)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if args.engine_option:
        data["engine_options"] = {**data.get("engine_options", {}), **_engine_options(args.engine_option)}
    if args.overwrite:
        data["overwrite"] = True
    if args.no_profile:
        data["profile"] = False
    for name, spec in api.pass_specs().items():
        if spec.switch and getattr(args, _switch_dest(name)):
            passes = data.get("passes", list(api.CompileOptions().passes))
            data["passes"] = [*passes, name] if name not in passes else passes
    return api.CompileOptions.from_dict(data, source=str(args.config or "command line"))


def _engine_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as YAML scalars (``3`` is an int, ``true`` a bool)."""
    import yaml

    from prune2deploy.errors import ConfigError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--engine-option takes KEY=VALUE (e.g. optimization_level=5), not '{pair}'")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def _switch_dest(name: str) -> str:
    return "switch_" + name.replace("-", "_").replace(":", "_")


def _add_pass_flags(parser: argparse.ArgumentParser) -> None:
    """Each registered pass's own flags, from its registration: help, type, choices, metavar."""
    import typing

    from prune2deploy import api

    for name, spec in api.pass_specs().items():
        for key, option in spec.options.items():
            if not option.flag:
                continue
            kwargs: dict[str, Any] = {"dest": key, "help": f"{option.help} [{name}]"}
            if option.parse is not None:
                kwargs["type"] = option.parse
            elif typing.get_origin(option.type) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(option.type))
            elif option.type is int or typing.get_args(option.type)[:1] == (int,):
                kwargs["type"] = int
            if option.metavar:
                kwargs["metavar"] = option.metavar
            parser.add_argument(option.flag, **kwargs)
        if spec.switch:
            flag, text = spec.switch
            parser.add_argument(flag, dest=_switch_dest(name), action="store_true", help=text)


def _print_compile(report: dict[str, Any], out_dir: Path) -> None:
    ref, new = report["model"]["reference"], report["model"]["compiled"]
    print(f"compiled → {out_dir}/model.onnx")
    print(
        f"  params {_fmt_int(ref['params'])} → {_fmt_int(new['params'])}   "
        f"FLOPs {_fmt_int(ref['flops'])} → {_fmt_int(new['flops'])}  "
        f"(batch {report['model']['cost_shape']['batch']}, seq {report['model']['cost_shape']['seq']})"
    )
    for entry in report["passes"]:
        extras = {k: v for k, v in entry["record"].items() if not isinstance(v, (dict, list))}
        refused = f"  refused={len(entry['refused'])}" if entry["refused"] else ""
        print(
            f"  pass {entry['pass']:<18} exact={entry['exact']}  "
            + "  ".join(f"{k}={v}" for k, v in extras.items())
            + refused
        )
    ver = report["verification"]
    status = "PASSED" if ver["passed"] else "FAILED"
    worst = max((o["max_rel"] for o in ver["outputs"].values()), default=0.0)
    print(
        f"  verification {status}: worst relative error {worst:.2e} (tolerance {ver['tolerance']:g}, "
        f"{len(ver['feeds'])} feed sets)"
    )
    speed = {(s["batch"], s["seq"]): s for s in report.get("speedup", [])}
    rows = []
    for row in report.get("latency", []):
        if row["model"] != "compiled":
            continue
        ref_row = next(
            (
                r
                for r in report["latency"]
                if r["model"] == "reference" and r["batch"] == row["batch"] and r["seq"] == row["seq"]
            ),
            None,
        )
        s = speed.get((row["batch"], row["seq"]), {})
        rows.append(
            [
                row["batch"],
                row["seq"],
                f"{ref_row['median_ms']:.2f}" if ref_row else "-",
                f"{row['median_ms']:.2f}",
                f"{s.get('measured', 0):.2f}x",
                f"{s.get('ideal') or 0:.2f}x",
            ]
        )
    if rows:
        print("  ONNX Runtime CPU latency (median ms, same run):")
        print(
            "    " + _table(rows, ["batch", "seq", "reference", "compiled", "speedup", "ideal"]).replace("\n", "\n    ")
        )


def cmd_compile(args: argparse.Namespace) -> int:
    from prune2deploy import api

    options = _compile_options(args)
    result = api.compile(args.model, args.out, options, progress=_progress(args.quiet or args.json))
    if args.json:
        print(json.dumps(result.report, indent=2, default=str))
    else:
        _print_compile(result.report, Path(args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Compiles a bundled real model with 50% of every MLP's channels masked by weight magnitude."""
    from prune2deploy import api

    out = Path(args.out)
    result = api.demo(args.model, out, ratio=args.ratio, overwrite=args.overwrite, progress=_progress(args.quiet))
    _print_compile(result.report, out)
    print(f"  report: {out}/report.html  ·  inspect with: prune2deploy inspect {out}/model.onnx")
    return 0


def _ratios(args: argparse.Namespace) -> dict[str, float]:
    names = ("unstructured", "mlp", "heads", "hidden", "layers")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_prune(args: argparse.Namespace) -> int:
    from prune2deploy import api
    from prune2deploy.errors import ConfigError

    nm = None
    if args.nm:
        try:
            n, m = (int(x) for x in args.nm.split(":"))
        except ValueError as exc:
            raise ConfigError(f"--nm takes N:M such as 2:4, not '{args.nm}'") from exc
        nm = (n, m)
    say = _progress(args.quiet)
    say(f"scoring {args.model} with {args.criterion}")
    result = api.prune(
        args.model,
        args.out,
        criterion=args.criterion,
        structures=_ratios(args),
        per_layer=not args.global_,
        round_to=args.round_to,
        nm=nm,
        calibration=args.calibration,
        num_samples=args.samples,
        seq_len=args.seq_len,
        overwrite=args.overwrite,
        head_grouping=args.head_grouping,
    )
    print(f"masks → {result.masks_path}\nplan  → {result.plan_path}")
    for key, value in result.summary.items():
        print(f"  {key}: {value}")
    if args.compile:
        options = api.CompileOptions(plan=result.plan_path, overwrite=args.overwrite, profile=not args.no_profile)
        compiled = api.compile(args.model, Path(args.out) / "compiled", options, progress=say)
        _print_compile(compiled.report, Path(args.out) / "compiled")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from prune2deploy import api

    result = api.sweep(
        args.sweep,
        args.out,
        address=args.address,
        max_parallel=args.max_parallel,
        cache_dir=args.cache,
        progress=_progress(args.quiet or args.json),
    )
    record = result.record
    if args.json:
        print(json.dumps(record, indent=2))
        return 1 if result.failed else 0
    rows = []
    for v in record["variants"]:
        q = v.get("quality") or {}
        quality = f"KL {q['kl_mean']:.4f}" if "kl_mean" in q else (f"cos {q['cosine_mean']:.5f}" if q else "-")
        measured = next((r for r in v.get("latency_ms", []) or [] if r["kind"] == "measured"), None)
        status = "resumed" if v.get("resumed") else ("FAILED" if v["error"] else "done")
        rows.append(
            [
                v["id"],
                status,
                _fmt_int(params) if (params := (v.get("params") or {}).get("compiled")) else "-",
                f"{measured['compiled_ms']:.2f}" if measured else "-",
                f"{v['speedup']:.2f}x" if v.get("speedup") else "-",
                quality,
                (v["error"] or "")[:70],
            ]
        )
    print(_table(rows, ["variant", "status", "params", "ms", "speedup", "quality", "error"]))
    print(
        f"{len(result.ran)} ran, {len(result.skipped)} resumed, {len(result.failed)} failed; dense exports: "
        f"{record['exports']}  →  {Path(args.out) / 'sweep.html'}"
    )
    return 1 if result.failed else 0


# -- inspect / profile / predict / verify ---------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from prune2deploy import api

    info = api.inspect(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{info['model']}: {_fmt_int(info['params'])} parameters, {info['nodes']} nodes, "
        f"{len(info['groups'])} channel groups, {info['prunable']} prunable"
    )
    rows = []
    for g in info["groups"]:
        why = (
            ""
            if g["prunable"]
            else (g["blocked"][0]["reason"] + f" @ {g['blocked'][0]['node']}" if g["blocked"] else "")
        )
        rows.append(
            [
                g["label"],
                g["width"],
                g["zero_channels"] if g["prunable"] else "-",
                "yes" if g["prunable"] else "no",
                g["num_tensors"],
                why[:90],
            ]
        )
    print(_table(rows, ["group", "width", "zero", "prunable", "tensors", "blocked by"]))
    layer_rows = []
    for layer in info.get("layers", []):
        subs = " ".join(f"{b['kind']}{'=0' if b['zero'] else ''}" for b in layer["sub_blocks"])
        why = layer["blocked_by"] or next((b["blocked_by"] for b in layer["sub_blocks"] if b["blocked_by"]), "")
        layer_rows.append(
            [
                layer["layer"],
                subs,
                "yes" if layer["removable"] else "no",
                layer["hidden_width"],
                layer["zero_hidden_channels"],
                why[:60],
            ]
        )
    if layer_rows:
        print("\nlayers (residual blocks):")
        print(_table(layer_rows, ["layer", "sub-blocks", "removable", "hidden", "zero hidden", "why not"]))
    attention_rows = []
    for block in info.get("attention", []):
        zero = ",".join(block["zero_heads"]) or "-"
        why = "; ".join(block["reasons"])[:60] if not block["supported"] else ""
        attention_rows.append(
            [
                block["layer"] or block["block"],
                block["heads"],
                block["kv_heads"],
                block["head_dim"],
                block["gqa"] or "-",
                zero,
                "yes" if block["supported"] else "no",
                why,
            ]
        )
    if attention_rows:
        print("\nattention:")
        print(
            _table(attention_rows, ["layer", "heads", "kv heads", "head_dim", "kv map", "zero heads", "ok", "why not"])
        )
    sp = info["sparsity_2_4"]
    reasons: dict[str, int] = {}
    for w in sp["weights"]:
        if not w["eligible"]:
            reasons[w["reason"]] = reasons.get(w["reason"], 0) + 1
    print(
        f"\n2:4 sparsity: {sp['eligible']} of {sp['nodes']} MatMul/Gemm/Conv weights eligible, "
        f"{sp['already_nm']} already 2:4 ({100 * sp['sparse_flops_fraction']:.1f}% of their FLOPs)"
    )
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  not eligible ({count}): {reason}")
    if args.tensors:
        for g in info["groups"]:
            print(f"\n{g['label']} (width {g['width']}): weights {', '.join(g['weights']) or '-'}")
            shown = ", ".join(g["tensors"])
            more = g["num_tensors"] - len(g["tensors"])
            print(f"  axes: {shown}" + (f" … (+{more})" if more > 0 else ""))
            for b in g["blocked"]:
                print(f"  blocked: {b['tensor']} at {b['node']}: {b['reason']}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from prune2deploy import api

    rows = api.profile(
        args.model,
        against=args.against,
        batches=args.batch,
        seqs=args.seq,
        threads=args.threads,
        budget_s=args.budget,
        ops=args.ops,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        [
            r["model"],
            r["batch"],
            r["seq"],
            f"{r['median_ms']:.3f}",
            f"{r['p90_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            r["runs"],
            f"{r['throughput']:.1f}",
        ]
        for r in rows
        if r.get("kind") == "latency"
    ]
    print(_table(table, ["model", "batch", "seq", "median ms", "p90 ms", "p99 ms", "runs", "samples/s"]))
    for r in rows:
        if r.get("kind") == "speedup":
            print(f"speedup at batch {r['batch']} seq {r['seq']}: {r['measured']:.2f}x")
    for r in rows:
        if r.get("kind") == "ops":
            print(f"\n{r['model']}: ONNX Runtime time per op type (ms per run, first grid point)")
            table = [
                [o["op_type"], f"{o['calls_per_run']:g}", f"{o['ms_per_run']:.3f}", f"{100 * o['share']:.1f}%"]
                for o in r["by_op_type"][:12]
            ]
            print(_table(table, ["op", "calls", "ms", "share"]))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from prune2deploy import api

    rows = api.predict(
        args.model,
        against=args.against,
        gpus=args.gpu,
        precision=args.precision,
        batch=args.batch[0],
        seq=args.seq[0],
        engine=args.engine,
        decode=args.decode,
        past=args.past,
        plan=args.plan,
    )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if rows and "mode" in rows[0]:  # shape-only
        first = rows[0]
        where = (
            f"decode step after {first['past']} tokens" if first["mode"] == "decode" else f"prefill of {first['seq']}"
        )
        print(f"{first['params'] / 1e9:.2f}B parameters, batch {first['batch']}, {where}, {first['engine']}")
        table = [
            [
                r["gpu"],
                r["precision"],
                f"{r['latency_ms']:.3f}",
                f"{r['lower_bound_ms']:.3f}",
                "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}",
                r["binding"],
                ", ".join(f"{g}: {b}" for g, b in r["binding_by_group"].items() if g in ("attention", "mlp", "conv")),
                "" if r.get("compute_bound_batch") is None else str(r.get("compute_bound_batch")),
            ]
            for r in rows
        ]
        heads = [
            "gpu",
            "precision",
            "predicted ms",
            "ideal ms",
            "tokens/s",
            "bound",
            "by layer type",
            "compute-bound at",
        ]
        print(_table(table, heads))
    elif args.against:
        table = [
            [
                r["gpu"],
                r["precision"],
                f"{r['reference_predicted_ms']:.3f}",
                f"{r['predicted_ms']:.3f}",
                f"{r['predicted_speedup']:.2f}x",
                f"{r['speedup']:.2f}x",
                r["binding"],
            ]
            for r in rows
        ]
        print(_table(table, ["gpu", "precision", "reference ms", "compiled ms", "speedup", "ideal speedup", "bound"]))
    else:
        table = [
            [
                r["gpu"],
                r["precision"],
                f"{r['predicted_ms']:.3f}",
                f"{r['lower_bound_ms']:.3f}",
                f"{r['latency_ms']:.3f}",
                r["binding"],
            ]
            for r in rows
        ]
        print(_table(table, ["gpu", "precision", "predicted ms", "ideal ms", "unfused roofline ms", "bound"]))
    print(
        f"predicted by the {args.engine} cost model (docs/cost-model.md); ideal = roofline lower bound; "
        "gpus.toml for sources"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from prune2deploy import api

    result = api.verify(args.model, args.reference, feeds=args.feeds, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for name, o in result.outputs.items():
            print(f"{name}: max_abs {o['max_abs']:.3e}  max_rel {o['max_rel']:.3e}  cosine {o['cosine']:.6f}")
        print("PASSED" if result.passed else f"FAILED (tolerance {args.tolerance:g})")
    return 0 if result.passed else 1


# -- parser ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from prune2deploy import api

    parser = argparse.ArgumentParser(
        prog="prune2deploy",
        description="Deployment compiler for pruned networks: masks in, physically smaller verified models out.",
    )
    parser.add_argument("--version", action="version", version=f"prune2deploy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a pruned model (HF folder, .gguf, .onnx, or bundled model name)")
    c.add_argument("model", help="HF model folder, .gguf file, .onnx file, or smollm2-135m / minilm-l6")
    c.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument("--masks", type=Path, help="safetensors of 0/1 masks keyed by torch parameter name")
    c.add_argument(
        "--plan", type=Path, help="plan.yaml from `prune2deploy prune` (brings masks and layer/hidden plans)"
    )
    c.add_argument(
        "--detect-zeros",
        action="store_true",
        help="prune channels already zero in the weights (always on; the flag documents intent)",
    )
    c.add_argument("--config", type=Path, help="YAML/TOML/JSON file of compile options (flags override it)")
    c.add_argument(
        "--passes",
        help=f"comma-separated pipeline from {', '.join(api.pass_specs())} "
        f"(default: {','.join(api.CompileOptions().passes)}; run in that order)",
    )
    _add_pass_flags(c)
    c.add_argument("--engine", choices=list(api.engine_names()), help="engine to build (default onnxruntime)")
    c.add_argument(
        "--engine-option",
        action="append",
        metavar="KEY=VALUE",
        help="an engine option, repeatable (TensorRT: timing_cache=PATH, optimization_level=0-5, workspace_mib=N; "
        "torch: device=cuda)",
    )
    c.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    c.add_argument("--batch", type=int, nargs="+", help="batch sizes to profile (default 1)")
    c.add_argument("--seq", type=int, nargs="+", help="sequence lengths to profile (default 128)")
    c.add_argument("--gpu", nargs="+", help="target GPUs for predictions (default: the whole catalog)")
    c.add_argument("--feeds", type=Path, nargs="+", help=".npz/.safetensors feeds to verify with")
    c.add_argument("--threads", type=int, help="ONNX Runtime threads for timing")
    c.add_argument("--tolerance", type=float, help="relative tolerance of an exact pipeline (default 1e-4)")
    c.add_argument("--no-profile", action="store_true", help="skip latency measurement")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=cmd_compile)

    d = sub.add_parser("demo", help="compile a bundled real model with 50%% of its MLP channels masked")
    d.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "minilm-l6"])
    d.add_argument("--ratio", type=float, default=0.5, help="fraction of MLP channels to mask (by magnitude)")
    d.add_argument("--out", default="build/demo")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("prune", help="score a dense model and write masks + plan (criteria from the papers)")
    q.add_argument("model", help="HF folder, .gguf, or bundled model name")
    q.add_argument("--out", required=True, help="folder for masks.safetensors and plan.yaml")
    q.add_argument("--criterion", default="magnitude", choices=["magnitude", "wanda", "taylor", "minitron", "michel"])
    for name in ("unstructured", "mlp", "heads", "hidden", "layers"):
        q.add_argument(f"--{name}", type=float, metavar="RATIO", help=f"fraction of {name} to remove")
    q.add_argument("--nm", help="N:M pattern along the input dimension, e.g. 2:4")
    q.add_argument("--global", dest="global_", action="store_true", help="rank globally instead of per layer")
    q.add_argument("--round-to", type=int, help="round kept widths to a multiple (8, 16, 64)")
    q.add_argument("--head-grouping", default="free", choices=["free", "uniform", "whole-group"])
    q.add_argument("--calibration", type=Path, help="text or token-id file (default: bundled text)")
    q.add_argument("--samples", type=int, default=24)
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--compile", action="store_true", help="then compile with the masks into OUT/compiled")
    q.add_argument("--no-profile", action="store_true")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_prune)

    w = sub.add_parser(
        "sweep",
        help="compile a grid of prune/compile variants on Ray (one dense export); exit 1 if a variant failed",
    )
    w.add_argument("sweep", type=Path, help="sweep file (.yaml/.toml/.json): model, grid, prune, compile")
    w.add_argument("--out", required=True, type=Path, help="folder for the variants, sweep.json and sweep.html")
    w.add_argument("--address", help="Ray cluster to join (from `ray start --head`); default: a local cluster")
    w.add_argument("--max-parallel", type=int, help="variants in flight at most (Ray's resources bound it too)")
    w.add_argument("--cache", type=Path, help="dense-export cache folder (default .p2d-cache or $P2D_CACHE_DIR)")
    w.add_argument("--json", action="store_true", help="print sweep.json")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=cmd_sweep)

    i = sub.add_parser("inspect", help="channel groups of an ONNX model, prunable or not and why")
    i.add_argument("model", type=Path)
    i.add_argument("--tensors", action="store_true", help="list each group's tensor axes and blocking nodes")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    p = sub.add_parser("profile", help="ONNX Runtime CPU latency, optionally side by side with a reference")
    p.add_argument("model", type=Path)
    p.add_argument("--against", type=Path, help="reference ONNX measured in the same run")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--seq", type=int, nargs="+", default=[128])
    p.add_argument("--threads", type=int)
    p.add_argument("--budget", type=float, default=10.0, help="seconds per grid point at most")
    p.add_argument("--ops", action="store_true", help="also ONNX Runtime's per-op-type breakdown")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    r = sub.add_parser("predict", help="predicted latency per target GPU (engine-aware cost model + roofline bound)")
    r.add_argument("model", type=Path, help="ONNX file, or an HF config.json / folder for shape-only prediction")
    r.add_argument("--against", type=Path, help="reference ONNX for a side-by-side speedup")
    r.add_argument("--gpu", nargs="+", help="GPU names (default: whole catalog)")
    r.add_argument("--precision", default="fp16", choices=["fp32", "tf32", "fp16", "bf16", "fp8", "int8"])
    r.add_argument("--engine", default="tensorrt", choices=["tensorrt", "onnxruntime", "torch", "llama.cpp"])
    r.add_argument("--batch", type=int, nargs=1, default=[1])
    r.add_argument("--seq", type=int, nargs=1, default=[128])
    r.add_argument("--decode", action="store_true", help="one decode step (decoders) instead of a prefill")
    r.add_argument("--past", type=int, default=0, help="tokens already in the KV cache for --decode")
    r.add_argument("--plan", type=Path, help="pruning plan YAML: per-layer widths for shape-only prediction")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_predict)

    v = sub.add_parser("verify", help="compare a compiled ONNX with its reference on ONNX Runtime CPU")
    v.add_argument("model", type=Path)
    v.add_argument("--reference", type=Path, required=True)
    v.add_argument("--feeds", type=Path, nargs="+")
    v.add_argument("--tolerance", type=float, default=1e-4)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except P2DError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
