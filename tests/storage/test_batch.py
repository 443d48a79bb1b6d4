"""Batched storage writes on real SQLite and PostgreSQL databases, with Optuna's rules for
finished trials: ``set_user_attrs`` (many attributes of one trial in one transaction),
``report_values`` (one epoch of a whole population in one transaction) and ``should_prune``
(a population's pruning decisions from one read of the study)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
import time
from typing import Any

import optuna
from optuna.trial import TrialState
import pytest
import sqlalchemy

from droptune.storage import create_trials
from droptune.storage import open_storage
from droptune.storage import report_values
from droptune.storage import set_params_many
from droptune.storage import set_user_attrs
from droptune.storage import set_user_attrs_many
from droptune.storage import should_prune_many as should_prune
from droptune.storage import tell_trials


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


def test_attributes_of_many_trials_at_once(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="many")
    a, b, done = study.ask(), study.ask(), study.ask()
    study.tell(done, 0.0)
    set_user_attrs_many([(a, {"x": 1, "y": [1, 2]}), (b, {"x": 2}), (a, {"z": None}), (b, {})])
    assert a.user_attrs == {"x": 1, "y": [1, 2], "z": None}
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs_many([(a, {"x": 3}), (done, {"x": 3})])
    reread = optuna.load_study(study_name="many", storage=storage_url).trials
    assert [t.user_attrs for t in reread] == [{"x": 1, "y": [1, 2], "z": None}, {"x": 2}, {}]


class _Recording(optuna.samplers.RandomSampler):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.after: list[tuple[int, TrialState, Any]] = []

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        assert trial.state == TrialState.RUNNING  # before the write, as in Optuna's tell
        self.after.append((trial.number, state, values))


def _told_study(url: str, name: str, batched: bool) -> tuple[list[Any], _Recording]:
    sampler = _Recording()
    study = optuna.create_study(storage=open_storage(url), study_name=name, sampler=sampler)
    trials = [study.ask() for _ in range(5)]
    for trial in trials:
        trial.suggest_float("x", 0.0, 1.0)
    trials[1].report(0.75, 0)
    trials[1].report(0.5, 1)
    trials[4].report(float("nan"), 0)
    outcomes = [
        (trials[0], TrialState.COMPLETE, 0.25),
        (trials[1], TrialState.PRUNED, None),  # takes its last reported value
        (trials[2], TrialState.PRUNED, None),  # reported nothing: no value
        (trials[3], TrialState.FAIL, None),
        (trials[4], TrialState.PRUNED, None),  # NaN is no value
    ]
    if batched:
        tell_trials(study, outcomes)
    else:
        for trial, state, values in outcomes:
            study.tell(trial, values, state=state)
    return optuna.load_study(study_name=name, storage=url).trials, sampler


def test_a_batch_tell_records_what_optunas_tell_records(storage_url: str) -> None:
    mine, my_sampler = _told_study(storage_url, "batch-tell", batched=True)
    theirs, their_sampler = _told_study(storage_url, "plain-tell", batched=False)
    for a, b in zip(mine, theirs, strict=True):
        assert (a.state, a.values, a.params) == (b.state, b.values, b.params)
        assert a.datetime_complete is not None and b.datetime_complete is not None
        assert abs((a.datetime_complete - b.datetime_complete).total_seconds()) < 120
    assert [t.values for t in mine] == [[0.25], [0.5], None, None, None]
    assert len(my_sampler.after) == 5
    assert [(n, s) for n, s, _ in my_sampler.after] == [(n, s) for n, s, _ in their_sampler.after]


@pytest.mark.parametrize(
    ("state", "values", "match"),
    [
        (TrialState.COMPLETE, float("nan"), "tell of trial 1: COMPLETE needs one finite float"),
        (TrialState.COMPLETE, None, "COMPLETE needs one finite float per objective"),
        (TrialState.COMPLETE, [0.1, 0.2], "per objective \\(1\\), got \\[0.1, 0.2\\]"),
        (TrialState.PRUNED, 0.5, "tell of trial 1: a PRUNED trial takes no values"),
        (TrialState.FAIL, 0.5, "a FAIL trial takes no values"),
        (TrialState.RUNNING, None, "state must be COMPLETE, PRUNED or FAIL"),
    ],
)
def test_a_bad_outcome_tells_nothing(
    sqlite_url: str, state: TrialState, values: Any, match: str
) -> None:
    study = optuna.create_study(storage=open_storage(sqlite_url))
    good, bad = study.ask(), study.ask()
    with pytest.raises(ValueError, match=match):
        tell_trials(study, [(good, TrialState.COMPLETE, 1.0), (bad, state, values)])
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2


def test_a_trial_finished_meanwhile_tells_nothing(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="meanwhile")
    mine, reaped = study.ask(), study.ask()
    study._storage.set_trial_state_values(reaped._trial_id, TrialState.FAIL)  # another worker
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        tell_trials(study, [(mine, TrialState.COMPLETE, 1.0), (reaped, TrialState.COMPLETE, 2.0)])
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert study.trials[0].values is None


def test_params_of_many_trials_in_one_call(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="params")
    a, b = study.ask(), study.ask()
    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    kind = optuna.distributions.CategoricalDistribution(["standard", "gaussian"])
    set_params_many(study._storage, [(a._trial_id, "x", 0.25, x), (a._trial_id, "kind", 1, kind)])
    set_params_many(study._storage, [(b._trial_id, "x", 0.75, x), (b._trial_id, "kind", 0, kind)])
    reread = optuna.load_study(study_name="params", storage=storage_url).trials
    assert [t.params for t in reread] == [
        {"x": 0.25, "kind": "gaussian"},
        {"x": 0.75, "kind": "standard"},
    ]
    c, done = study.ask(), study.ask()
    study.tell(done, 1.0)
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        set_params_many(study._storage, [(c._trial_id, "x", 1, kind)])  # x was a float
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_params_many(study._storage, [(c._trial_id, "x", 0.5, x), (done._trial_id, "y", 1, x)])
    assert [t.params for t in study.trials[2:]] == [{}, {}]


def test_params_batch_checks_distributions_it_does_not_know_against_the_database(
    storage_url: str,
) -> None:
    """Without the caller's knowledge of earlier distributions (a new process), the batch
    checks each name against the study's stored one, or against its own first row, as
    Optuna's per-param write does; a refused batch writes nothing."""
    study = optuna.create_study(storage=open_storage(storage_url), study_name="unknown")
    first, second, third = study.ask(), study.ask(), study.ask()
    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    kind = optuna.distributions.CategoricalDistribution(["standard", "gaussian"])
    backend = study._storage._backend
    backend.set_trials_params([(first._trial_id, "x", 0.5, x, None)])
    fresh = open_storage(storage_url)  # knows nothing of x
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        fresh.set_trials_params(
            [(second._trial_id, "y", 0.1, x, None), (second._trial_id, "x", 1, kind, None)]
        )
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        fresh.set_trials_params(  # a new name: the batch's first row is the reference
            [(second._trial_id, "z", 0.1, x, None), (third._trial_id, "z", 0, kind, None)]
        )
    with pytest.raises(sqlalchemy.exc.IntegrityError):  # (trial, name) is unique, as in Optuna
        fresh.set_trials_params(
            [(third._trial_id, "w", 0.2, x, None), (third._trial_id, "w", 0.3, x, None)]
        )
    fresh.set_trials_params(
        [(second._trial_id, "x", 0.75, x, None), (third._trial_id, "z", 0.5, x, None)]
    )
    reread = optuna.load_study(study_name="unknown", storage=storage_url).trials
    assert [t.params for t in reread] == [{"x": 0.5}, {"x": 0.75}, {"z": 0.5}]
    assert reread[2].distributions == {"z": x}


