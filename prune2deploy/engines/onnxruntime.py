"""ONNX Runtime engine: the embedded default, CPU everywhere, CUDA where the provider exists."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from prune2deploy.engines.base import Availability, BuildOptions, BuildResult, Engine, Runner
from prune2deploy.ort_session import make_session

__all__ = ["OnnxRuntimeEngine", "OrtRunner", "make_session"]

log = logging.getLogger(__name__)


class OrtRunner(Runner):
    """A thin wrapper that keeps the session and returns outputs by name."""

    def __init__(self, session) -> None:
        self.session = session
        self._outputs = [o.name for o in session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._outputs, dict(feeds))
        return dict(zip(self._outputs, values, strict=True))


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on CPU (or CUDA if ``providers`` says so). Building is creating the session."""

    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None) -> None:
        self.providers = providers or ["CPUExecutionProvider"]

    @classmethod
    def available(cls) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Availability(False, False, "onnxruntime is not installed", "pip install onnxruntime")
        return Availability(True, True)

    def build(self, model_path: Path, options: BuildOptions) -> BuildResult:
        session = make_session(Path(model_path), threads=options.threads, providers=self.providers)
        return BuildResult(
            engine=self.name,
            artifact=Path(model_path),
            info={"providers": session.get_providers(), "threads": options.threads},
            handle=session,
        )

    @contextlib.contextmanager
    def runner(self, built: BuildResult) -> Iterator[Runner]:
        yield OrtRunner(built.handle)
