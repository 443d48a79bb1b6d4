"""Batched storage writes on real SQLite and PostgreSQL databases, with Optuna's rules for
finished trials: ``set_user_attrs`` (many attributes of one trial in one transaction),
``report_values`` (one epoch of a whole population in one transaction) and ``should_prune``
(a population's pruning decisions from one read of the study)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
import pytest

from droptune.storage import open_storage
from droptune.storage import report_values
from droptune.storage import set_user_attrs
from droptune.study.population import should_prune


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


def test_reports_of_many_trials_land_in_one_call(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="reports")
    a, b, c = study.ask(), study.ask(), study.ask()
    a.report(0.5, 0)
    report_values([(a, 0.9, 0), (a, 0.4, 1), (b, float("inf"), 0), (c, float("nan"), 0)])
    report_values([(b, 0.25, 1)])
    report_values([])
    assert a.should_prune() is False  # the trials' own copies are current
    assert a._cached_frozen_trial.intermediate_values == {0: 0.5, 1: 0.4}
    reread = optuna.load_study(study_name="reports", storage=storage_url).trials
    assert reread[0].intermediate_values == {0: 0.5, 1: 0.4}  # a reported step is kept
    assert reread[1].intermediate_values == {0: float("inf"), 1: 0.25}
    assert math.isnan(reread[2].intermediate_values[0])


def test_reports_naming_a_finished_trial_write_nothing(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="finished")
    running, done = study.ask(), study.ask()
    study.tell(done, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        report_values([(running, 0.5, 0), (done, 0.5, 0)])
    assert [t.intermediate_values for t in study.trials] == [{}, {}]


@pytest.mark.parametrize(
    ("value", "step", "error", "match"),
    [
        ("high", 0, TypeError, "report of trial 0: value must be a float, got 'high'"),
        (0.5, -1, ValueError, "report of trial 0: step must be an int >= 0, got -1"),
        (0.5, 1.5, ValueError, "step must be an int >= 0, got 1.5"),
    ],
)
def test_bad_reports_are_refused_naming_the_trial(
    sqlite_url: str, value: Any, step: Any, error: type[Exception], match: str
) -> None:
    study = optuna.create_study(storage=open_storage(sqlite_url))
    trial = study.ask()
    with pytest.raises(error, match=match):
        report_values([(trial, value, step)])
    assert study.trials[0].intermediate_values == {}


def _pruning_study(url: str, name: str, pruner: optuna.pruners.BasePruner) -> list[Any]:
    """Six finished trials with curves, then five running ones reported up to step 2."""
    study = optuna.create_study(
        storage=open_storage(url), study_name=name, pruner=pruner, direction="minimize"
    )
    for i in range(6):
        trial = study.ask()
        for step in range(4):
            trial.report(1.0 - 0.1 * step + 0.05 * i, step)
        study.tell(trial, 1.0 - 0.3 + 0.05 * i)
    running = [study.ask() for _ in range(5)]
    for step in range(3):
        report_values([(t, 0.98 - 0.1 * step + 0.04 * j, step) for j, t in enumerate(running)])
    return running


PRUNERS = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
    "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=4),
}


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_pruning_decisions_match_optunas_from_one_read(
    storage_url: str, tmp_path: Path, pruner: str
) -> None:
    # the same study name in another database: Hyperband picks brackets by name and number
    mine = _pruning_study(storage_url, pruner, PRUNERS[pruner]())
    theirs = _pruning_study(f"sqlite:///{tmp_path / 'theirs.db'}", pruner, PRUNERS[pruner]())
    backend = mine[0].study._storage._backend
    reads = 0
    read = backend._get_trials

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return read(*args, **kwargs)

    backend._get_trials = counted
    decisions = should_prune(mine[0].study, mine)
    expected = [t.should_prune() for t in theirs]
    assert decisions == expected
    assert any(expected) and not all(expected)  # the study tells the trials apart
    assert reads <= 1  # Optuna's own calls re-read the running trials once per decision
    assert should_prune(mine[0].study, []) == []
