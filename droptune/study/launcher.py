"""Local ``droptune worker`` processes, as ``droptune run`` and ``droptune stack up`` start them.

One command line and one environment for both: the storage URL goes in ``DROPTUNE_STORAGE``,
never on a command line ``ps`` shows; workers start with ``python -P`` so the working directory
is not importable (a user's code comes from the spec's ``code_dir``, as for the console
script); each worker gets its own owner name (``<prefix>-<index>``), which the study's reaper
uses to fail exactly the trials that worker left RUNNING.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
import os
from pathlib import Path
import subprocess
import sys
from typing import Any


__all__ = ["WorkerLaunch", "start_worker", "start_workers", "worker_command"]

STORAGE_ENV = "DROPTUNE_STORAGE"


@dataclass(frozen=True)
class WorkerLaunch:
    """What every worker of one launch shares."""

    spec_path: str
    study_name: str
    storage_url: str
    #: The study's trial budget (recorded with the study; workers check it).
    n_trials: int
    #: ``<prefix>-<index>`` is each worker's owner name.
    prefix: str
    deadline: float | None = None
    graceful: bool = False
    population: int | None = None


def worker_command(launch: WorkerLaunch, index: int, overrides: Mapping[str, Any]) -> list[str]:
    """The ``droptune worker`` command line of worker ``index``."""
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "droptune.cli",
        "worker",
        launch.spec_path,
        "--study-name",
        launch.study_name,
        "--owner",
        f"{launch.prefix}-{index}",
        "--worker-index",
        str(index),
        "--n-trials",
        str(launch.n_trials),
    ]
    if launch.deadline is not None:
        cmd += ["--deadline", repr(launch.deadline)]
    if launch.graceful:
        cmd.append("--graceful")
    if launch.population and launch.population > 1:
        cmd += ["--population", str(launch.population)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def start_worker(
    launch: WorkerLaunch,
    index: int,
    entry: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: str | None = None,
    own_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start worker ``index`` of a plan entry (``{"overrides": ..., "env": ...}`` from
    ``plan_workers``). ``env`` defaults to this process's; with ``log_path`` its output is
    appended there (stdin closed); ``own_session`` makes it lead its own process group."""
    environ = {
        **(os.environ if env is None else env),
        **entry.get("env", {}),
        "PYTHONUNBUFFERED": "1",
        STORAGE_ENV: launch.storage_url,
    }
    cmd = worker_command(launch, index, entry.get("overrides", {}))
    if log_path is None:
        return subprocess.Popen(cmd, env=environ, cwd=cwd, start_new_session=own_session)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=cwd,
            start_new_session=own_session,
        )


def start_workers(
    launch: WorkerLaunch, plan: Sequence[Mapping[str, Any]], procs: list[subprocess.Popen[bytes]]
) -> None:
    """Start one worker per plan entry in the foreground, appended to ``procs`` as they start
    (so that an interruption meanwhile stops those already running)."""
    for index, entry in enumerate(plan):
        procs.append(start_worker(launch, index, entry))
