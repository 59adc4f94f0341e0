"""What TensorRT's builder and runner share: options, compute-capability names, the log capture.

Imports no TensorRT module at import time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prune2deploy.errors import ConfigError

__all__ = ["CapturingLogger", "TensorRTOptions", "cuda_available", "parse_compute_capability"]

log = logging.getLogger(__name__)


@dataclass
class TensorRTOptions:
    """TensorRT-specific build options, read from ``BuildOptions.extra`` (keys are the field names).

    Attributes:
        timing_cache: file loaded before and saved after the build (standard TensorRT; a no-op in RTX).
        optimization_level: builder optimisation level 0-5 (TensorRT default 3); higher searches longer.
        profiling_verbosity: ``"detailed"`` (tactic names, ONNX node names per layer), ``"layer_names_only"``
            or ``"none"``.
        compute_capabilities: TensorRT-RTX targets, e.g. ``["sm86", "sm89"]`` or ``["8.6"]``; empty keeps
            the library's default portable set. ``"current"`` means the GPU present.
        convert_precision: where the library has no precision flags, convert a float32 ONNX with the
            ``convert-precision`` pass (True) or refuse (False).
        keep_fp32_ops: op types the conversion keeps in float32 (None: the pass's default).
        workspace_mib: workspace memory-pool limit.
        runtime_cache: TensorRT-RTX runtime (JIT kernel) cache file used by the runner.
    """

    timing_cache: Path | None = None
    optimization_level: int | None = None
    profiling_verbosity: str = "detailed"
    compute_capabilities: Sequence[str] = ()
    convert_precision: bool = True
    keep_fp32_ops: Sequence[str] | None = None
    workspace_mib: int | None = None
    runtime_cache: Path | None = None

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> TensorRTOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown TensorRT build option(s) {unknown}; known: {sorted(known)}.")
        options = cls(**dict(extra))
        if options.timing_cache is not None:
            options.timing_cache = Path(options.timing_cache)
        if options.runtime_cache is not None:
            options.runtime_cache = Path(options.runtime_cache)
        if options.optimization_level is not None and not 0 <= int(options.optimization_level) <= 5:
            raise ConfigError(f"optimization_level must be 0-5, got {options.optimization_level}.")
        if options.profiling_verbosity.lower() not in ("detailed", "layer_names_only", "none"):
            raise ConfigError(
                f"profiling_verbosity {options.profiling_verbosity!r} is not detailed, layer_names_only or none."
            )
        return options


def parse_compute_capability(text: str) -> str:
    """Normalises ``"sm86"``, ``"sm_86"``, ``"8.6"`` or ``"86"`` to the enum name ``"SM86"``."""
    cleaned = text.strip().lower().replace("_", "")
    if cleaned == "current":
        return "CURRENT"
    cleaned = cleaned.removeprefix("sm").removeprefix("compute")
    if re.fullmatch(r"\d+\.\d", cleaned):
        cleaned = cleaned.replace(".", "")
    if not re.fullmatch(r"\d{2,3}", cleaned):
        raise ConfigError(f"compute capability {text!r} is not of the form sm86, 8.6 or 86.")
    return f"SM{cleaned}"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver must not make available() raise
        return False


class CapturingLogger:
    """Builds a logger subclass of the imported module's ILogger that keeps every message."""

    @staticmethod
    def create(trt: Any) -> Any:
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.records: list[tuple[str, str]] = []

            def log(self, severity: Any, msg: str) -> None:
                name = getattr(severity, "name", str(severity))
                self.records.append((name, msg))
                if name in ("ERROR", "INTERNAL_ERROR"):
                    log.debug("TensorRT: %s", msg)

        return Logger()
