"""MLflow tracking building blocks against a real local MLflow store (SQLite) and a real
Optuna study: child runs under one parent, status mapping, sync back-fill, study artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from droptune.records import HISTORY_ATTR
from droptune.records import RUN_ID_ATTR
from droptune.study.spec import spec_from_dict
from droptune.tracking import STATUS_BY_STATE
from droptune.tracking import StudyTracking
from droptune.tracking._client import Tracker
from droptune.tracking._client import flatten
from droptune.tracking._report import write_study_artifacts
from droptune.tracking._sync import sync_study


SPEC: dict[str, Any] = {
    "study": {"name": "track", "metric": "val_loss", "direction": "minimize"},
    "model": {"family": "mlp", "hidden": [8]},
    "search": {
        "regularization.dropout.kind": {"choices": ["standard", "gaussian"]},
        "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    },
}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[optuna.Study, StudyTracking]:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = spec_from_dict(SPEC)
    study = optuna.create_study(study_name="track", storage=storage)
    study.set_user_attr("droptune.spec", spec.to_dict())
    tracking = StudyTracking(spec, "track", storage, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return study, tracking


def _trial(
    study: optuna.Study, tracking: StudyTracking | None, state: str, value: float | None = None
) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    kind = trial.suggest_categorical("regularization.dropout.kind", ["standard", "gaussian"])
    trial.suggest_float("regularization.dropout.hidden_rate", 0.0, 0.5)
    trial.suggest_float("regularization.l2.strength", 1e-6, 1e-2, log=True)
    trial.set_user_attr("droptune.seed", 7)
    trial.set_user_attr(
        HISTORY_ATTR, [{"val_loss": 1.0, "train_loss": 1.2}, {"val_loss": 0.8, "train_loss": 0.9}]
    )
    if tracking is not None:
        tracking.trial_started(study, trial)
    del kind
    if state == "COMPLETE":
        frozen = study.tell(trial, value)
    elif state == "PRUNED":
        frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        trial.set_user_attr("droptune.fail_reason", "ValueError: boom")
        frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return frozen


def test_one_child_run_per_trial_under_one_parent_with_mapped_status(setup: Any) -> None:
    study, tracking = setup
    for state, value in (("COMPLETE", 0.5), ("PRUNED", None), ("FAIL", None)):
        frozen = _trial(study, tracking, state, value)
        tracking.trial_finished(study, study.get_trials()[frozen.number])
    parent = tracking.parent_run_id(study)
    runs = {
        int(r.data.tags["droptune.trial_number"]): r for r in tracking.tracker.child_runs(parent)
    }
    assert sorted(runs) == [0, 1, 2]
    for trial in study.get_trials():
        run = runs[trial.number]
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == STATUS_BY_STATE[trial.state.name]
        assert trial.user_attrs[RUN_ID_ATTR] == run.info.run_id  # linked both ways
        assert run.data.params["regularization.dropout.kind"] in ("standard", "gaussian")
        assert run.data.params["config.model.family"] == "mlp"  # the resolved config
        history = tracking.tracker.client.get_metric_history(run.info.run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.8)]
    assert runs[2].data.tags["droptune.error"] == "ValueError: boom"
    # MLflow 3's UI opens the experiment in its model-training view
    experiment = tracking.tracker.client.get_experiment(tracking.tracker.experiment_id())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_made_before_gets_the_model_training_view(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from droptune.tracking._client import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = MlflowClient(tracking_uri=uri).create_experiment("older")
    tracker = Tracker(uri, "older")
    assert tracker.experiment_id() == made
    tags = tracker.client.get_experiment(made).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_dead_server_never_fails_the_trial_and_sync_backfills(
    setup: Any, tmp_path: Path
) -> None:
    study, live = setup
    dead = StudyTracking(
        spec_from_dict(SPEC), "track", live.storage_url, uri="http://127.0.0.1:9"
    )  # nothing listens on the discard port
    for number in range(3):
        frozen = _trial(study, dead, "COMPLETE", 1.0 - number / 10)
        dead.trial_finished(study, study.get_trials()[frozen.number])
    trials = study.get_trials()
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert all("droptune.tracking_error" in t.user_attrs for t in trials)
    report = sync_study(study, live)
    assert sorted(report.created) == [0, 1, 2]
    again = sync_study(study, live)  # idempotent: nothing more to do
    assert again.created == [] and again.duplicates_removed == []
    runs = live.tracker.child_runs(live.parent_run_id(study))
    assert sorted(int(r.data.tags["droptune.trial_number"]) for r in runs) == [0, 1, 2]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_sync_completes_runs_left_running(setup: Any) -> None:
    study, tracking = setup
    frozen = _trial(study, tracking, "COMPLETE", 0.3)  # started, never finished in MLflow
    run_id = study.get_trials()[frozen.number].user_attrs[RUN_ID_ATTR]
    assert tracking.tracker.client.get_run(run_id).info.status == "RUNNING"
    report = sync_study(study, tracking)
    assert report.completed == [0] and report.created == []
    assert tracking.tracker.client.get_run(run_id).info.status == "FINISHED"


def test_study_artifacts_are_written(setup: Any, tmp_path: Path) -> None:
    study, _ = setup
    for number in range(4):
        _trial(study, None, "COMPLETE", 1.0 / (number + 1))
    names = {p.name for p in write_study_artifacts(study, tmp_path / "artifacts")}
    assert {
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinates.png",
        "metric_vs_dropout_rate.png",
        "metric_vs_l2_strength.png",
        "best_config.yaml",
        "summary.csv",
        "summary.md",
        "interactive.html",
    } <= names
    for name in names:
        assert (tmp_path / "artifacts" / name).stat().st_size > 0
    assert (tmp_path / "artifacts" / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    assert "seed: 7" in (tmp_path / "artifacts" / "best_config.yaml").read_text()


def test_the_interactive_page_holds_every_figure_and_plotly_once(
    setup: Any, tmp_path: Path
) -> None:
    study, _ = setup
    for number in range(6):
        trial = study.ask()
        trial.suggest_categorical("regularization.dropout.kind", ["standard", "gaussian"])
        trial.suggest_float("regularization.dropout.hidden_rate", 0.0, 0.5)
        trial.suggest_float("regularization.l2.strength", 1e-6, 1e-2, log=True)
        for epoch in range(3):
            trial.report(1.0 / (number + epoch + 1), epoch)
        study.tell(trial, 1.0 / (number + 3))
    write_study_artifacts(study, tmp_path / "artifacts")
    page = (tmp_path / "artifacts" / "interactive.html").read_text()
    assert page.count('class="plotly-graph-div"') == 5  # history, importances, parallel,
    # slices, learning curves
    assert page.count("plotly.js v") == 1  # inlined once: works offline
    assert '"l2"' in page and "regularization.dropout.hidden_rate" not in page  # short names
    for title in ("Optimization history", "Parameter importances", "Learning curves"):
        assert title in page


def test_params_with_a_password_are_masked(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "masking")
    parent = tracker.create_parent_run({})
    run_id = tracker.start_trial_run(parent, 0, {})
    tracker.finish_trial_run(
        run_id,
        state="COMPLETE",
        history=[],
        tags={},
        params={"storage": "postgresql://user:s3cret@db/x"},
    )
    value = tracker.client.get_run(run_id).data.params["storage"]
    assert "s3cret" not in value and "***" in value


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": []}) == {
        "a.b": 1,
        "a.c.d": None,
        "e": [],
    }
