"""The engine protocol: lazy about imports, explicit about what it needs.

An engine turns a compiled ONNX file into something that runs (an ONNX Runtime session, a TensorRT plan,
a torch module). ``available()`` never raises and never imports an optional dependency at module import
time; building or running on a machine that lacks the engine raises :class:`EngineUnavailable` with what to
install.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["Availability", "BuildOptions", "BuildResult", "Engine", "PrecisionConverter", "Runner", "ShapeRanges"]

#: input name → (min, opt, max) shapes of an optimization profile.
ShapeRanges = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

#: (model, precision, keep_fp32_ops) → record: converts an onnx_ir model in place. The compile driver
#: passes the pipeline's converter; engines never import passes.
PrecisionConverter = Callable[[Any, str, Any], dict[str, Any]]


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
    profiles (TensorRT); ONNX Runtime ignores it. ``extra`` holds the engine's own options (its
    ``options_type`` fields), from ``--engine-option KEY=VALUE`` or a config file's ``engine_options``.
    ``convert_precision`` is how an engine whose precision comes from tensor types gets an fp16/bf16 graph.
    """

    precision: str = "fp32"
    sparse_weights: bool = False
    threads: int | None = None
    shape_ranges: ShapeRanges = field(default_factory=dict)
    work_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    convert_precision: PrecisionConverter | None = None


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
    """Base of every engine.

    ``options_type`` is the dataclass of the engine's own options (validated from ``BuildOptions.extra``
    by its ``from_extra`` classmethod); ``needs_shape_ranges`` says whether builds need optimization
    profiles, which :meth:`shape_ranges` derives from the model's inputs.
    """

    name: ClassVar[str] = "engine"
    options_type: ClassVar[type | None] = None
    needs_shape_ranges: ClassVar[bool] = False

    @classmethod
    def check_options(cls, extra: Mapping[str, Any]) -> None:
        """Raises ConfigError for options this engine does not have or values it cannot take."""
        from prune2deploy.errors import ConfigError

        if cls.options_type is None:
            if extra:
                raise ConfigError(f"engine {cls.name} has no engine options; got {sorted(extra)}")
            return
        cls.options_type.from_extra(extra)

    @classmethod
    def shape_ranges(
        cls,
        inputs: Sequence[tuple[str, Sequence[int | None]]],
        *,
        batches: Sequence[int],
        seqs: Sequence[int],
        axes: Mapping[str, Sequence[int]] | None = None,
    ) -> ShapeRanges:
        """(min, opt, max) per input from its static dims: axis 0 is the batch, the other dynamic axes are
        sequence-like. ``axes`` (``{"batch": (min, opt, max), "seq": (...)}``) gives the ranges a deployment
        needs; without it, min is 1 and opt / max come from the profiling grid (``batches``, ``seqs``).
        Engines without optimization profiles return nothing."""
        if not cls.needs_shape_ranges:
            return {}
        axes = dict(axes or {})
        batch = tuple(axes.get("batch") or (1, batches[0], max(batches)))
        seq = tuple(axes.get("seq") or (1, seqs[0], max(seqs)))
        ranges: ShapeRanges = {}
        for name, dims in inputs:
            lo, opt, hi = [], [], []
            for index, dim in enumerate(dims):
                span = (dim, dim, dim) if dim is not None else batch if index == 0 else seq
                lo.append(span[0]), opt.append(span[1]), hi.append(span[2])
            ranges[name] = (tuple(lo), tuple(opt), tuple(hi))
        return ranges

    @classmethod
    @abc.abstractmethod
    def available(cls) -> Availability: ...

    @abc.abstractmethod
    def build(self, model_path: Path, options: BuildOptions) -> BuildResult: ...

    @abc.abstractmethod
    def runner(self, built: BuildResult) -> contextlib.AbstractContextManager[Runner]: ...
