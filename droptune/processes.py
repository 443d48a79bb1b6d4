"""Local processes droptune starts: who they are, whether they run, how they stop.

``droptune run`` and ``droptune stack up`` both start worker processes on this host and must
stop exactly those later, also from another process (``stack down`` reads them from a state
file). A PID alone is not an identity (the kernel reuses PIDs), so a :class:`ProcRef` holds the
PID with the process's start time (clock ticks since boot on Linux) and, for a process that leads
its own session, signals its whole process group (a worker's data loaders, the MLflow server's
uvicorn children). Zombies count as gone: an orphan's zombie may wait long for a reaper.

:class:`SignalFlag` records SIGINT/SIGTERM for a supervising loop to act on. Raising from the
handler itself is unreliable: when the signal lands in a finalizer or a weakref callback Python
swallows the exception, and the loop would miss a Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
import logging
import os
from pathlib import Path
import signal
import threading
import time
from typing import Any

import psutil


__all__ = ["ProcRef", "SignalFlag", "proc_start", "stop_refs"]

log = logging.getLogger(__name__)

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
_PROC = Path("/proc")


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
        return None


def proc_start(pid: int) -> str | None:
    """The start time of ``pid``, None if it does not run: on Linux the clock ticks since boot
    (``/proc/<pid>/stat`` field 22, which no change of the wall clock moves), elsewhere
    psutil's creation time."""
    if _PROC.is_dir():
        try:
            text = (_PROC / str(pid) / "stat").read_text()
        except (OSError, ValueError):
            return None
        return text.rsplit(")", 1)[1].split()[19]
    process = _process(pid)
    if process is None:
        return None
    try:
        return repr(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _runs(process: psutil.Process) -> bool:
    try:
        return process.status() not in _GONE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _alive(pid: int, start: str | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` (None: any) still runs."""
    process = _process(pid)
    if process is None or not _runs(process):
        return False
    return start is None or proc_start(pid) == str(start)


def _group_members(pgid: int) -> list[int]:
    """The running (not zombie) processes of process group ``pgid``."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and _runs(process):
                members.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


@dataclass
class ProcRef:
    """A process droptune started: its role, PID, start time, and whether it leads its own
    process group (then the whole group is signalled)."""

    role: str
    pid: int
    start: str | None
    group: bool = True
    log: str | None = None

    @classmethod
    def of(cls, role: str, pid: int, group: bool = True, log: str | None = None) -> ProcRef:
        return cls(role, pid, proc_start(pid), group, log)

    def pids(self) -> list[int]:
        """The running processes this reference stands for."""
        leader_alive = _alive(self.pid, self.start)
        if not self.group:
            return [self.pid] if leader_alive else []
        if not leader_alive and _alive(self.pid, None):
            return []  # the PID now belongs to another process: its group is not ours
        return _group_members(self.pid)

    def alive(self) -> bool:
        return bool(self.pids())

    def signal(self, signum: int) -> None:
        if not self.pids():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)


def stop_refs(refs: list[ProcRef], timeout: float) -> None:
    """SIGTERM every process of ``refs``; SIGKILL what is left after ``timeout`` seconds."""
    for ref in refs:
        ref.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(ref.alive() for ref in refs):
        time.sleep(0.2)
    for ref in refs:
        if ref.alive():
            log.warning(
                "%s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", ref.role, ref.pid, timeout
            )
            ref.signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(ref.alive() for ref in refs):
        time.sleep(0.1)


class SignalFlag:
    """SIGINT/SIGTERM received while :meth:`trapped`, for a loop to act on (``signum``)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a signal arrived."""
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")

    @contextlib.contextmanager
    def trapped(self) -> Iterator[None]:
        """Record SIGINT and SIGTERM instead of their default action (SIGTERM would end the
        process at once and leave its children running). Off the main thread, where Python
        allows no handler, it records nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: Any) -> None:
            self.signum = signum

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
