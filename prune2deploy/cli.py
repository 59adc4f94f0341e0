"""`prune2deploy` command line: a thin layer over :mod:`prune2deploy.api`.

Exit codes: 0 done, 1 verification failed (and only that), 2 bad input / missing engine / bad option,
3 internal error (traceback saved to a file), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from prune2deploy import __version__
from prune2deploy.errors import P2DError
from prune2deploy.io import dumps_json

__all__ = ["main"]


class _Steps:
    """Progress of a long command: one line per step with the time since the start, and while a step runs a
    spinner with its elapsed time (rich, on a terminal) or a heartbeat line every 30 s (logs, CI).

    Called with a message when a step starts; :meth:`close` ends the last one. Silent when ``quiet``.
    """

    heartbeat_s = 30.0

    def __init__(self, quiet: bool) -> None:
        import threading
        import time

        self.quiet = quiet
        self._clock = time.perf_counter
        self._start = self._clock()
        self._step: str | None = None
        self._step_start = self._start
        self._live = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not quiet:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        self._end_step()
        now = self._clock()
        self._step, self._step_start = message, now
        self._console.print(f"· [{now - self._start:6.1f}s] {message}", markup=False)
        if self._console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self._console,
                transient=True,
            )  # fmt: skip
            self._live.start()
            self._live.add_task(message, total=None)
        else:
            import threading

            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat, args=(message, self._stop), daemon=True)
            self._thread.start()

    def _beat(self, message: str, stop) -> None:
        while not stop.wait(self.heartbeat_s):
            self._console.print(f"  … {message}: {self._clock() - self._step_start:.0f} s so far", markup=False)

    def _end_step(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Ends the last step and prints the total time."""
        if self.quiet or self._step is None:
            return
        self._end_step()
        self._console.print(f"· [{self._clock() - self._start:6.1f}s] done", markup=False)
        self._step = None


def _progress(quiet: bool) -> _Steps:
    if quiet:
        from prune2deploy import api

        api.quiet_libraries()
    return _Steps(quiet)


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
        "profile_budget_s": args.profile_budget,
        "gpus": args.gpu,
        "shapes": _shapes(args.shapes) if args.shapes else None,
        "feeds": args.feeds,
        "threads": args.threads,
        "tolerance": args.tolerance,
        "memory_limit_gib": args.memory_limit_gib,
        "passes": args.passes.split(",") if args.passes else None,
        "verify_mode": args.verify_mode,
        "export_cache_dir": args.export_cache_dir,
        "quality_windows": args.quality_windows,
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
    if args.genai is not None:
        data["genai"] = args.genai
    if args.hf_checkpoint:
        data["hf_checkpoint"] = True
    if args.portable:
        data["portable"] = True
    if args.no_export_cache:
        data["export_cache"] = False
    for name, spec in api.pass_specs().items():
        if spec.switch and getattr(args, _switch_dest(name)):
            passes = data.get("passes", list(api.CompileOptions().passes))
            data["passes"] = [*passes, name] if name not in passes else passes
    return api.CompileOptions.from_dict(data, source=str(args.config or "command line"))


def _shapes(pairs: list[str]) -> dict[str, list[int]]:
    """``batch=1:1:8 seq=1:128:2048`` → ``{"batch": [1, 1, 8], "seq": [1, 128, 2048]}``."""
    from prune2deploy.errors import ConfigError

    shapes: dict[str, list[int]] = {}
    for pair in pairs:
        axis, _, span = pair.partition("=")
        try:
            values = [int(v) for v in span.split(":")]
        except ValueError:
            values = []
        if axis not in ("batch", "seq") or len(values) != 3:
            raise ConfigError(
                f"--shapes takes batch=MIN:OPT:MAX and/or seq=MIN:OPT:MAX (e.g. seq=1:128:2048), not '{pair}'"
            )
        shapes[axis] = values
    return shapes


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


