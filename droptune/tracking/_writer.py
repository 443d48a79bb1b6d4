"""A background writer for MLflow runs of ended trials.

A population round ends P trials at once; writing their runs (``log_batch`` of params, tags and
per-epoch metrics, then ``set_terminated``: ~30-50 ms each on a local SQLite store) in line would
keep the device idle for seconds per round. The worker instead tells Optuna (the record that
counts) and hands the MLflow part to this thread, which writes while the next round trains.
Backlog is bounded by the caller (``drain`` before handing over the next round), and the worker
drains the writer before it exits. A worker killed with items still queued leaves those runs
RUNNING without their metrics; ``droptune run`` closes them when it ends and ``droptune sync``
completes them from the trials.
"""

from __future__ import annotations

from collections.abc import Callable
import logging
import queue
import threading


__all__ = ["TrackingWriter"]

log = logging.getLogger(__name__)


class TrackingWriter:
    """One daemon thread running submitted callables in order; errors are logged, never raised
    (each callable records its own tracking failures)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="droptune-tracking-writer", daemon=True
                )
                self._thread.start()
        self._queue.put(job)

    def drain(self) -> None:
        """Wait until every submitted job has run."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Drain, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.join()
        self._queue.put(None)
        thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # a job records its own failures; never kill the thread
                log.exception("writing an MLflow run failed")
            finally:
                self._queue.task_done()