def test_heartbeats_of_many_trials_keep_them_alive(storage_url: str) -> None:
    """One transaction beats for a round: beaten trials stay RUNNING past the grace period of
    an unbeaten one, which goes stale; beating again moves the stored time forward."""
    storage = open_storage(storage_url, heartbeat_interval=1, grace_period=2, retry_stale=False)
    study = optuna.create_study(storage=storage, study_name="beats")
    beaten, idle = [study.ask(), study.ask()], study.ask()
    ids = [t._trial_id for t in beaten]
    backend = study._storage._backend
    backend.record_heartbeats([*ids, idle._trial_id])  # the first beat inserts the rows
    backend.record_heartbeats([])
    first = backend._get_stale_trial_ids(study._study_id)
    assert first == []
    for _ in range(4):  # past the grace period, beating only two of the three
        time.sleep(1.1)
        backend.record_heartbeats(ids)
    assert backend._get_stale_trial_ids(study._study_id) == [idle._trial_id]
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2 + [TrialState.FAIL]


def _create_concurrently(url: str, name: str, rounds: int, barrier: Any) -> list[list[int]]:
    """In a worker process: batches of new trials and single asks, interleaved, once every
    process is ready (so that they race)."""
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    barrier.wait(timeout=120)
    batches = []
    for _ in range(rounds):
        batches.append([t.number for t in create_trials(study._storage, study._study_id, 7)])
        study.ask()
    return batches


