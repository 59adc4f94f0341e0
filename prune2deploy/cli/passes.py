"""``prune2deploy passes``: the registered passes, in pipeline order."""

from __future__ import annotations

import argparse

from prune2deploy.cli.flags import HelpFormatter
from prune2deploy.cli.render import table
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "run"]

DESCRIPTION = "The registered passes, in pipeline order: what they do, whether they are exact, their flags."


def add_parser(sub: argparse._SubParsersAction) -> None:
    ps = sub.add_parser(
        "passes", help="the registered passes: order, default pipeline, exactness, flags", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    ps.add_argument("--json", action="store_true", help="print the registry as JSON")
    ps.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    specs = api.pass_specs()
    defaults = set(api.CompileOptions().passes)
    if args.json:
        rows = [
            {
                "pass": name, "order": spec.order, "default": name in defaults, "exact": spec.exactness,
                "summary": spec.summary,
                "options": {k: {"flag": o.flag, "default": o.default, "help": o.help} for k, o in spec.options.items()},
                "switch": spec.switch[0] if spec.switch else None,
            }
            for name, spec in specs.items()
        ]  # fmt: skip
        print(dumps_json(rows, indent=2))
        return 0
    rows = []
    for name, spec in specs.items():
        flags = [o.flag for o in spec.options.values() if o.flag] + ([spec.switch[0]] if spec.switch else [])
        rows.append([name, "yes" if name in defaults else "", spec.exactness, " ".join(flags) or "-"])
    print(table(rows, ["pass", "default", "exact", "flags"]))
    for name, spec in specs.items():
        print(f"\n{name}: {spec.summary}")
    return 0