def _quality_line(section: dict[str, Any] | None) -> str:
    """One line of the report's quality section: each comparison's numbers and the text, or why none."""
    if not section:
        return ""
    if not section.get("computed"):
        return f"not measured: {section.get('reason')}"
    parts = []
    for c in section["comparisons"]:
        if "kl_mean" in c:
            parts.append(
                f"vs {c['reference']}: KL {c['kl_mean']:.3g}, top-1 {100 * c['top1_agreement']:.1f}%, "
                f"ppl {c['ppl_candidate']:.2f} (ref {c['ppl_reference']:.2f})"
            )
        else:
            parts.append(f"vs {c['reference']}: embedding cosine {c['cosine_mean']:.5f} (min {c['cosine_min']:.5f})")
    unit = (
        f"{section['windows']}×{section['window']} tokens"
        if "window" in section
        else f"{section['sentences']} sentences"
    )
    return "; ".join(parts) + f"  [{unit} of {section['text']}]"


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
    for entry in report["passes"]:
        if entry["pass"] == "sparsify-2:4":
            r = entry["record"]
            print(
                f"  2:4: {r['already_nm'] + r['made_nm']} of {r['eligible']} eligible weights are 2:4 "
                f"({r['made_nm']} made so here); the speed comes from sparse tensor cores: --engine tensorrt on "
                "an Ampere or later GPU"
            )
    _print_groups(report.get("groups") or {})
    if report["model"]["compiled"]["params"] >= report["model"]["reference"]["params"] and not any(
        entry["modified"] for entry in report["passes"] if entry["pass"].startswith(("remove-", "prune-", "regroup-"))
    ):
        given = report.get("options", {})
        if given.get("masks") or given.get("plan"):
            print(
                "  nothing was pruned: the masks zero no whole channel, head or layer (unstructured zeros leave "
                "no structure to remove; `prune2deploy inspect` shows what is zero per group)"
            )
        else:
            print("  nothing was pruned: no zero channels/heads found; did you mean --masks or --plan?")
    for key, label in (("genai", "genai/"), ("hf", "hf/")):
        section = report.get(key)
        if section is None:
            continue
        if not section.get("written"):
            print(f"  {label:<7} not written: {section.get('reason')}")
            continue
        heads = sorted({tuple(h) for h in section.get("per_layer_heads", [])})
        line = f"  {label:<7} written"
        if heads:
            line += f"  (heads, kv heads) per layer: {', '.join(f'{h}/{k}' for h, k in heads)}"
        check = section.get("check") or {}
        if "max_rel_diff" in check:
            line += f"  max rel diff {check['max_rel_diff']:.2e}"
        tokens = section.get("genai") or check
        if "greedy_tokens_equal" in tokens:
            line += f"  greedy tokens equal: {tokens['greedy_tokens_equal']}"
        print(line)
    quality = _quality_line(report.get("quality"))
    if quality:
        print(f"  quality {quality}")
    from prune2deploy import api

    ver = report["verification"]
    approximate = [e["pass"] for e in report["passes"] if not e["exact"]]
    line = api.verdict_line(ver)
    if approximate and ver.get("status") == "approximate":
        line += f" [approximate passes: {', '.join(approximate)}]"
    print(f"  verification {line}")
    for note in api.verification_notes(ver):
        print(f"  note: {note}")
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
                f"{s['ci'][0]:.2f}–{s['ci'][1]:.2f}x" if s.get("ci") else "-",
                f"{s.get('ideal') or 0:.2f}x",
            ]
        )
    if rows:
        print("  ONNX Runtime CPU latency (median ms, same run):")
        print(
            "    "
            + _table(rows, ["batch", "seq", "reference", "compiled", "speedup", "95% CI", "ideal"]).replace(
                "\n", "\n    "
            )
        )
        loose = [s for s in report.get("speedup", []) if s.get("tight") is False]
        if loose:
            print(
                f"    not tight: the time budget ran out before the medians were known to ±{loose[0]['target_ci']:.0%}"
                " (raise --profile-budget or use a quieter machine)"
            )
    _print_engine(report.get("engine"), out_dir)
    _print_predictions(report.get("predictions") or [], bool(report.get("options", {}).get("gpus")))


