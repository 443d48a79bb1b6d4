"""Population mode through the real command line: ``droptune run --population P`` trains asked
trials as batched networks (grouped by dropout kind), tells each one, tracks each in MLflow,
keeps exact trial counts, beats for its asked trials (a SIGKILLed worker's trials go stale and
are retried), and falls back to one trial at a time, saying why, where it cannot apply."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import time

import pytest

from droptune.records import BASELINE_ATTR
from tests.study.helpers import DELETE
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import assert_runs_match_trials
from tests.study.helpers import counts
from tests.study.helpers import finished
from tests.study.helpers import tracking_section
from tests.study.helpers import trials
from tests.study.helpers import wait_for


pytestmark = pytest.mark.slow

ONE_KIND = {
    "regularization.dropout.kind": {"choices": ["standard"]},
    "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
    "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
}


def test_run_with_population_trains_members_together_and_tracks_each(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str, tmp_path: Path
) -> None:
    name = "population"
    n = 8
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 4},
        search=ONE_KIND,
        tracking=tracking,
        execution={"population_init": "fast"},
        n_trials=n,
    )
    result = procs.run("run", str(path), "--population", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    trial_list = trials(sqlite_url, name)
    assert finished(trial_list) == n, counts(trial_list)
    assert set(counts(trial_list)) <= {"COMPLETE", "PRUNED"}
    sizes = [t.user_attrs.get("droptune.population") for t in trial_list]
    assert max(s or 0 for s in sizes) == 4, sizes  # trained 4 at a time
    for trial in trial_list:
        history = trial.user_attrs["droptune.history"]
        assert [row["epoch"] for row in history] == list(range(len(history)))
        assert {"train_loss", "val_loss", "val_acc", "lr", "epoch_time"} <= set(history[-1])
        assert trial.user_attrs["droptune.epochs"] == len(history)
        if trial.state.name == "COMPLETE":
            assert trial.value == pytest.approx(min(r["val_loss"] for r in history), abs=1e-6)
            assert len(history) == 4
        else:  # pruned on its own, at its last epoch
            assert trial.user_attrs["droptune.pruned_at_epoch"] == len(history) - 1
        # every epoch reported to Optuna (one transaction per epoch for the whole population)
        assert trial.intermediate_values == {
            i: pytest.approx(row["val_loss"], abs=1e-6) for i, row in enumerate(history)
        }
        assert "droptune.seed" in trial.user_attrs
        if trial.user_attrs.get(BASELINE_ATTR):  # the spec's l2.strength (0) is off the range
            assert trial.number == 0 and trial.state.name == "COMPLETE"  # and never pruned
            assert set(trial.params) == set(ONE_KIND) - {"regularization.l2.strength"}
            continue
        assert set(trial.params) == set(ONE_KIND)  # suggestions written with the round's batch
    assert_runs_match_trials(tracking["uri"], name, trial_list)


def test_population_rounds_take_enqueued_trials_first(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    import optuna

    name = "population-enqueued"
    path = write_spec(
        study={"name": name, "baseline": False},  # the test enqueues its own trials
        train={"max_epochs": 2},
        search=ONE_KIND,
        pruner={"name": "none"},
    )
    created = procs.run("run", str(path), "--workers", "0", "--n-trials", "6")
    assert created.returncode == 0, created.stderr[-4000:]
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    fixed = [{"regularization.dropout.hidden_rate": r} for r in (0.125, 0.375)]
    for params in fixed:
        study.enqueue_trial({**params, "regularization.l2.strength": 1e-4})
    result = procs.run("run", str(path), "--population", "4", "--n-trials", "6")
    assert result.returncode == 0, result.stderr[-4000:]
    trial_list = trials(sqlite_url, name)
    assert counts(trial_list) == {"COMPLETE": 6}
    rates = [t.params["regularization.dropout.hidden_rate"] for t in trial_list]
    assert rates[:2] == [0.125, 0.375], rates  # the waiting trials ran, in the first round
    assert trial_list[0].user_attrs["droptune.population"] == 4


def test_population_falls_back_to_one_trial_at_a_time_and_says_why(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    """A user's model that vmap cannot batch (Python control flow on a tensor's value) is
    refused when its population is built: the trials run one at a time and complete, and the
    log names the module and the reason once."""
    name = "population-fallback"
    path = write_spec(
        study={"name": name},
        model={
            "family": "custom",
            "target": "tests.population._models:ControlFlowNet",
            "hidden": DELETE,
        },
        pruner={"name": "none"},
        n_trials=4,
    )
    result = procs.run("run", str(path), "--population", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    warned = [
        line for line in result.stderr.splitlines() if "cannot train as a population" in line
    ]
    assert len(warned) == 1, result.stderr[-4000:]  # once, though two rounds fell back
    assert "ControlFlowNet" in warned[0] and "data-dependent control flow" in warned[0]
    trial_list = trials(sqlite_url, name)
    assert counts(trial_list) == {"COMPLETE": 4}
    assert all("droptune.population" not in t.user_attrs for t in trial_list)


def test_sigkilled_population_worker_trials_go_stale_and_are_retried(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    name = "population-kill"
    n = 3
    grace = 5
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 100_000},  # still training when killed, however fast the machine
        search=ONE_KIND,
        pruner={"name": "none"},
        execution={"heartbeat_interval": 1, "grace_period": grace, "population": 3},
        n_trials=n,
    )
    worker = procs.start("worker", str(path))

    def running() -> list[int]:
        listed = trials(sqlite_url, name)
        return [t.number for t in listed if t.state.name == "RUNNING" and t.user_attrs]

    victims = wait_for(lambda: len(running()) == n and running(), 240, "3 RUNNING trials", worker)
    time.sleep(2.0)  # beats while they train
    assert worker.poll() is None, "the worker finished before it could be killed"
    assert len(running()) == n
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    # The heartbeats the round recorded go stale: the next run fails those trials, retries their
    # parameters once and finishes the study.
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 2},
        search=ONE_KIND,
        pruner={"name": "none"},
        execution={"heartbeat_interval": 1, "grace_period": grace, "population": 3},
        n_trials=n,
    )
    time.sleep(grace + 1)
    result = procs.run("run", str(path))
    assert result.returncode == 0, result.stderr[-4000:]
    trial_list = trials(sqlite_url, name)
    by_number = {t.number: t for t in trial_list}
    assert all(by_number[v].state.name == "FAIL" for v in victims)
    retried = [t for t in trial_list if t.system_attrs.get("failed_trial") in victims]
    assert sorted(t.system_attrs["failed_trial"] for t in retried) == sorted(victims)
    assert finished(trial_list) == n
    assert counts(trial_list).get("RUNNING", 0) == 0
