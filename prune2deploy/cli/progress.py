"""Progress of long commands: one line per step with the time since the start, a spinner or a heartbeat."""

from __future__ import annotations

__all__ = ["Steps", "progress"]


class Steps:
    """Progress of a long command: one line per step with the time since the start, and while a step runs a
    spinner with its elapsed time (rich, on a terminal) or a heartbeat line every 30 s (logs, CI).

    Called with a message when a step starts; :meth:`close` ends the last one. Silent when ``quiet``.
    """

    heartbeat_s = 30.0

    def __init__(self, quiet: bool) -> None:
        import threading
        import time

        self.quiet = quiet
        self._clock = time.perf_counter
        self._start = self._clock()
        self._step: str | None = None
        self._step_start = self._start
        self._live = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not quiet:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        self._end_step()
        now = self._clock()
        self._step, self._step_start = message, now
        self._console.print(f"· [{now - self._start:6.1f}s] {message}", markup=False)
        if self._console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self._console,
                transient=True,
            )  # fmt: skip
            self._live.start()
            self._live.add_task(message, total=None)
        else:
            import threading

            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat, args=(message, self._stop), daemon=True)
            self._thread.start()

    def _beat(self, message: str, stop) -> None:
        while not stop.wait(self.heartbeat_s):
            self._console.print(f"  … {message}: {self._clock() - self._step_start:.0f} s so far", markup=False)

    def _end_step(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Ends the last step and prints the total time."""
        if self.quiet or self._step is None:
            return
        self._end_step()
        self._console.print(f"· [{self._clock() - self._start:6.1f}s] done", markup=False)
        self._step = None


def progress(quiet: bool) -> Steps:
    """Steps for a command; ``quiet`` also silences what the libraries underneath print."""
    if quiet:
        from prune2deploy import api

        api.quiet_libraries()
    return Steps(quiet)
