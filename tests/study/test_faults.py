"""Faults: a worker killed with SIGKILL mid-trial, Ctrl-C / SIGTERM to ``droptune run`` and to a
worker, a diverging loss, and a user model that always raises. Real processes, real signals,
real SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
import signal
import time
from typing import Any

import optuna
import pytest

from droptune.cli import main
from tests.study.helpers import DELETE
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import assert_distinct_configs
from tests.study.helpers import assert_runs_match_trials
from tests.study.helpers import counts
from tests.study.helpers import finished
from tests.study.helpers import group_alive
from tests.study.helpers import running_trial
from tests.study.helpers import tracking_section
from tests.study.helpers import trials
from tests.study.helpers import wait_for


#: Long enough trials (several seconds each) that a signal finds one running.
LONG_TRAIN = {"max_epochs": 60}
#: SQLite's CURRENT_TIMESTAMP, which Optuna's heartbeats use, has a resolution of one second.
GRACE = 5
FAST_BEATS = {"heartbeat_interval": 1, "grace_period": GRACE, "devices": "cpu"}


# ----------------------------------------------------------------------------------------------
# SIGKILL: the heartbeat goes stale, the trial FAILs, its parameters are retried once.


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkilled_worker_trial_fails_after_grace_and_is_retried(
    backend: str,
    procs: Procs,
    write_spec: SpecWriter,
    sqlite_url: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    url = sqlite_url if backend == "sqlite" else request.getfixturevalue("pg_url")
    name = f"kill-{backend}"
    n = 2
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 100},
        execution=FAST_BEATS,
        pruner={"name": "none"},
        storage=url,
        tracking=tracking,
        n_trials=n,
    )
    worker = procs.start("worker", str(path))
    victim = wait_for(lambda: running_trial(url, name), 240, "a RUNNING trial", worker)
    time.sleep(1.0)  # a heartbeat or two while it trains
    assert worker.poll() is None, worker.communicate()[1][-3000:]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    killed_at = dt.datetime.now()
    assert worker.returncode == -signal.SIGKILL
    # Within the grace period `droptune status` leaves the trial alone ...
    assert main(["status", "--storage", url, "--study", name]) == 0
    assert "stale" not in capsys.readouterr().out
    state = {t.number: t for t in trials(url, name)}[victim.number].state.name
    assert state == "RUNNING"
    if backend == "sqlite":
        # ... and once it has passed, status fails the trial and queues its retry.
        time.sleep(max(0.0, GRACE + 2 - (dt.datetime.now() - killed_at).total_seconds()))
        assert main(["status", "--storage", url, "--study", name]) == 0
        assert "failed 1 stale trial(s) whose worker stopped beating" in capsys.readouterr().out
        states = {t.number: t.state.name for t in trials(url, name)}
        assert states[victim.number] == "FAIL"
        assert "WAITING" in states.values()
    # (On PostgreSQL the next `run` finds the stale trial itself.)

    result = procs.run("run", str(path), "--workers", "2")

    assert result.returncode == 0, result.stderr[-4000:]
    trial_list = trials(url, name)
    by_number = {t.number: t for t in trial_list}
    dead = by_number[victim.number]
    assert dead.state.name == "FAIL"
    assert dead.datetime_complete is not None
    waited = (dead.datetime_complete - killed_at).total_seconds()
    # Stale: no heartbeat for grace_period; the last beat was < 1 s before the kill, and
    # SQLite's clock has whole seconds.
    assert waited >= GRACE - 1 - 1, waited
    retries = [t for t in trial_list if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in trial_list]
    retry = retries[0]
    assert retry.system_attrs["retry_history"] == [victim.number]
    assert retry.params == dead.params
    assert retry.state.name in ("COMPLETE", "PRUNED")
    assert counts(trial_list).get("RUNNING", 0) == 0
    assert counts(trial_list).get("WAITING", 0) == 0
    assert finished(trial_list) == n
    assert counts(trial_list) == {"COMPLETE": n, "FAIL": 1}
    assert_distinct_configs(trial_list)  # the restarted workers sampled no config again
    # The killed worker's run was ended FAILED on its behalf; one run per trial, none RUNNING.
    runs = assert_runs_match_trials(tracking["uri"], name, trial_list)
    assert runs[victim.number].info.status == "FAILED"
    assert "droptune.error" in runs[victim.number].data.tags


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: running trials FAIL (never left RUNNING), exit 130, and run resumes.


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        "sigint-to-group",
        "sigterm-to-run",
        "sigterm-to-worker",
        "graceful-sigint-to-group",
        "graceful-sigint-to-group-then-sigterm",
        "population-sigint-to-group",
    ],
)
def test_interrupt_fails_running_trials_exits_130_and_resumes(
    how: str,
    procs: Procs,
    write_spec: SpecWriter,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    name = f"int-{how}"
    n = 3
    graceful = how.startswith("graceful")
    # a population round of all n trials: interrupted, it fails every member at once
    population = ["--population", str(n)] if how.startswith("population") else []
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 400} if population else LONG_TRAIN,
        execution=FAST_BEATS,
        tracking=tracking,
        n_trials=n,
    )
    if how == "sigterm-to-worker":
        proc = procs.start("worker", str(path))
    elif population:
        proc = procs.start("run", str(path), "--workers", "1", *population)
    else:
        proc = procs.start("run", str(path), "--workers", "2", *(["--graceful"] * graceful))
    victim = wait_for(lambda: running_trial(sqlite_url, name), 240, "a RUNNING trial", proc)
    time.sleep(0.5)
    assert proc.poll() is None
    if "sigint-to-group" in how:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        if how.endswith("then-sigterm"):
            # a service manager's SIGTERM while `run` waits for its workers to finish their
            # trials: `run` keeps waiting, and leaves nothing running
            time.sleep(1.0)
            os.kill(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    print(out, err[-3000:])

    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    # Nothing of the run is left behind: no worker process, no RUNNING trial.
    wait_for(lambda: not group_alive(proc.pid), 30, "the workers to exit")
    trial_list = trials(sqlite_url, name)
    state_counts = counts(trial_list)
    assert state_counts.get("RUNNING", 0) == 0, state_counts
    assert state_counts.get("WAITING", 0) == 0, state_counts
    if graceful:
        # The running trials were finished, and no new one was started.
        assert "FAIL" not in state_counts, state_counts
        assert {t.number: t.state.name for t in trial_list}[victim.number] in (
            "COMPLETE",
            "PRUNED",
        )
        assert finished(trial_list) < n
    else:
        failed = [t for t in trial_list if t.state.name == "FAIL"]
        assert victim.number in [t.number for t in failed], state_counts
        for trial in failed:
            reason = trial.user_attrs.get("droptune.fail_reason", "")
            assert "interrupted" in reason, reason
        if population:  # the whole round was training together
            assert state_counts == {"FAIL": n}, state_counts
    if how != "sigterm-to-worker":
        assert "interrupted: run the same command again to resume" in err
    # No MLflow run is left RUNNING either: each ended trial's run has its final status.
    assert_runs_match_trials(tracking["uri"], name, trial_list)

    resume = ["run", str(path), "--workers", "1", *population]
    assert main(resume) == 0, capsys.readouterr().err[-3000:]
    trial_list = trials(sqlite_url, name)
    assert counts(trial_list).get("RUNNING", 0) == 0
    assert finished(trial_list) == n, counts(trial_list)
    assert_distinct_configs(trial_list)  # the resumed run sampled no finished config again
    assert_runs_match_trials(tracking["uri"], name, trial_list)


@pytest.mark.slow
def test_signals_after_an_interrupt_do_not_cut_the_last_runs_short(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str, tmp_path: Path
) -> None:
    """Ctrl-C reaches a worker, and more signals follow within REPEAT_AFTER_S (a terminal's
    Ctrl-C, then the SIGTERM ``droptune run`` forwards): the worker still writes the MLflow run
    of every trial it failed before it exits. (Its own handler used to be gone by then, and the
    forwarded SIGTERM killed it while its writer was back-filling the runs of members that
    never started.)"""
    from droptune.study.worker import REPEAT_AFTER_S

    name = "int-closing"
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 400},
        execution=FAST_BEATS,
        tracking=tracking,
        n_trials=3,
    )
    proc = procs.start("worker", str(path), "--population", "3")
    wait_for(lambda: running_trial(sqlite_url, name), 240, "a RUNNING trial", proc)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    first = time.monotonic()
    sent = 0
    while proc.poll() is None and time.monotonic() - first < 0.75 * REPEAT_AFTER_S:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
            sent += 1
        time.sleep(0.02)
    _out, err = proc.communicate(timeout=120)
    assert sent > 0
    # 130, or the default SIGTERM once ``run_worker`` returned (the interpreter's shutdown)
    assert proc.returncode in (130, -signal.SIGTERM), (proc.returncode, err[-3000:])
    trial_list = trials(sqlite_url, name)
    assert counts(trial_list) == {"FAIL": 3}, counts(trial_list)
    assert_runs_match_trials(tracking["uri"], name, trial_list)


# ----------------------------------------------------------------------------------------------
# A diverging loss: the trial FAILs with a reason naming the metric; the worker carries on.


@pytest.mark.slow
def test_nan_loss_fails_the_trial_and_the_worker_continues(
    write_spec: SpecWriter, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "nan"
    path = write_spec(
        study={"name": name, "baseline": False},  # the test enqueues its own trials
        train={"optimizer": "sgd", "max_epochs": 2},
        regularization={"dropout": {"kind": "none"}},
        search={"train.lr": {"choices": [1.0e20, 3.0e-3]}},
        pruner={"name": "none"},
        n_trials=2,
    )
    assert main(["run", str(path), "--workers", "0"]) == 0  # create the study only
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for lr in (1.0e20, 3.0e-3, 3.0e-3):
        study.enqueue_trial({"train.lr": lr})

    code = main(["worker", str(path)])  # in this process: real trials, real storage

    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    trial_list = trials(sqlite_url, name)
    assert [t.state.name for t in trial_list] == ["FAIL", "COMPLETE", "COMPLETE"]
    reason = trial_list[0].user_attrs["droptune.fail_reason"]
    assert reason.startswith("TrialFailed: val_loss became nan"), reason
    assert "diverged" in reason
    assert trial_list[0].params == {"train.lr": 1.0e20}
    assert all(t.params == {"train.lr": 3.0e-3} for t in trial_list[1:])


# ----------------------------------------------------------------------------------------------
# A model that always raises: the worker gives up after max_consecutive_failures.


@pytest.mark.slow
def test_always_failing_model_stops_the_worker_after_max_consecutive_failures(
    procs: Procs,
    write_spec: SpecWriter,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = "raises"
    custom: dict[str, Any] = {
        "family": "custom",
        "target": "tests.study.faulty_models:AlwaysRaises",
        "hidden": DELETE,
    }
    path = write_spec(
        study={"name": name},
        model=custom,
        search={"regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5}},
        execution={"max_consecutive_failures": 2},
        n_trials=5,
    )
    start = time.monotonic()
    result = procs.run("worker", str(path), timeout=240)
    print(f"worker gave up after {time.monotonic() - start:.1f}s")

    assert result.returncode == 1, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert "2 consecutive trials failed" in error_lines[0]
    assert "boom: AlwaysRaises.training_step" in error_lines[0]
    trial_list = trials(sqlite_url, name)
    assert counts(trial_list) == {"FAIL": 2}
    for trial in trial_list:
        assert trial.user_attrs["droptune.fail_reason"] == (
            "RuntimeError: boom: AlwaysRaises.training_step"
        )

    # `droptune run` does not loop either: its worker gives up, and run exits 1.
    assert main(["run", str(path), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "did not reach its trial count" in err
    assert counts(trials(sqlite_url, name)) == {"FAIL": 4}


# ----------------------------------------------------------------------------------------------
# Out of memory (torch.cuda.OutOfMemoryError, injected on the CPU): FAIL with the reason, the
# trial's model and tensors released, the worker carries on; optionally one retry at half the
# batch size, which the exported config then carries.

OOM_MODEL: dict[str, Any] = {
    "family": "custom",
    "target": "tests.study.faulty_models:OomAbove",
    "kwargs": {"limit": 32},
    "hidden": DELETE,
}


@pytest.mark.slow
@pytest.mark.parametrize("retry", [False, True])
def test_out_of_memory_fails_or_retries_at_half_batch_and_releases_memory(
    retry: bool,
    write_spec: SpecWriter,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import gc

    from tests.study import faulty_models

    name = f"oom-{retry}"
    path = write_spec(
        study={"name": name, "baseline": False},  # the test enqueues its own trials
        model=OOM_MODEL,
        data={"batch_size": 64},
        search={"data.batch_size": {"choices": [64, 16]}},
        pruner={"name": "none"},
        execution={"oom_retry": retry},
        n_trials=2,
    )
    assert main(["run", str(path), "--workers", "0"]) == 0
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for size in (64, 16) if retry else (64, 16, 16):
        study.enqueue_trial({"data.batch_size": size})
    faulty_models.BUILT.clear()

    code = main(["worker", str(path)])

    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    trial_list = trials(sqlite_url, name)
    first = trial_list[0]
    if retry:
        assert [t.state.name for t in trial_list] == ["COMPLETE", "COMPLETE"]
        assert first.user_attrs["droptune.overrides"] == {"data.batch_size": 32}
        assert first.user_attrs["droptune.oom"].startswith("out of memory at batch size 64")
        assert "retrying once at batch size 32" in caplog.text
        from droptune.export import trial_config

        assert trial_config(study, first).data.batch_size == 32
    else:
        assert [t.state.name for t in trial_list] == ["FAIL", "COMPLETE", "COMPLETE"]
        reason = first.user_attrs["droptune.fail_reason"]
        assert reason.startswith("TrialFailed: out of memory at batch size 64: CUDA out of memory")
    # Every model the worker built (the failed trial's included) has been released.
    gc.collect()
    assert faulty_models.BUILT, "the model was never built"
    assert all(ref() is None for ref in faulty_models.BUILT), "a trial's model is still alive"


# ----------------------------------------------------------------------------------------------
# A user DataModule that raises: the trial FAILs with the traceback on the trial and on its
# MLflow run, and the worker carries on with the next trial.


@pytest.mark.slow
def test_user_datamodule_error_keeps_the_traceback_and_the_worker_continues(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str, tmp_path: Path
) -> None:
    name = "flaky-data"
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": name},
        data={
            "name": "datamodule",
            "datamodule": "tests.user_code.datamodules:FlakyDataModule",
            "kwargs": {"counter": str(tmp_path / "setup-calls"), "fail_first": 1},
            "batch_size": DELETE,
            "train_subset": DELETE,
        },
        tracking=tracking,
        pruner={"name": "none"},
        n_trials=2,
    )
    result = procs.run("worker", str(path), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    trial_list = trials(sqlite_url, name)
    assert [t.state.name for t in trial_list] == ["FAIL", "COMPLETE", "COMPLETE"]
    failed = trial_list[0]
    assert failed.user_attrs["droptune.fail_reason"].startswith(
        "ValueError: FlakyDataModule.setup: the data share is not mounted"
    )
    traceback = failed.user_attrs["droptune.traceback"]
    assert "Traceback (most recent call last)" in traceback
    assert "datamodules.py" in traceback and "in setup" in traceback
    runs = assert_runs_match_trials(tracking["uri"], name, trial_list)
    tags = runs[failed.number].data.tags
    assert tags["droptune.error"].startswith("ValueError: FlakyDataModule.setup")
    assert "in setup" in tags["droptune.traceback"]


# ----------------------------------------------------------------------------------------------
# kill -9 of `run` and its workers: whoever reaps the trials ends their MLflow runs, and the
# study's run follows its trials (KILLED while unfinished, FINISHED once complete).


@pytest.mark.slow
def test_sigkill_of_run_and_workers_leaves_no_mlflow_run_running(
    procs: Procs,
    write_spec: SpecWriter,
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    name = "kill-all"
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": name},
        train=LONG_TRAIN,
        execution=FAST_BEATS,
        pruner={"name": "none"},
        tracking=tracking,
        n_trials=2,
    )
    proc = procs.start("run", str(path), "--workers", "1")
    wait_for(lambda: running_trial(sqlite_url, name), 240, "a RUNNING trial", proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # run and its workers, with no chance to clean up
    proc.wait(timeout=30)
    wait_for(lambda: not group_alive(proc.pid), 30, "the killed processes to go")
    client = MlflowClient(tracking["uri"])
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None

    def statuses() -> dict[str, str]:
        runs = client.search_runs([experiment.experiment_id])
        return {r.info.run_name: r.info.status for r in runs}

    assert "RUNNING" in statuses().values()  # what kill -9 leaves behind
    time.sleep(GRACE + 2)

    assert main(["status", "--storage", sqlite_url, "--study", name]) == 0

    out = capsys.readouterr().out
    assert "failed 1 stale trial(s)" in out and "as FAILED" in out, out
    after = statuses()
    assert "RUNNING" not in after.values(), after
    assert after[name] == "KILLED"  # the study's run: unfinished, nothing running
    assert main(["sync", name, "--storage", sqlite_url]) == 0
    assert statuses()[name] == "KILLED"

    assert main(["run", str(path), "--workers", "1"]) == 0  # resumed to the end
    final = statuses()
    assert final[name] == "FINISHED" and "RUNNING" not in final.values(), final
