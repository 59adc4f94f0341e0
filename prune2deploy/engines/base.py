"""The engine protocol: lazy about imports, explicit about what it needs.

An engine turns a compiled ONNX file into something that runs (an ONNX Runtime session, a TensorRT plan,
a torch module). ``available()`` never raises and never imports an optional dependency at module import
time; building or running on a machine that lacks the engine raises :class:`EngineUnavailable` with what to
install.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Availability", "BuildOptions", "BuildResult", "Engine", "Runner"]


@dataclass(frozen=True)
class Availability:
    """Whether an engine can build and run here, and if not, why and how to fix it."""

    can_build: bool
    can_run: bool
    reason: str = ""
    install_hint: str = ""


@dataclass
class BuildOptions:
    """Options shared by engines; an engine ignores what it does not support and says so in its log.

    ``shape_ranges`` maps an input name to (min, opt, max) shapes for engines that need optimization
    profiles (TensorRT); ONNX Runtime ignores it.
    """

    precision: str = "fp32"
    sparse_weights: bool = False
    threads: int | None = None
    shape_ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    work_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildResult:
    """What a build produced: the artifact path (or the model itself) and its log/metadata."""

    engine: str
    artifact: Path | None
    info: dict[str, Any] = field(default_factory=dict)
    handle: Any = None


class Runner(abc.ABC):
    """Runs one built engine on numpy feeds and returns numpy outputs by name."""

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]: ...

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def synchronize(self) -> None:  # noqa: B027 - optional hook, CPU runners need nothing
        """Waits for queued device work (no-op on CPU engines); timing calls this before reading clocks."""


class Engine(abc.ABC):
    """Base of every engine."""

    name: str = "engine"

    @classmethod
    @abc.abstractmethod
    def available(cls) -> Availability: ...

    @abc.abstractmethod
    def build(self, model_path: Path, options: BuildOptions) -> BuildResult: ...

    @abc.abstractmethod
    def runner(self, built: BuildResult) -> contextlib.AbstractContextManager[Runner]: ...
