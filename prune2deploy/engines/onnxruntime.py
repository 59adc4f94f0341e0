"""ONNX Runtime engine: the embedded default, CPU everywhere, CUDA where the provider exists."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from prune2deploy.engines.base import Availability, BuildOptions, BuildResult, Engine, Runner
from prune2deploy.ort_session import SessionRunner, make_session

__all__ = ["OnnxRuntimeEngine", "OrtRunner", "make_session"]

log = logging.getLogger(__name__)


class OrtRunner(SessionRunner, Runner):
    """The engine protocol's runner over :class:`~prune2deploy.ort_session.SessionRunner`.

    The session → outputs adapter lives below verification (which must not import engines); this class only
    gives it the engine ``Runner`` interface, so that both run a session in exactly one way.
    """


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
