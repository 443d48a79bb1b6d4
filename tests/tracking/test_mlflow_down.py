"""MLflow down: a study against a dead port still runs and is recorded in Optuna, each trial's
tracking failure is logged once and kept on the trial; ``droptune sync`` to a live server then
back-fills exactly one run per trial (and again finds nothing to do). The tracking URL carries a
password, which must never be printed."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
import pytest

from droptune.records import ERROR_ATTR
from droptune.records import RUN_ID_ATTR
from droptune.tracking._server import free_port
from droptune.tracking._server import start_server
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import trials


pytestmark = pytest.mark.slow

SECRET = "tr4ck-s3cret"
NAME = "mlflow-down"
N = 3


def test_study_against_a_dead_tracking_server_then_sync_back_fills_one_run_per_trial(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str, tmp_path: Path
) -> None:
    dead = f"http://droptune:{SECRET}@127.0.0.1:{free_port()}"
    path = write_spec(
        study={"name": NAME},
        tracking={"enabled": True, "uri": dead},
        pruner={"name": "none"},
        n_trials=N,
    )
    result = procs.run("run", str(path), timeout=400)
    out = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-4000:]
    assert SECRET not in out
    study_trials = trials(sqlite_url, NAME)
    assert [t.state.name for t in study_trials] == ["COMPLETE"] * N
    for trial in study_trials:
        assert (
            "unreachable" in trial.user_attrs[ERROR_ATTR]
            or "failed" in trial.user_attrs[ERROR_ATTR]
        )
        assert SECRET not in trial.user_attrs[ERROR_ATTR]
        assert RUN_ID_ATTR not in trial.user_attrs
        # One warning per trial, naming it and pointing at `droptune sync`.
        lines = [
            line
            for line in result.stderr.splitlines()
            if f"trial {trial.number}: MLflow tracking failed" in line
        ]
        assert len(lines) == 1, lines
        assert "droptune sync" in lines[0]
        assert "droptune:***@" in lines[0] or "***" in lines[0] or "127.0.0.1" in lines[0]

    with start_server(f"sqlite:///{tmp_path / 'live' / 'mlflow.db'}", tmp_path / "art") as server:
        live = server.url.replace("http://", f"http://droptune:{SECRET}@")
        args = ("sync", NAME, "--storage", sqlite_url, "--tracking-uri", live)
        first = procs.run(*args)
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"runs created {N}, completed 0" in first.stdout
        assert "parent run created" in first.stdout
        assert SECRET not in first.stdout + first.stderr
        again = procs.run(*args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "runs created 0, completed 0, adopted 0, duplicates removed 0" in again.stdout
        report = procs.run("report", NAME, "--storage", sqlite_url, "--tracking-uri", live)
        assert report.returncode == 0, report.stderr[-3000:]

        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(NAME)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1
        numbers = sorted(int(r.data.tags["droptune.trial_number"]) for r in children)
        assert numbers == list(range(N))  # exactly one run per trial
        synced = {t.number: t for t in trials(sqlite_url, NAME)}
        for run in children:
            trial = synced[int(run.data.tags["droptune.trial_number"])]
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert run.data.tags["droptune.backfilled"] == "true"
            assert float(run.data.metrics["val_loss"]) == pytest.approx(
                trial.user_attrs["droptune.history"][-1]["val_loss"], abs=1e-6
            )
            assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
            for text in [*run.data.params.values(), *run.data.tags.values()]:
                assert SECRET not in text
        names = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
        assert {"best_config.yaml", "summary.csv", "optimization_history.png"} <= names


def test_sync_and_ui_refuse_bad_input_with_exit_2(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    path = write_spec(study={"name": "bad-input"}, n_trials=1)
    assert procs.run("run", str(path), "--workers", "0").returncode == 0
    missing = procs.run("sync", "no-such-study", "--storage", sqlite_url)
    assert missing.returncode == 2
    assert "no-such-study" in missing.stderr
    scheme = procs.run(
        "sync", "bad-input", "--storage", sqlite_url, "--tracking-uri", "ftp://u:pw9@host"
    )
    assert scheme.returncode == 2
    assert "--tracking-uri" in scheme.stderr and "allowed" in scheme.stderr
    assert "pw9" not in scheme.stderr
    nowhere = procs.run("ui", "not-here")
    assert nowhere.returncode == 2
    assert "--storage" in nowhere.stderr
