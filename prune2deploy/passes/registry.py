"""The pass registry: every pass module declares itself here, and everything else reads it.

A pass module ends with one :func:`register_pass` call naming the pass, its place in the pipeline, its
options (typed, with defaults, help text and CLI flags), when it switches on, and how to build it from the
options. The compile options (``spec.py``), the CLI's flags, the pipeline's order and the README's table
all come from these declarations, so adding a pass means adding its module (and its test) — nothing else.
Modules of this package are discovered by name (:func:`load_passes`); a module that registers nothing is a
helper.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prune2deploy.errors import ConfigError

__all__ = ["PassOption", "PassSpec", "default_passes", "get_pass", "load_passes", "pass_names", "register_pass"]


@dataclass(frozen=True)
class PassOption:
    """One option of a pass: a key in compile options and config files, and optionally a CLI flag.

    Attributes:
        type: the value's type as pydantic validates it (``int``, ``list[int] | None``, ``Literal[...]``).
        default: the value when unset (a list default is copied per use).
        help: one line for ``--help`` and the docs.
        flag: the CLI flag (``"--drop-layers"``); None: config file and Python API only.
        parse: turns the flag's string into the value (default: the type's own parsing by pydantic).
        metavar: the flag's placeholder in ``--help``.
        enables: giving the option a non-default value switches the pass on.
        constraints: pydantic ``Field`` constraints (``{"ge": 1}``).
    """

    type: Any
    default: Any
    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    enables: bool = False
    constraints: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    """A pass as the rest of the tool sees it.

    Attributes:
        name: the pass's key (``--passes``, reports).
        order: position in the pipeline (lower runs first): layers first (less to analyse), precision last.
        exactness: for people (README, ``--help``): when the pass is exact.
        summary: what it removes or changes, one line.
        build: options → a configured pass instance (``options`` has every registered option as an
            attribute, plus the core compile options such as ``precision``).
        options: key → :class:`PassOption`.
        default: part of the default pipeline (the exact structural passes, which do nothing where
            nothing is zero).
        switch: a CLI flag that only switches the pass on (``--sparse-2-4``), with its help text.
        auto: core option values → whether the pass joins the pipeline by itself for them (fuse-ort: the
            ONNX Runtime engine in fp32, unless ``portable``). Unlike an option that ``enables`` it, this is
            not a request: a pass that joined this way may find nothing to change.
        check: options → None, or raises :class:`ConfigError` when the options cannot work together.
    """

    name: str
    order: int
    exactness: str
    summary: str
    build: Callable[[Any], Any]
    options: Mapping[str, PassOption] = field(default_factory=dict)
    default: bool = False
    switch: tuple[str, str] | None = None
    auto: Callable[[Mapping[str, Any]], bool] | None = None
    check: Callable[[Any], None] | None = None

    def enabled_by(self, values: Mapping[str, Any]) -> bool:
        """Whether options given a non-default value switch this pass on."""
        for key, option in self.options.items():
            if option.enables and key in values and values[key] not in (None, [], (), option.default):
                return True
        return False


_REGISTRY: dict[str, PassSpec] = {}
_LOADED = False


def register_pass(spec: PassSpec) -> PassSpec:
    """Adds a pass; its option keys must not collide with another pass's (config keys are flat)."""
    for other in _REGISTRY.values():
        if other.name == spec.name:
            continue
        shared = set(other.options) & set(spec.options)
        if shared:
            raise RuntimeError(f"passes {other.name} and {spec.name} both declare option(s) {sorted(shared)}")
    _REGISTRY[spec.name] = spec
    return spec


def load_passes() -> dict[str, PassSpec]:
    """Imports every module of the passes package once, so each registers itself; name → spec, in order."""
    global _LOADED
    if not _LOADED:
        import prune2deploy.passes as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("base", "registry"):
                importlib.import_module(f"{package.__name__}.{info.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))


def pass_names() -> tuple[str, ...]:
    """Every registered pass, in pipeline order."""
    return tuple(load_passes())


def default_passes() -> tuple[str, ...]:
    """The default pipeline: the exact structural passes."""
    return tuple(name for name, spec in load_passes().items() if spec.default)


def get_pass(name: str) -> PassSpec:
    """The spec of one pass; an unknown name is a :class:`ConfigError` that lists the known ones."""
    passes = load_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass '{name}'; choose from {', '.join(passes)}")
    return passes[name]
