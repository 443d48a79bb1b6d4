"""Per-epoch metrics reach a trial's MLflow run while it trains (a real Lightning trial and a
real population round, a real local MLflow store), and the trial's end logs nothing twice."""

from __future__ import annotations

from pathlib import Path
import time
from typing import Any

import mlflow
import optuna
import pytest
import pytorch_lightning as pl

from droptune.records import RUN_ID_ATTR
from droptune.storage import open_storage
from droptune.study.objective import Objective
from droptune.study.population import population_round
from droptune.study.spec import spec_from_dict
from droptune.tracking import StudyTracking
from tests.study.helpers import TINY
from tests.study.helpers import merge


EPOCHS = 5


def _setup(tmp_path: Path, live: bool = True) -> tuple[optuna.Study, StudyTracking, Any, str]:
    # one dropout kind, so that a round trains its members as one population
    search = {k: v for k, v in TINY["search"].items() if k != "regularization.dropout.kind"}
    options = {"max_epochs": EPOCHS}
    raw = merge(
        TINY,
        {
            "train": options,
            "pruner": {"name": "none"},
            "tracking": {"enabled": True, "live": live},
            "search": search,
        },
    )
    spec = spec_from_dict(raw)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="tiny", storage=open_storage(storage))
    study.set_user_attr("droptune.spec", spec.to_dict())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return study, StudyTracking(spec, "tiny", storage, uri=uri), spec, uri


def _points(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class _Peek(pl.Callback):
    """At the start of the last epoch, waits (up to 20 s) for the trial's run to show the
    epochs before, and records how many it showed."""

    def __init__(self, uri: str, wait_s: float = 20.0) -> None:
        self.client = mlflow.MlflowClient(uri)
        self.wait_s = wait_s
        self.trial: optuna.Trial | None = None
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != EPOCHS - 1 or self.trial is None:
            return
        run_id = self.trial.user_attrs[RUN_ID_ATTR]
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            self.seen = _points(self.client, run_id, "val_loss")
            if len(self.seen) >= EPOCHS - 1:
                return
            time.sleep(0.1)


def _one_trial(tmp_path: Path, live: bool) -> tuple[optuna.Study, _Peek, str]:
    """One Lightning trial with tracking, looked at before its last epoch."""
    study, tracking, spec, uri = _setup(tmp_path, live=live)
    tracking.study_started(study)
    peek = _Peek(uri, wait_s=20.0 if live else 2.0)
    objective = Objective(spec, worker="test", extra_callbacks=[peek], tracking=tracking)
    objective.on_trial_start.append(lambda trial: setattr(peek, "trial", trial))
    try:
        study.optimize(objective, n_trials=1)
    finally:
        objective.close()
    return study, peek, uri


def test_a_trials_run_shows_its_epochs_while_it_trains(tmp_path: Path) -> None:
    study, peek, uri = _one_trial(tmp_path, live=True)
    # while the last epoch trained, the run already held every epoch before it
    assert peek.seen == list(range(EPOCHS - 1))
    trial = study.trials[0]
    run_id = trial.user_attrs[RUN_ID_ATTR]
    client = mlflow.MlflowClient(uri)
    # each epoch's metrics once, the trial's value once, on the last step
    for key in ("val_loss", "train_loss", "epoch_time"):
        assert _points(client, run_id, key) == list(range(EPOCHS)), key
    assert _points(client, run_id, "objective") == [EPOCHS - 1]
    assert client.get_run(run_id).data.metrics["objective"] == trial.value


def test_with_live_metrics_off_the_run_gets_them_when_the_trial_ends(tmp_path: Path) -> None:
    study, peek, uri = _one_trial(tmp_path, live=False)
    assert peek.seen == []
    run_id = study.trials[0].user_attrs[RUN_ID_ATTR]
    assert _points(mlflow.MlflowClient(uri), run_id, "val_loss") == list(range(EPOCHS))


def test_a_population_rounds_runs_show_their_epochs_while_it_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows every epoch here (the default batches them every 10 s), so that the round's
    runs can be looked at before its last epoch; at the end each epoch is on each run once."""
    monkeypatch.setattr("droptune.tracking._live.POPULATION_EVERY_S", 0.0)
    study, tracking, spec, uri = _setup(tmp_path)
    tracking.study_started(study)
    client = mlflow.MlflowClient(uri)
    parent = tracking.parent_run_id(study)
    epochs_seen: list[list[int]] = []
    calls = 0

    def each_epoch() -> None:  # called by the round at every epoch, before it logs it
        nonlocal calls
        calls += 1
        if calls != EPOCHS:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            runs = tracking.tracker.child_runs(parent)
            epochs_seen[:] = [_points(client, r.info.run_id, "val_loss") for r in runs]
            if len(runs) == 3 and all(len(e) == EPOCHS - 1 for e in epochs_seen):
                return
            time.sleep(0.1)

    objective = Objective(spec, worker="test", tracking=tracking)
    try:
        numbers = population_round(study, objective, [0, 1, 2], lambda s, t: None, each_epoch)
    finally:
        objective.close()
    assert len(numbers) == 3
    assert epochs_seen == [list(range(EPOCHS - 1))] * 3
    for trial in study.get_trials():
        assert trial.state.name == "COMPLETE"
        run_id = trial.user_attrs[RUN_ID_ATTR]
        assert _points(client, run_id, "val_loss") == list(range(EPOCHS))
        assert _points(client, run_id, "objective") == [EPOCHS - 1]
