"""``set_user_attrs``: many attributes of one trial in one transaction, on real SQLite and
PostgreSQL databases, with Optuna's rules for finished trials."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState
import pytest

from droptune.storage import open_storage
from droptune.storage import set_user_attrs


ATTRS = {
    "droptune.epochs": 5,
    "droptune.stopped_early": False,
    "metric.val_acc": 0.8125,
    "droptune.history": [{"epoch": 0.0, "val_acc": 0.5}, {"epoch": 1.0, "val_acc": 0.8125}],
    "note": "naïve ünïcode",
    "nothing": None,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("pg_url"))


def test_attributes_are_written_at_once_and_read_back_by_optuna(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="batch")
    trial = study.ask()
    trial.set_user_attr("droptune.epochs", 1)  # an existing key is overwritten
    set_user_attrs(trial, ATTRS)
    assert trial.user_attrs == ATTRS  # the trial's own copy is current too
    other = study.ask()
    set_user_attrs(other, {"metric.val_acc": 0.25})
    study.tell(trial, 1.0)
    reread = optuna.load_study(study_name="batch", storage=storage_url)
    assert reread.trials[0].user_attrs == ATTRS
    assert reread.trials[1].user_attrs == {"metric.val_acc": 0.25}


def test_a_finished_trial_refuses_them_and_keeps_what_it_had(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="done")
    trial = study.ask()
    set_user_attrs(trial, {"a": 1})
    study.tell(trial, state=TrialState.PRUNED)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"a": 2, "b": 3})
    assert study.trials[0].user_attrs == {"a": 1}


def test_other_storages_get_one_write_per_attribute() -> None:
    study = optuna.create_study()  # in-memory: no batch method
    trial = study.ask()
    set_user_attrs(trial, ATTRS)
    set_user_attrs(trial, {})
    assert study.trials[0].user_attrs == ATTRS
