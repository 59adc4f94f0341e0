"""Engines by name: the one table that maps an engine's name to the class that builds and runs it.

Imports are lazy (an engine module imports its optional library only when it builds), so listing engines,
validating options and ``--help`` cost nothing. Adding an engine: its module (an :class:`Engine` subclass
with ``name``, ``options_type`` and, for engines with optimization profiles, ``shape_ranges``) and one
line here — or, for an engine that lives outside this package (a plug-in, a test), :func:`register_engine`.
"""

from __future__ import annotations

import importlib
from typing import Any

from prune2deploy.engines.base import Engine
from prune2deploy.errors import ConfigError

__all__ = ["DEFAULT_ENGINE", "engine_class", "engine_names", "make_engine", "register_engine", "unregister_engine"]

#: name → "module:class" (or the class itself, for engines registered at run time)
_ENGINES: dict[str, str | type[Engine]] = {
    "onnxruntime": "prune2deploy.engines.onnxruntime:OnnxRuntimeEngine",
    "tensorrt": "prune2deploy.engines.tensorrt:TensorRTEngine",
    "tensorrt-rtx": "prune2deploy.engines.tensorrt:TensorRTRTXEngine",
    "torch": "prune2deploy.engines.torch:TorchEngine",
}

#: The embedded default: runs everywhere, nothing to install.
DEFAULT_ENGINE = "onnxruntime"


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The class registered under ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in _ENGINES:
        raise ConfigError(f"unknown engine '{name}'; choose from {', '.join(_ENGINES)}")
    target = _ENGINES[name]
    if not isinstance(target, str):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def register_engine(name: str, target: str | type[Engine]) -> None:
    """Adds an engine under ``name`` ("module:Class", imported when first used, or the class); the CLI's
    ``--engine`` choices and option validation see it at once. A name already taken is an error."""
    if name in _ENGINES:
        raise RuntimeError(f"engine '{name}' is already registered")
    _ENGINES[name] = target


def unregister_engine(name: str) -> None:
    """Removes an engine registered with :func:`register_engine` (tests register throw-away ones)."""
    _ENGINES.pop(name, None)


def make_engine(name: str, **kwargs: Any) -> Engine:
    return engine_class(name)(**kwargs)
