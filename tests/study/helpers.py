"""Helpers of the study-runner tests: a tiny spec, PostgreSQL administration, the real
``droptune`` command line in subprocesses, and reading trials back from the storage.

Every trial here is tiny (digits, 200 training samples, one hidden layer of 16, 1-3 epochs,
one thread on the CPU) because the machine that runs them may have two shared cores.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import copy
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import optuna
import pytest


ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"

#: A valid spec whose trials take a second or two.
TINY: dict[str, Any] = {
    "study": {"name": "tiny", "metric": "val_loss", "direction": "minimize", "seed": 7},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 200},
    "model": {"family": "mlp", "hidden": [16]},
    "train": {"max_epochs": 2, "lr": 3.0e-3, "accelerator": "cpu", "num_threads": 1},
    "regularization": {
        "dropout": {"kind": "standard", "input_rate": 0.1, "hidden_rate": 0.2},
        "early_stopping": {"patience": None},
    },
    "search": {
        "regularization.dropout.kind": {"choices": ["none", "standard", "gaussian"]},
        "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    "tracking": {"enabled": False},
    "execution": {"workers": 1, "devices": "cpu"},
    "n_trials": 3,
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it section by section; a value ``DELETE`` removes."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "search":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


DELETE = object()

#: ``write_spec(name="spec", text=None, **sections) -> Path`` (the fixture in conftest.py).
SpecWriter = Callable[..., Path]


def pg_admin() -> Any:
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True)


def drop_database(name: str) -> None:
    with pg_admin() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def pg_tables(url: str) -> list[str]:
    """The tables in the public schema of the database of ``url``."""
    import psycopg

    db = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN.replace("dbname=postgres", f"dbname={db}")) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return [row[0] for row in rows]


# ----------------------------------------------------------------------------------------------
# The real command line in subprocesses.


def droptune_cmd() -> list[str]:
    """The installed console script, or ``python -m droptune.cli`` without one."""
    script = Path(sys.executable).with_name("droptune")
    if script.exists():
        return [str(script)]
    found = shutil.which("droptune")
    return [found] if found else [sys.executable, "-m", "droptune.cli"]


def cli_env() -> dict[str, str]:
    """The environment of CLI subprocesses: the repository root importable (user models in
    ``tests.study``), CPU only, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DROPTUNE_STORAGE", None)
    return env


class Procs:
    """Starts ``droptune`` subprocesses, each in its own session (process group), and kills
    whatever is left of those groups when the test ends."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*droptune_cmd(), *args],
            cwd=self.cwd,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kwargs,
        )
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``droptune *args`` to the end; the output is echoed for the test log."""
        proc = self.start(*args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(
                f"droptune {' '.join(args)} did not finish in {timeout}s\n"
                f"stdout:\n{out}\nstderr:\n{err[-5000:]}"
            )
        print(f"$ droptune {' '.join(args)}  -> {proc.returncode}\n{out}\n{err[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def kill_group(proc: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in self.started:
            self.kill_group(proc)
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                proc.communicate(timeout=30)


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still alive (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Reading the storage.


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of a study through a fresh storage that only reads (it never creates tables,
    so polling cannot race the processes under test); its engine is disposed afterwards."""
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return study.get_trials(deepcopy=True)
    finally:
        storage.engine.dispose()


def counts(trial_list: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    out: dict[str, int] = {}
    for trial in trial_list:
        out[trial.state.name] = out.get(trial.state.name, 0) + 1
    return out


def finished(trial_list: list[optuna.trial.FrozenTrial]) -> int:
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trial_list)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
    interval: float = 0.3,
) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds, or as
    soon as ``proc`` (the process expected to bring it about) has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except Exception:  # the study may not exist yet
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"waiting for {what}: the process exited with {proc.returncode}\n"
                f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
            )
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def running_trial(url: str, name: str) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial that has started training (its seed is recorded)."""
    for trial in trials(url, name):
        if trial.state.name == "RUNNING" and "droptune.seed" in trial.user_attrs:
            return trial
    return None


# ----------------------------------------------------------------------------------------------
# Reading MLflow.

#: Optuna state → the MLflow status of the trial's run.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def tracking_section(tmp: Path) -> dict[str, Any]:
    """A spec ``tracking`` section on a fresh local MLflow store under ``tmp``."""
    return {"enabled": True, "uri": f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"}


def trial_runs(uri: str, name: str) -> dict[int, list[Any]]:
    """The child runs of study ``name``'s parent run, by trial number (a list, to see
    duplicates); fails the test unless there is exactly one parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=10000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    out: dict[int, list[Any]] = {}
    runs = [r for r in runs if r.data.tags.get("droptune.role") != "confirmation"]
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id:
            out.setdefault(int(run.data.tags["droptune.trial_number"]), []).append(run)
    assert sum(map(len, out.values())) == len(runs) - 1, "a run outside the study's parent"
    return out


def assert_runs_match_trials(uri: str, name: str, trial_list: list[Any]) -> dict[int, Any]:
    """Every ended trial has exactly one run with the mapped status; no run is RUNNING."""
    runs = trial_runs(uri, name)
    running = [r.info.run_name for rs in runs.values() for r in rs if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"
    # (a trial refused as a duplicate of a finished one trained nothing and has no run)
    ended = [
        t
        for t in trial_list
        if t.state.name in RUN_STATUS and "droptune.duplicate_of" not in t.user_attrs
    ]
    assert sorted(runs) == sorted(t.number for t in ended), (sorted(runs), len(ended))
    for trial in ended:
        assert len(runs[trial.number]) == 1, f"trial {trial.number} has several runs"
        run = runs[trial.number][0]
        assert run.info.status == RUN_STATUS[trial.state.name], (trial.number, trial.state)
        assert run.data.tags["optuna.state"] == trial.state.name
    return {number: rs[0] for number, rs in runs.items()}


def assert_distinct_configs(trial_list: list[optuna.trial.FrozenTrial]) -> None:
    """No two finished (COMPLETE or PRUNED) trials have the same params."""
    seen: dict[tuple[tuple[str, str], ...], int] = {}
    for trial in trial_list:
        if trial.state.name not in ("COMPLETE", "PRUNED"):
            continue
        key = tuple(sorted((k, repr(v)) for k, v in trial.params.items()))
        assert key not in seen, f"trial {trial.number} repeats trial {seen[key]}: {trial.params}"
        seen[key] = trial.number