def _print_groups(groups: dict[str, Any]) -> None:
    """How many channel groups could be pruned, and why the others could not (grouped by reason)."""
    if not groups.get("total"):
        return
    blocked = groups.get("blocked") or []
    line = f"  channel groups: {groups['prunable']} of {groups['total']} prunable"
    if not blocked:
        print(line)
        return
    reasons: dict[str, int] = {}
    hints: dict[str, str] = {}
    for b in blocked:
        reasons[b["reason"]] = reasons.get(b["reason"], 0) + 1
        hints[b["reason"]] = b.get("hint") or ""
    print(f"{line}; {len(blocked)} not:")
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:4]:
        print(f"    {count:>3} × {reason[:100]}" + (f"\n          → {hints[reason]}" if hints[reason] else ""))
    if len(reasons) > 4:
        print(f"    … {len(reasons) - 4} more reasons in report.json (groups.blocked)")


def _print_engine(engine: dict[str, Any] | None, out_dir: Path) -> None:
    if not engine:
        return
    artifact = f"{out_dir}/{engine['artifact']}" if engine.get("artifact") else "(in memory)"
    print(f"  engine {engine['engine']} → {artifact}")
    shapes = engine.get("shapes") or {}
    if shapes:
        spans = ", ".join(f"{axis} {lo}–{hi} (opt {opt})" for axis, (lo, opt, hi) in shapes.items())
        print(f"    accepts {spans}; change with --shapes batch=MIN:OPT:MAX seq=MIN:OPT:MAX")
    for note in (engine.get("info") or {}).get("notes", []):
        print(f"    note: {note}")
    check = engine.get("verification")
    if check is None:
        print("    not run here (it needs its GPU); verified: the ONNX it was built from")


def _print_predictions(rows: list[dict[str, Any]], asked: bool) -> None:
    """The GPUs the user named, one row each; otherwise one line over the whole catalog."""
    if not rows:
        return
    if not asked:
        low, high = min(r["speedup"] for r in rows), max(r["speedup"] for r in rows)
        span = f"{low:.2f}×" if high - low < 0.005 else f"{low:.2f}–{high:.2f}×"
        print(f"  predicted speedup on {len(rows)} catalog GPUs: {span} (per GPU: report.html, or --gpu NAME)")
        return
    table = [
        [r["gpu"], r["precision"], f"{r['reference_ms']:.3f}", f"{r['compiled_ms']:.3f}", f"{r['speedup']:.2f}x",
         r["binding"]]
        for r in rows
    ]  # fmt: skip
    print(f"  predicted on GPU ({rows[0]['engine']} cost model, batch {rows[0]['batch']}, seq {rows[0]['seq']}):")
    print("    " + _table(table, ["gpu", "precision", "reference ms", "compiled ms", "speedup", "bound"]).replace(
        "\n", "\n    "
    ))  # fmt: skip


def cmd_compile(args: argparse.Namespace) -> int:
    from prune2deploy import api

    options = _compile_options(args)
    steps = _progress(args.quiet or args.json)
    try:
        result = api.compile(args.model, args.out, options, progress=steps, inputs=[args.config] if args.config else [])
    finally:
        steps.close()
    if args.json:
        print(dumps_json(result.report, indent=2))
    else:
        _print_compile(result.report, Path(args.out))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from prune2deploy import api

    result = api.generate(
        args.out, args.prompt, max_new_tokens=args.max_new_tokens, engine=args.engine, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
        threads=args.threads,
    )  # fmt: skip
    if args.json:
        print(dumps_json(result.to_dict(), indent=2))
        return 0
    print(result.text)
    print(
        f"· {len(result.new_tokens)} new tokens ({result.prompt_tokens} prompt) at {result.tokens_per_s:.1f} tok/s "
        f"on {result.engine}",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Compiles a bundled real model with 50% of every MLP's channels masked by weight magnitude."""
    from prune2deploy import api

    out = Path(args.out)
    steps = _progress(args.quiet)
    try:
        result = api.demo(
            args.model, out, ratio=args.ratio, overwrite=args.overwrite, budget_s=args.profile_budget, progress=steps
        )
    finally:
        steps.close()
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
    # 2:4 masks give speed only through sparse tensor cores: the compile tags them for the engine.
    sparse = nm is not None and nm[1] == 4 and nm[0] <= 2
    compiled_dir = Path(args.out) / "compiled"
    if not args.compile:
        say.close()
        flag = " --sparse-2-4" if sparse else ""
        print(f"next: prune2deploy compile {args.model} --plan {result.plan_path} --out {compiled_dir}{flag}")
        return 0
    options = api.CompileOptions(plan=result.plan_path, overwrite=args.overwrite, profile=not args.no_profile)
    if sparse:
        options = options.replace(passes=[*options.passes, "sparsify-2:4"])
    try:
        compiled = api.compile(args.model, compiled_dir, options, progress=say)
    finally:
        say.close()
    _print_compile(compiled.report, compiled_dir)
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
        print(dumps_json(record, indent=2))
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
        print(dumps_json(info, indent=2))
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
                _zero_cell(g),
                "yes" if g["prunable"] else "no",
                g["num_tensors"],
                why[:90],
            ]
        )
    print(_table(rows, ["group", "width", "zero", "prunable", "tensors", "blocked by"]))
    if info.get("zero_weight_nonzero_bias"):
        print(
            f"note: {info['zero_weight_nonzero_bias']} channels have all-zero weights but a non-zero bias (what "
            "torch.nn.utils.prune.ln_structured leaves): they still output their bias, so they are not counted as "
            "zero. Zero the bias with the weight (a mask file's '.bias' entry) to remove them."
        )
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


