"""``droptune stack up|down`` end to end on this host, nothing stubbed: an MLflow server on a fresh
PostgreSQL backend store, 3 ``droptune worker`` processes on a 12-trial study in another fresh
PostgreSQL database, then exactly 12 finished trials in Optuna and 12 child runs under one parent
run in MLflow (read through the stack's own server), and after ``down`` no process left and the
port closed.

The URLs carry a password (PostgreSQL's trust authentication ignores it): it must appear on no
process's command line, in no state file and in nothing the commands print.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import json
import os
from pathlib import Path
import re
import signal
import socket
import subprocess
import time
from typing import Any
import urllib.error
from urllib.parse import urlparse
import urllib.request

from mlflow import MlflowClient
import pytest
import yaml

from tests.stack.conftest import DatabaseFactory
from tests.study.helpers import TINY
from tests.study.helpers import cli_env
from tests.study.helpers import counts
from tests.study.helpers import droptune_cmd
from tests.study.helpers import finished
from tests.study.helpers import merge
from tests.study.helpers import trials


pytestmark = pytest.mark.slow

SECRET = "stack-pw-4412"
NAME = "stacked"
N_TRIALS = 12
WORKERS = 3


def stack_cmd() -> list[str]:
    """The real ``droptune stack`` command."""
    return [*droptune_cmd(), "stack"]


def with_secret(url: str) -> str:
    return url.replace("postgres@", f"postgres:{SECRET}@")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[2] == str(pgid) and rest[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def port_open(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def host_status(url: str, host: str) -> int:
    """The HTTP status of an MLflow API request to ``url`` sent with the ``Host`` header
    ``host``."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={NAME}",
        headers={"Host": host},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class StackCli:
    """Runs ``stack`` subcommands in ``cwd`` with the URLs in the environment only."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env

    def __call__(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*stack_cmd(), *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        print(f"$ stack {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}")
        return result


@pytest.fixture
def stack_env(tmp_path: Path, new_database: DatabaseFactory) -> Iterator[dict[str, Any]]:
    storage = with_secret(new_database())
    backend = with_secret(new_database())
    spec = merge(
        TINY,
        {
            "study": {"name": NAME},
            "tracking": {"enabled": True},
            "execution": {"workers": WORKERS},
            "n_trials": N_TRIALS,
        },
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = cli_env()
    env["DROPTUNE_STORAGE"] = storage
    env["DROPTUNE_MLFLOW_BACKEND_STORE_URI"] = backend
    env.pop("MLFLOW_TRACKING_URI", None)
    state_dir = tmp_path / "stack"
    info = {"spec": spec_path, "storage": storage, "state_dir": state_dir, "env": env}
    try:
        yield info
    finally:
        # Whatever a failed test left running: kill the groups the state file names.
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((state_dir / "stack.json").read_text())
            for entry in state["processes"]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if live_members(entry["pid"]):
                        os.killpg(entry["pid"], signal.SIGKILL)


def test_stack_up_runs_the_study_with_mlflow_and_down_stops_everything(
    stack_env: dict[str, Any],
) -> None:
    started = time.monotonic()
    state_dir: Path = stack_env["state_dir"]
    stack = StackCli(stack_env["spec"].parent, stack_env["env"])

    up = stack(
        "up",
        str(stack_env["spec"]),
        "--workers",
        str(WORKERS),
        "--state-dir",
        str(state_dir),
        "--allowed-hosts",
        "stack-head,stack-head:*",
        "--detach",
    )
    assert up.returncode == 0, up.stderr[-4000:]
    assert SECRET not in up.stdout + up.stderr
    state_text = (state_dir / "stack.json").read_text()
    assert SECRET not in state_text
    state = json.loads(state_text)
    roles = [p["role"] for p in state["processes"]]
    assert roles == ["supervisor", "mlflow", *[f"worker-{i}" for i in range(WORKERS)]]
    url = state["mlflow_url"]
    parsed = urlparse(url)
    assert parsed.hostname == "127.0.0.1" and parsed.port  # bound to localhost by default
    assert f"mlflow: {url}/#/experiments/" in up.stdout

    # No password on any command line of the stack's processes (ps shows them to every user).
    pids = [pid for entry in state["processes"] for pid in live_members(entry["pid"])]
    assert len(pids) >= 2 + WORKERS
    for pid in pids:
        assert SECRET not in cmdline(pid), cmdline(pid)

    # The workers run the study to its end; then the supervisor closes the MLflow parent run.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        current = json.loads((state_dir / "stack.json").read_text())
        if current["state"] == "done":
            break
        assert live_members(state["processes"][0]["pid"]), (
            "the supervisor died:\n" + (state_dir / "stack.log").read_text()[-4000:]
        )
        time.sleep(1)
    else:
        logs = "\n".join(p.read_text()[-1500:] for p in sorted(state_dir.glob("*.log")))
        pytest.fail(f"the study did not finish in 240s; logs:\n{logs}")
    assert current["finished"] is True, current
    assert current["worker_codes"] == [0] * WORKERS

    study_trials = trials(stack_env["storage"], NAME)
    assert finished(study_trials) == N_TRIALS, counts(study_trials)
    assert len(study_trials) == N_TRIALS, counts(study_trials)  # none failed, none RUNNING
    workers_used = {t.user_attrs.get("droptune.worker") for t in study_trials}
    assert len(workers_used) > 1, workers_used  # the workers shared the study

    client = MlflowClient(url)  # through the stack's server
    experiment = client.get_experiment_by_name(NAME)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert len(children) == N_TRIALS
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    numbers = sorted(int(r.data.tags["droptune.trial_number"]) for r in children)
    assert numbers == sorted(t.number for t in study_trials)  # one run per trial, no duplicate
    assert not [r for r in children if r.info.status == "RUNNING"]
    logged = json.dumps([r.to_dictionary() for r in runs])
    assert SECRET not in logged

    # --allowed-hosts: the names given (and localhost) are answered, other Host headers not.
    assert host_status(url, f"stack-head:{parsed.port}") == 200
    assert host_status(url, f"elsewhere:{parsed.port}") == 403

    status = stack("status", "--state-dir", str(state_dir))
    assert status.returncode == 0 and "state: done" in status.stdout
    assert re.search(r"mlflow: pid \d+ up", status.stdout), status.stdout
    assert re.search(r"worker-0: pid \d+ gone", status.stdout), status.stdout

    down = stack("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert "stopped: supervisor, mlflow" in down.stdout
    for entry in state["processes"]:
        assert not live_members(entry["pid"]), entry
    assert not port_open("127.0.0.1", int(parsed.port))
    assert not (state_dir / "stack.json").exists()
    again = stack("down", "--state-dir", str(state_dir))
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    print(f"stack test took {time.monotonic() - started:.0f}s")


def test_foreground_stack_stops_everything_on_ctrl_c(stack_env: dict[str, Any]) -> None:
    """``up`` without ``--detach`` holds the stack; SIGINT (Ctrl-C) stops the workers (their
    running trials end FAIL, none stays RUNNING), closes the MLflow parent run as KILLED,
    stops the server and exits 130."""
    state_dir: Path = stack_env["state_dir"]
    proc = subprocess.Popen(
        [
            *stack_cmd(),
            "up",
            str(stack_env["spec"]),
            "--workers",
            "2",
            "--n-trials",
            "200",
            "--state-dir",
            str(state_dir),
        ],
        cwd=stack_env["spec"].parent,
        env=stack_env["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        state: dict[str, Any] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((state_dir / "stack.json").read_text())
            running = (
                [t for t in trials(stack_env["storage"], NAME) if t.state.name == "RUNNING"]
                if state.get("state") == "running"
                else []
            )
            if running:
                break
            time.sleep(0.5)
        else:
            out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
            pytest.fail(f"no trial started (exit {proc.poll()}):\n{out}\n{err[-4000:]}")
        assert state["processes"][0]["pid"] == proc.pid  # the up process is the supervisor
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    print(out, err[-3000:])
    assert proc.returncode == 130, err[-3000:]
    assert SECRET not in out + err
    for entry in state["processes"][1:]:
        assert not live_members(entry["pid"]), entry
    assert not port_open("127.0.0.1", int(urlparse(state["mlflow_url"]).port or 0))
    assert not (state_dir / "stack.json").exists()
    study_trials = trials(stack_env["storage"], NAME)
    assert "RUNNING" not in counts(study_trials), counts(study_trials)
    assert 0 < len(study_trials) < 200
    client = MlflowClient(stack_env["env"]["DROPTUNE_MLFLOW_BACKEND_STORE_URI"])
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
