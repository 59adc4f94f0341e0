"""`prune2deploy` command line: a thin layer over :mod:`prune2deploy.api`.

One module per command (``add_parser`` declares its flags, ``run`` parses nothing more, calls the API and
prints); ``render`` formats numbers and tables; ``compile``'s flags are generated from the compile options'
declarations (``flags``). Exit codes: 0 done, 1 verification failed (and only that), 2 bad input / missing
engine / bad option, 3 internal error (traceback saved to a file), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prune2deploy import __version__
from prune2deploy.cli import compile as compile_command
from prune2deploy.cli import demo, generate, inspect, passes, predict, profile, prune, sweep, verify
from prune2deploy.cli.flags import HelpFormatter
from prune2deploy.errors import P2DError

__all__ = ["build_parser", "main"]

#: The commands, in the order ``--help`` lists them.
COMMANDS = (compile_command, generate, demo, prune, sweep, inspect, profile, predict, passes, verify)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: each command module adds its own."""
    parser = argparse.ArgumentParser(
        prog="prune2deploy",
        description="Deployment compiler for pruned networks: masks in, physically smaller verified models out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prune2deploy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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

    from prune2deploy.ort_session import disable_telemetry

    disable_telemetry()  # before anything imports onnxruntime: it writes its event store on import
    try:
        args = build_parser().parse_args(argv)
    except P2DError as exc:  # a value a flag's own reader refuses (--shapes seq=1)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
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
