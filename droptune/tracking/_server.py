"""Start an MLflow tracking server / UI on a store, bound to 127.0.0.1 by default.

Lean settings measured here: ``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``
give 2 processes and about 0.5 GiB instead of 15 processes and 2.5 GiB, and answer ``/health``
in 7–12 s on two cores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from droptune.exceptions import TrackingError
from droptune.storage import mask_url


__all__ = ["MlflowServer", "free_port", "start_server"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the server's process, before it runs: ask Linux to send it SIGTERM when the process
    that started it dies (``droptune ui`` killed with SIGKILL would otherwise leave the server
    running, its port taken). Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class MlflowServer:
    """A running ``mlflow server`` process."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and every process it started (its own process group)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_server(
    backend_store_uri: str,
    artifacts: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    allowed_hosts: str | None = None,
    log_path: Path | None = None,
    wait: float = 120.0,
) -> MlflowServer:
    """Start ``mlflow server`` on a backend store, serving artifacts from ``artifacts``, and
    wait until ``/health`` answers.

    Raises:
        TrackingError: The server exited or did not answer within ``wait`` seconds (the message
            ends with its log).
    """
    port = port or free_port(host)
    artifacts.mkdir(parents=True, exist_ok=True)
    if backend_store_uri.startswith("sqlite:///"):
        Path(backend_store_uri.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    log_path = log_path or artifacts.parent / f"mlflow-server-{port}.log"
    # The backend store URI goes through the environment (``mlflow server`` reads
    # MLFLOW_BACKEND_STORE_URI), never the command line, where ``ps`` would show its password.
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--artifacts-destination",
        str(artifacts.resolve()),
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
    }
    with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = MlflowServer(process, host, port, log_path)
    deadline = time.time() + wait
    while time.time() < deadline:
        if process.poll() is not None:
            break
        if _healthy(server.url):
            return server
        time.sleep(0.5)
    server.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise TrackingError(
        f"mlflow server on {mask_url(backend_store_uri)} did not start on {host}:{port}:\n{tail}"
    )
