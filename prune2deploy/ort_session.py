"""ONNX Runtime sessions with the settings every part of the tool shares (analysis probes, verification,
profiling, the ONNX Runtime engine).

It sits below the analysis and verification layers so that they can run a model without depending on the
engines package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.errors import BadInputError

__all__ = ["SessionRunner", "disable_telemetry", "make_session", "release_memory"]


def disable_telemetry() -> None:
    """Keeps ONNX Runtime and onnxruntime-genai from writing their telemetry event store.

    Both write ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/`` (a device id and ``onnxruntime.db`` /
    ``onnxruntime-genai.db``) when they are *imported* (measured: onnxruntime 1.32, onnxruntime-genai 0.18),
    so ``onnxruntime.disable_telemetry_events()`` comes too late; ``ORT_DISABLE_TELEMETRY=1``, read at load,
    stops both. Set only when the user has not set it (``ORT_DISABLE_TELEMETRY=0`` keeps telemetry on); the
    CLI calls this first thing, and every place that imports either library calls it before the import.
    """
    import os
    import sys

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if os.environ["ORT_DISABLE_TELEMETRY"] != "0" and "onnxruntime" in sys.modules:  # imported already
        getattr(sys.modules["onnxruntime"], "disable_telemetry_events", lambda: None)()


#: Below this much anonymous memory, :func:`release_memory` does nothing: what it could free cannot move a
#: peak that matters, and a full collection costs ~0.3 s once torch and transformers are imported (630k
#: objects; seven per compile, 2 s of a small model's 12 s compile).
RELEASE_ABOVE_BYTES = 2 << 30


def release_memory() -> None:
    """Collects dropped sessions and hands freed heap memory back to the system.

    glibc keeps freed chunks below its mmap threshold (which grows to 32 MB as large blocks are freed) in the
    process heap: after a 1B model's session is dropped, gigabytes of its weights' pages can stay resident
    and the next session's land beside them. ``malloc_trim(0)`` returns them; elsewhere (no glibc) only the
    collection runs. Skipped while the process holds less than :data:`RELEASE_ABOVE_BYTES` of anonymous
    memory (Linux; elsewhere it always runs).
    """
    import gc

    anonymous = _anonymous_bytes()
    if anonymous is not None and anonymous < RELEASE_ABOVE_BYTES:
        return
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _anonymous_bytes() -> int | None:
    """The process's anonymous resident memory (RssAnon), or None where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def make_session(
    model: Path | bytes,
    *,
    threads: int | None = None,
    providers: list[str] | None = None,
    profile: bool = False,
    prepack: bool = True,
    optimize: bool = True,
):
    """Creates an InferenceSession with full graph optimisation (none when ``optimize`` is False).

    ``threads`` fixes intra-op threads so that dense and compiled models are timed alike. ``prepack=False``
    keeps ONNX Runtime from repacking constant MatMul/Gemm weights into blocked copies of its own: faster
    kernels, but a second copy of every weight in anonymous memory (about 4.9 GB for a 1B fp32 model, beside
    the mapped originals). Sessions that run a model a few times to check it (verification, quality) turn it
    off; sessions that are timed keep it. ``optimize=False`` runs the graph as written: verification uses it
    to evaluate a model with its arithmetic reordered (ONNX Runtime's fusions undone), which measures how far
    float rounding alone moves the outputs.
    """
    disable_telemetry()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if profile:
        so.enable_profiling = True
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(
            str(model) if isinstance(model, Path) else model,
            sess_options=so,
            providers=providers or ["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
        where = str(model) if isinstance(model, Path) else "<in-memory model>"
        raise BadInputError(f"ONNX Runtime cannot load {where}: {exc}") from exc


class SessionRunner:
    """Runs an ONNX Runtime session on feeds by name and returns every output (or ``outputs``) by name.

    The one "session → outputs" adapter: verification's reference and compiled runs, the compile driver's
    engine checks and the ONNX Runtime engine's runner all hold a session the same way, so that what is
    compared is always keyed by output name in the session's own order. Feeds the session does not read are
    dropped when ``only_known_inputs`` is set (a block of a model reads a subset of the whole model's feeds).
    """

    def __init__(self, session: Any, outputs: Sequence[str] | None = None, *, only_known_inputs: bool = False) -> None:
        self.session = session
        self.names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
        self._known = {i.name for i in session.get_inputs()} if only_known_inputs else None

    @property
    def input_names(self) -> list[str]:
        """The session's inputs, in its order."""
        return [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; ONNX Runtime's own errors are raised unchanged (callers say whose run failed)."""
        given = dict(feeds) if self._known is None else {k: v for k, v in feeds.items() if k in self._known}
        return dict(zip(self.names, self.session.run(self.names, given), strict=True))