def _zero_cell(group: dict[str, Any]) -> str:
    if not group["prunable"]:
        return "-"
    text = str(group["zero_channels"])
    if group.get("zero_weight_nonzero_bias"):
        text += f" (+{group['zero_weight_nonzero_bias']} zero-weight, bias≠0)"
    return text


def cmd_profile(args: argparse.Namespace) -> int:
    from prune2deploy import api

    steps = _progress(args.quiet or args.json)
    models = f"{args.model} against {args.against}" if args.against else str(args.model)
    points = len(args.batch) * len(args.seq)
    steps(f"timing {models} on ONNX Runtime CPU: {points} shape(s), up to {args.budget:g} s each")
    try:
        rows = api.profile(
            args.model,
            against=args.against,
            batches=args.batch,
            seqs=args.seq,
            threads=args.threads,
            budget_s=args.budget,
            ops=args.ops,
            memory_limit_gib=args.memory_limit_gib,
        )
    finally:
        steps.close()
    if args.json:
        print(dumps_json(rows, indent=2))
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
    loose = [r for r in rows if r.get("kind") == "latency" and r.get("stop_reason") == "budget"]
    for r in rows:
        if r.get("kind") == "speedup":
            print(f"speedup at batch {r['batch']} seq {r['seq']}: {r['measured']:.2f}x")
    if loose:
        print(
            f"not tight: {len(loose)} median(s) stopped at the --budget before their 95% CI reached ±2% "
            f"(widest ±{max(r['rel_ci'] for r in loose):.0%}); raise --budget"
        )
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
        seq=args.seq[0] if args.seq else None,
        engine=args.engine,
        decode=args.decode,
        past=args.past,
        plan=args.plan,
    )
    if args.json:
        print(dumps_json(rows, indent=2))
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
        print(dumps_json(result.as_dict(), indent=2))
    else:

        def num(value, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        for name, o in result.outputs.items():
            print(
                f"{name}: max_abs {num(o['max_abs'], '.3e')}  max_rel {num(o['max_rel'], '.3e')}  "
                f"cosine {num(o['cosine'], '.6f')}"
            )
        print(api.verdict_line(result.as_dict()))
        for note in api.verification_notes(result.as_dict()):
            print(f"note: {note}")
    return 0 if result.passed else 1


def cmd_passes(args: argparse.Namespace) -> int:
    """The registered passes, in pipeline order, with what they do, when they are exact and their flags."""
    from prune2deploy import api

    specs = api.pass_specs()
    defaults = set(api.CompileOptions().passes)
    if args.json:
        rows = [
            {
                "pass": name,
                "order": spec.order,
                "default": name in defaults,
                "exact": spec.exactness,
                "summary": spec.summary,
                "options": {
                    key: {"flag": o.flag, "default": o.default, "help": o.help} for key, o in spec.options.items()
                },
                "switch": spec.switch[0] if spec.switch else None,
            }
            for name, spec in specs.items()
        ]
        print(dumps_json(rows, indent=2))
        return 0
    table = []
    for name, spec in specs.items():
        flags = [o.flag for o in spec.options.values() if o.flag] + ([spec.switch[0]] if spec.switch else [])
        table.append([name, "yes" if name in defaults else "", spec.exactness, " ".join(flags) or "-"])
    print(_table(table, ["pass", "default", "exact", "flags"]))
    for name, spec in specs.items():
        print(f"\n{name}: {spec.summary}")
    return 0


# -- parser ---------------------------------------------------------------------------------------------------


def _gpu_help() -> str:
    from prune2deploy import api

    return ", ".join(api.gpu_names())


def _int_at_least(minimum: int):
    """An argparse type: a whole number of at least ``minimum``, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not '{text}'") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


def _tolerance(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"a relative tolerance is between 0 and 1 (exclusive), not {text}")
    return value


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
        f"(default: {','.join(api.CompileOptions(portable=True).passes)}; run in that order; fuse-ort joins "
        "them for --engine onnxruntime in fp32 unless --portable)",
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
    c.add_argument(
        "--shapes",
        nargs="+",
        metavar="AXIS=MIN:OPT:MAX",
        help="input shapes a TensorRT / TensorRT-RTX engine accepts, per axis (batch, seq); default batch=1:B:8 and "
        "seq=1:S:2048 (B, S: the first profiled --batch / --seq; 2048 capped at the model's max positions)",
    )
    c.add_argument("--gpu", nargs="+", help=f"target GPUs for predictions (default: the whole catalog): {_gpu_help()}")
    c.add_argument("--feeds", type=Path, nargs="+", help=".npz/.safetensors feeds to verify with")
    c.add_argument("--threads", type=int, help="ONNX Runtime threads for timing")
    c.add_argument("--tolerance", type=float, help="relative tolerance of an exact pipeline (default 1e-4)")
    c.add_argument(
        "--profile-budget", type=float, metavar="S", help="seconds of timing per profiled shape at most (default 10)"
    )
    c.add_argument(
        "--memory-limit-gib",
        type=float,
        help="refuse profiling shapes estimated to need more memory than this (default: half of this machine's)",
    )
    c.add_argument("--no-profile", action="store_true", help="skip latency measurement")
    c.add_argument(
        "--quality-windows",
        type=_non_negative_int,
        metavar="N",
        help="report quality (compiled vs reference, and vs dense when masks were applied) on N windows of the "
        "bundled evaluation text: 128 tokens each for LMs (KL, top-1, perplexity), 8 sentences for encoders "
        "(embedding cosine); 0 turns it off (default 4)",
    )
    c.add_argument(
        "--genai",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write OUT/genai/ for onnxruntime-genai (default: on for causal LMs from a model folder, GGUF or name)",
    )
    c.add_argument(
        "--portable",
        action="store_true",
        help="standard ONNX ops only in model.onnx (no fuse-ort, which ONNX Runtime compiles run by default)",
    )
    c.add_argument(
        "--hf-checkpoint",
        action="store_true",
        help="write OUT/hf/: a physically smaller transformers checkpoint (uniform per-layer widths only)",
    )
    c.add_argument(
        "--verify-mode",
        choices=["auto", "whole", "blockwise"],
        help="whole models, one decoder block at a time, or auto (blockwise when two fp32 copies do not fit)",
    )
    c.add_argument("--no-export-cache", action="store_true", help="export again even when a cached export exists")
    c.add_argument("--export-cache-dir", type=Path, help="where exports are cached (default ~/.cache/prune2deploy)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    c.add_argument("--quiet", action="store_true", help="only the result: no progress lines, library bars or warnings")
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("generate", help="generate text from a compiled causal LM (OUT/genai)")
    g.add_argument("out", type=Path, help="compile output folder (or its genai/ folder)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--engine", default="auto", choices=["auto", "genai", "onnxruntime"])
    g.add_argument("--sample", action="store_true", help="sample instead of greedy (onnxruntime-genai)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    g.add_argument("--threads", type=int, help="ONNX Runtime threads (onnxruntime engine)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="compile a bundled real model with 50%% of its MLP channels masked")
    d.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "minilm-l6"])
    d.add_argument("--ratio", type=float, default=0.5, help="fraction of MLP channels to mask (by magnitude)")
    d.add_argument("--out", default="build/demo")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument(
        "--profile-budget", type=float, default=20.0, metavar="S", help="seconds of timing at most (default 20)"
    )
    d.add_argument("--quiet", action="store_true", help="only the result: no progress lines, library bars or warnings")
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
    q.add_argument("--samples", type=_positive_int, default=24)
    q.add_argument("--seq-len", type=_positive_int, default=128)
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
    p.add_argument("--batch", type=_positive_int, nargs="+", default=[1])
    p.add_argument(
        "--seq",
        type=_positive_int,
        nargs="+",
        help="sequence lengths (default 128, or the model's position-table length)",
    )
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--budget", type=_positive_float, default=10.0, help="seconds per grid point at most")
    p.add_argument("--ops", action="store_true", help="also ONNX Runtime's per-op-type breakdown")
    p.add_argument("--memory-limit-gib", type=_positive_float, help="refuse shapes estimated to need more memory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_profile)

    r = sub.add_parser("predict", help="predicted latency per target GPU (engine-aware cost model + roofline bound)")
    r.add_argument("model", type=Path, help="ONNX file, or an HF config.json / folder for shape-only prediction")
    r.add_argument("--against", type=Path, help="reference ONNX for a side-by-side speedup")
    r.add_argument(
        "--gpu", nargs="+", help=f"GPU names or unambiguous prefixes (default: whole catalog): {_gpu_help()}"
    )
    r.add_argument("--precision", default="fp16", choices=["fp32", "tf32", "fp16", "bf16", "fp8", "int8"])
    r.add_argument("--engine", default="tensorrt", choices=["tensorrt", "onnxruntime", "torch", "llama.cpp"])
    r.add_argument("--batch", type=_positive_int, nargs=1, default=[1])
    r.add_argument("--seq", type=_positive_int, nargs=1, help="sequence length (default 128, or the model's bound)")
    r.add_argument("--decode", action="store_true", help="one decode step (decoders) instead of a prefill")
    r.add_argument("--past", type=_non_negative_int, default=0, help="tokens already in the KV cache for --decode")
    r.add_argument("--plan", type=Path, help="pruning plan YAML: per-layer widths for shape-only prediction")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_predict)

    ps = sub.add_parser("passes", help="the registered passes: order, default pipeline, exactness, flags")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_passes)

    v = sub.add_parser("verify", help="compare a compiled ONNX with its reference on ONNX Runtime CPU")
    v.add_argument("model", type=Path)
    v.add_argument("--reference", type=Path, required=True)
    v.add_argument("--feeds", type=Path, nargs="+")
    v.add_argument("--tolerance", type=_tolerance, default=1e-4)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    return parser


def _raise_interrupt(signum, frame):  # the signal handler's signature
    raise KeyboardInterrupt(f"signal {signum}")


def _internal_error(exc: BaseException) -> int:
    """Exit code 3: a bug. The traceback goes to a file (its path is printed), not over the user's screen."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        folder = Path(tempfile.gettempdir()) / "prune2deploy"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f"crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt", dir=folder, text=True
        )
        with open(fd, "w") as handle:
            handle.write(f"prune2deploy {__version__}\nargv: {sys.argv}\n\n{text}")
        where = f"the traceback is in {name}"
    except OSError:
        where = "the traceback follows:\n" + text
    print(
        f"internal error: {type(exc).__name__}: {str(exc)[:300]}\nThis is a bug in prune2deploy; please report it "
        f"with the traceback: {where}",
        file=sys.stderr,
    )
    return 3


def _os_error(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"error: cannot read or write{where}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 verification failed (and only that), 2 bad input, option or missing engine,
    3 internal error (a bug: the traceback is saved to a file whose path is printed), 130 interrupted
    (Ctrl-C or SIGTERM)."""
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
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
    except (OSError, MemoryError) as exc:  # a read-only folder, a full disk: the user's environment
        if args.debug:
            raise
        message = _os_error(exc) if isinstance(exc, OSError) else "error: out of memory; try smaller --batch/--seq"
        print(message, file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        return _internal_error(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
