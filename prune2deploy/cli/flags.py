"""Flags from option declarations, the value types of hand-written flags, and the help formatter.

The ``compile`` flags are generated from the compile options' declarations (``spec.CORE_OPTIONS`` and each
pass's registration): their type, default, help, metavar and the flag itself are declared once, there.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

__all__ = [
    "HelpFormatter",
    "add_option_flags",
    "add_switch_flags",
    "non_negative_int",
    "option_values",
    "positive_float",
    "positive_int",
    "relative_tolerance",
    "switched_passes",
    "thread_count",
]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default where the default says something (not None, off or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "(default" in text
            or default in (None, False, argparse.SUPPRESS)
            or (isinstance(default, (list, tuple, dict)) and not default)
        ):
            return text
        return f"{text} (default: {shown_default(default).replace('%', '%%')})"


def shown_default(value: Any, *, comma: bool = False) -> str:
    """A default as a person types it: lists space-separated (comma-separated for comma lists)."""
    if isinstance(value, (list, tuple)):
        return ("," if comma else " ").join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={shown_default(v, comma=True)}" for k, v in value.items())
    return str(value)


def add_option_flags(parser: argparse.ArgumentParser, options: Mapping[str, Any], tags: Mapping[str, str]) -> None:
    """A flag for every declared option that has one (``dest`` is the option key, default None: not given).

    ``tags``: option key → a word appended to its help (the pass that declares it).
    """
    for key, option in options.items():
        if not option.flag:
            continue
        kwargs = _flag_kwargs(option)
        text = option.help + (f" [{tags[key]}]" if key in tags else "")
        if option.type is not bool and option.default not in (None, [], {}) and not option.flag.startswith("--no-"):
            text += f" (default: {shown_default(option.default, comma=option.parse is not None)})"
        parser.add_argument(option.flag, dest=key, default=None, help=text.replace("%", "%%"), **kwargs)


def _flag_kwargs(option: Any) -> dict[str, Any]:
    """argparse's action, nargs, type, choices and metavar for one declared option."""
    if option.type is bool:  # --portable sets True; --no-profile sets False
        return {"action": "store_const", "const": not option.flag.startswith("--no-")}
    if option.type == (bool | None):
        return {"action": argparse.BooleanOptionalAction}
    many = getattr(option, "many", None)
    element = option.type
    kwargs: dict[str, Any] = {}
    if many == "+":
        kwargs["nargs"] = "+"
        if typing.get_origin(option.type) is list:
            element = typing.get_args(option.type)[0]
    elif many == "append":
        kwargs["action"] = "append"
    choices = getattr(option, "choices", None)
    if choices is None and typing.get_origin(element) is typing.Literal:
        choices = typing.get_args(element)
    if choices is not None:
        kwargs["choices"] = list(choices)
    else:
        kwargs["type"] = option.parse or _validator(element)
    if option.metavar:
        kwargs["metavar"] = option.metavar
    return kwargs


def _validator(kind: Any) -> Callable[[str], Any]:
    """An argparse type that reads a flag's text as ``kind`` (int, float, Path …), ranges left out: those are
    checked with the options, in messages that name the option (exit code 2 from ``main``, like a config file's)."""
    import pydantic

    adapter = pydantic.TypeAdapter(_plain(kind))

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except pydantic.ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{exc.errors()[0]['msg']}, not '{text}'") from None

    return parse


def _plain(kind: Any) -> Any:
    """``kind`` without its constraints: ``PositiveInt`` → ``int``, ``PositiveFloat | None`` → ``float | None``."""
    if typing.get_origin(kind) is Annotated:
        return _plain(typing.get_args(kind)[0])
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        plain = tuple(_plain(k) for k in typing.get_args(kind))
        return typing.Union[plain]  # noqa: UP007 (built from a tuple)
    return kind


def option_values(args: argparse.Namespace, options: Mapping[str, Any]) -> dict[str, Any]:
    """Option key → value of every flag given (a declared ``collect`` turns a list of values into one)."""
    values: dict[str, Any] = {}
    for key, option in options.items():
        value = getattr(args, key, None) if option.flag else None
        if value is not None:
            collect = getattr(option, "collect", None)
            values[key] = collect(value) if collect else value
    return values


def _switch_dest(name: str) -> str:
    return "switch_" + name.replace("-", "_").replace(":", "_")


def add_switch_flags(parser: argparse.ArgumentParser, specs: Mapping[str, Any]) -> None:
    """Each pass's switch (``--sparse-2-4``): a flag that only asks for the pass."""
    for name, spec in specs.items():
        if spec.switch:
            flag, text = spec.switch
            parser.add_argument(flag, dest=_switch_dest(name), action="store_true", help=f"{text} [{name}]")


def switched_passes(args: argparse.Namespace, specs: Mapping[str, Any]) -> list[str]:
    """The passes whose switch was given."""
    return [name for name, spec in specs.items() if spec.switch and getattr(args, _switch_dest(name), False)]


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def thread_count(text: str) -> int:
    """An argparse type: threads from 1 to :func:`prune2deploy.limits.max_threads` (a few per core)."""
    from prune2deploy.limits import THREADS_PER_CORE, max_threads

    value = positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(
            f"must be at most {max_threads()} ({THREADS_PER_CORE} per core on this machine), not {value}"
        )
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not '{text}'") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


def relative_tolerance(text: str) -> float:
    """An argparse type: a relative tolerance, between 0 and 1 (exclusive)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"a relative tolerance is between 0 and 1 (exclusive), not {text}")
    return value
