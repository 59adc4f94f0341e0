"""Peak memory while a model runs: process RSS high-water and, for torch on CUDA, allocator peak.

The kernel's own high-water mark (``ru_maxrss``) covers the whole life of the process, so it cannot tell
the reference model from the compiled one when both run in one process. A background thread samples RSS
instead, only while one model runs. RSS is per process: what a model's peak includes (weights of other
sessions, Python itself) is reported next to how much it grew, so readers can tell the two apart.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType

__all__ = ["PeakMemory"]

log = logging.getLogger(__name__)

_MB = 1024 * 1024


class PeakMemory:
    """Context manager that records peak RSS (and CUDA allocator peak) over its body.

    Samples RSS every ``interval_s`` in a daemon thread, plus once on entry and once on exit so that a
    body shorter than one interval still gets a value. CUDA is read only when torch is already imported
    (a runner that uses it imported it) and ``torch.cuda.is_available()``: measuring never imports torch.

    Attributes:
        start_rss_mb: RSS on entry.
        peak_rss_mb: highest RSS sampled inside the body.
        peak_cuda_mb: ``torch.cuda.max_memory_allocated()`` over the body, or None without torch CUDA.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start_rss_mb: float | None = None
        self.peak_rss_mb: float | None = None
        self.peak_cuda_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = None
        self._peak_bytes = 0

    @property
    def increase_mb(self) -> float | None:
        """How much RSS grew over the body: the part of the peak this body is responsible for."""
        if self.start_rss_mb is None or self.peak_rss_mb is None:
            return None
        return max(0.0, self.peak_rss_mb - self.start_rss_mb)

    def _sample(self) -> None:
        try:
            rss = self._process.memory_info().rss
        except Exception:  # a sampler must never break a measurement
            return
        self._peak_bytes = max(self._peak_bytes, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @staticmethod
    def _torch_cuda():
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        try:
            return torch.cuda if torch.cuda.is_available() else None
        except Exception:  # broken CUDA driver: report no CUDA numbers
            return None

    def __enter__(self) -> PeakMemory:
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:
            log.warning("psutil is not installed: peak RSS is not measured (pip install psutil)")
            self._process = None
        if self._process is not None:
            self._sample()
            self.start_rss_mb = self._peak_bytes / _MB
            self._thread = threading.Thread(target=self._loop, name="p2d-rss-sampler", daemon=True)
            self._thread.start()
        cuda = self._torch_cuda()
        if cuda is not None:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self.peak_rss_mb = self._peak_bytes / _MB
        cuda = self._torch_cuda()
        if cuda is not None:
            cuda.synchronize()
            self.peak_cuda_mb = cuda.max_memory_allocated() / _MB
