"""The stack from Python: start it in the background (:func:`start_stack`), run it in this
process (:func:`run_stack`), stop it (:func:`stop_stack`), or look at it (:class:`Stack`)."""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Any

from droptune.exceptions import DroptuneError
from droptune.exceptions import TrackingError
from droptune.processes import ProcRef
from droptune.processes import stop_refs
from droptune.stack._state import _REQUEST_ENV
from droptune.stack._state import BACKEND_ENV
from droptune.stack._state import DEFAULT_STATE_DIR
from droptune.stack._state import _prepare
from droptune.stack._state import _refs
from droptune.stack._state import _running
from droptune.stack._state import _state_path
from droptune.stack._state import read_state
from droptune.stack._supervisor import Supervisor
from droptune.storage import mask_text
from droptune.study.launcher import STORAGE_ENV


__all__ = ["Stack", "run_stack", "start_stack", "stop_stack"]


@dataclass
class Stack:
    """A detached stack, known by its state directory."""

    state_dir: Path

    @property
    def state(self) -> dict[str, Any]:
        return read_state(self.state_dir) or {}

    @property
    def url(self) -> str | None:
        """The MLflow server's URL (a password in it masked)."""
        value = self.state.get("mlflow_url")
        return str(value) if value else None

    def processes(self) -> list[ProcRef]:
        return _refs(self.state)

    def stop(self, timeout: float = 90.0) -> list[str]:
        return stop_stack(self.state_dir, timeout=timeout)


def _check_free(state_dir: Path) -> None:
    running = _running(state_dir)
    if running:
        raise DroptuneError(
            f"--state-dir: a stack already runs from {state_dir} ("
            + ", ".join(f"{ref.role} pid {ref.pid}" for ref in running)
            + f"); stop it with `droptune stack down --state-dir {state_dir}` or pass another "
            "--state-dir"
        )


def start_stack(
    spec_path: Path,
    storage_url: str | None = None,
    *,
    workers: int | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    backend_store_uri: str | None = None,
    tracking_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    allowed_hosts: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    devices: str | None = None,
    per_device: int | None = None,
    exit_when_done: bool = False,
    wait: float = 180.0,
) -> Stack:
    """Start a stack in the background and return once its workers run.

    Raises:
        DroptuneError: A bad option or spec (the message names it), an unreachable storage, a
            stack already running from ``state_dir``, or a supervisor that failed to start
            (the message ends with its log).
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_free(state_dir)
    request = _prepare(
        spec_path,
        storage_url,
        workers=workers,
        backend_store_uri=backend_store_uri,
        tracking_uri=tracking_uri,
        host=host,
        port=port,
        allowed_hosts=allowed_hosts,
        study_name=study_name,
        n_trials=n_trials,
        devices=devices,
        per_device=per_device,
        exit_when_done=exit_when_done,
    )
    _state_path(state_dir).unlink(missing_ok=True)
    log_path = state_dir / "stack.log"
    env = {k: v for k, v in os.environ.items() if k not in (STORAGE_ENV, BACKEND_ENV)}
    env[_REQUEST_ENV] = request.to_json()
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # the working directory is not importable (as for the workers)
                "-m",
                "droptune.cli",
                "stack",
                "supervise",
                "--state-dir",
                str(state_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=request.cwd,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        state = read_state(state_dir) or {}
        ours = state.get("processes", [{}])[0].get("pid") == proc.pid
        if ours and state.get("state") in ("running", "done"):
            return Stack(state_dir)
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise DroptuneError(
                f"the stack did not start (supervisor exited with {proc.returncode}); "
                f"{log_path}:\n{mask_text(tail)}"
            )
        time.sleep(0.3)
    stop_stack(state_dir)
    raise TrackingError(f"the stack did not start within {wait:.0f}s; see {log_path}")


def run_stack(
    spec_path: Path,
    storage_url: str | None = None,
    *,
    workers: int | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    backend_store_uri: str | None = None,
    tracking_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    allowed_hosts: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    devices: str | None = None,
    per_device: int | None = None,
    exit_when_done: bool = False,
) -> int:
    """Run a stack in this process until Ctrl-C/SIGTERM (or the study is done with
    ``exit_when_done``); returns 0 when the study has its trials, 130 when interrupted before,
    1 when the workers ended without it."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_free(state_dir)
    request = _prepare(
        spec_path,
        storage_url,
        workers=workers,
        backend_store_uri=backend_store_uri,
        tracking_uri=tracking_uri,
        host=host,
        port=port,
        allowed_hosts=allowed_hosts,
        study_name=study_name,
        n_trials=n_trials,
        devices=devices,
        per_device=per_device,
        exit_when_done=exit_when_done,
    )
    return Supervisor(request, state_dir, detached=False).run()


def stop_stack(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 90.0) -> list[str]:
    """Stop the stack of ``state_dir``: its supervisor first (which stops its workers, closes
    their trials and the MLflow parent run, and stops the server), then whatever is left of
    the recorded process groups (SIGTERM, then SIGKILL). Returns the roles that were running."""
    state_dir = state_dir.resolve()
    state = read_state(state_dir)
    if state is None:
        return []
    refs = _refs(state)
    running = [ref.role for ref in refs if ref.alive()]
    supervisor = [ref for ref in refs if ref.role == "supervisor"]
    stop_refs(supervisor, timeout=timeout)
    # A supervisor that was killed leaves its workers and server behind: stop them here.
    state = read_state(state_dir) or state
    stop_refs([ref for ref in _refs(state) if ref.role != "supervisor"], timeout=30)
    _state_path(state_dir).unlink(missing_ok=True)
    return running