def test_trials_created_at_once_by_racing_processes_are_numbered_exactly(
    storage_url: str,
) -> None:
    """Four processes create batches and ask single trials on two studies at once: every
    study's numbers are 0..N-1 with no gap or duplicate, and each batch is consecutive."""
    import concurrent.futures
    import multiprocessing

    names = ["race-a", "race-b"]
    for name in names:
        optuna.create_study(storage=open_storage(storage_url), study_name=name)
    context = multiprocessing.get_context("spawn")
    with (
        context.Manager() as manager,
        concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as pool,
    ):
        barrier = manager.Barrier(4)
        jobs = [
            pool.submit(_create_concurrently, storage_url, names[i % 2], 6, barrier)
            for i in range(4)
        ]
        batches: dict[str, list[list[int]]] = {name: [] for name in names}
        for i, job in enumerate(jobs):
            batches[names[i % 2]].extend(job.result(timeout=240))
    for name in names:
        numbers = sorted(
            t.number for t in optuna.load_study(study_name=name, storage=storage_url).trials
        )
        assert numbers == list(range(2 * 6 * 8)), name
        for batch in batches[name]:
            assert batch == list(range(batch[0], batch[0] + 7)), batch


def test_trials_created_at_once_are_numbered_and_seen_like_asked_ones(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="created")
    study.ask()
    before = datetime.datetime.now()
    made = create_trials(study._storage, study._study_id, 3)
    assert [t.number for t in made] == [1, 2, 3]
    assert all(t.state == TrialState.RUNNING and t.params == {} for t in made)
    # started now, and stored so that a read gives back the same time (Optuna 5 stores UTC)
    assert all(t.datetime_start is not None and t.datetime_start >= before for t in made)
    stored = optuna.load_study(study_name="created", storage=storage_url).trials[1:4]
    assert [t.datetime_start for t in stored] == [t.datetime_start for t in made]
    assert study.ask().number == 4
    trial = optuna.Trial(study, made[1]._trial_id)
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, 1.0)
    reread = optuna.load_study(study_name="created", storage=storage_url).trials
    assert [t.number for t in reread] == [0, 1, 2, 3, 4]
    assert [t.state.name for t in reread] == [
        "RUNNING",
        "RUNNING",
        "COMPLETE",
        "RUNNING",
        "RUNNING",
    ]
    assert reread[2].params.keys() == {"x"}
    assert create_trials(optuna.create_study()._storage, 0, 2)[1].number == 1  # in memory
