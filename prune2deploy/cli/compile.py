"""``prune2deploy compile``: flags generated from the compile options' declarations, then api.compile."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prune2deploy.cli.flags import HelpFormatter, add_option_flags, add_switch_flags, option_values, switched_passes
from prune2deploy.cli.progress import progress
from prune2deploy.cli.summary import print_compile
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "compile_options", "run"]

DESCRIPTION = (
    "Compile a pruned model into a physically smaller, verified ONNX model (and engine): masks or a plan in, "
    "zero channels, heads and layers removed, outputs checked against the masked reference."
)


def _declarations() -> tuple[dict[str, Any], dict[str, str]]:
    """Every compile option's declaration (core, then each pass's), and option key → the pass declaring it."""
    from prune2deploy import api

    options = dict(api.CORE_OPTIONS)
    tags = {}
    for name, spec in api.pass_specs().items():
        options.update(spec.options)
        tags.update(dict.fromkeys(spec.options, name))
    return options, tags


def add_parser(sub: argparse._SubParsersAction) -> None:
    from prune2deploy import api

    c = sub.add_parser(
        "compile", help="compile a pruned model (HF folder, .gguf, .onnx, or bundled model name)",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    c.add_argument("model", help="HF model folder, .gguf file, .onnx file, or smollm2-135m / minilm-l6")
    c.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML/TOML/JSON file of compile options (flags override it)"
    )
    options, tags = _declarations()
    add_option_flags(c, options, tags)
    add_switch_flags(c, api.pass_specs())
    c.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    c.add_argument("--quiet", action="store_true", help="only the result: no progress lines, library bars or warnings")
    c.set_defaults(func=run)


def compile_options(args: argparse.Namespace):
    """Config file first, then the flags given (a dict option such as engine_options merges), then switches."""
    from prune2deploy import api

    data: dict[str, Any] = api.load_config(args.config) if args.config else {}
    for key, value in option_values(args, _declarations()[0]).items():
        merge = isinstance(value, dict) and isinstance(data.get(key), dict)
        data[key] = {**data[key], **value} if merge else value
    data = api.with_passes(data, switched_passes(args, api.pass_specs()))
    return api.CompileOptions.from_dict(data, source=str(args.config or "command line"))


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    options = compile_options(args)
    steps = progress(args.quiet or args.json)
    try:
        result = api.compile(args.model, args.out, options, progress=steps, inputs=[args.config] if args.config else [])
    finally:
        steps.close()
    if args.json:
        print(dumps_json(result.report, indent=2))
    else:
        print_compile(result.report, Path(args.out))
    return 0
