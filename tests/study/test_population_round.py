"""One population round in process, on a real SQLite study: the batched bookkeeping records
what Optuna's own calls would (params, attributes, reports, states), an enqueued trial is
taken first, and a round broken off while asking or while training leaves no trial RUNNING."""

from __future__ import annotations

from pathlib import Path
import time
from typing import Any

import optuna
import pytest

from droptune.records import TIMING_ATTR
from droptune.storage import ParamBuffer
from droptune.storage import ask_many
from droptune.storage import open_storage
from droptune.storage import storage_of
from droptune.storage import with_storage
from droptune.study.objective import Objective
from droptune.study.population import population_round
from droptune.study.spec import spec_from_dict
from droptune.timing import CATEGORIES
from tests.study.helpers import TINY
from tests.study.helpers import merge


SEARCH = {
    "regularization.dropout.kind": {"choices": ["standard"]},
    "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
    "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
}


def _study(tmp_path: Path, **extra: Any) -> tuple[optuna.Study, Objective]:
    spec = spec_from_dict(merge(TINY, {"search": SEARCH, "train": {"max_epochs": 3}, **extra}))
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'round.db'}"),
        study_name="round",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    return study, Objective(spec, worker="test")


def test_a_round_records_every_member_as_optuna_would(tmp_path: Path) -> None:
    study, objective = _study(tmp_path)
    study.enqueue_trial({"regularization.dropout.hidden_rate": 0.25})
    bound: dict[int, int] = {}

    def bind(slot: int, trial: optuna.Trial) -> None:
        bound[slot] = trial.number

    started = time.perf_counter()
    numbers = population_round(study, objective, [0, 1, 2, 3], bind, lambda: None)
    wall = time.perf_counter() - started
    assert numbers == [0, 1, 2, 3] and bound == {0: 0, 1: 1, 2: 2, 3: 3}
    trials = study.get_trials()
    # the round's time, shared by its 4 members: the same share each, adding up to (nearly)
    # the round's wall time (the tell and the last write come after)
    shares = [t.user_attrs[TIMING_ATTR] for t in trials]
    assert all(share == shares[0] for share in shares)
    share = shares[0]
    assert set(share) == {*CATEGORIES, "total"}
    assert share["train"] > 0 and share["setup"] > 0 and share["storage"] > 0
    assert share["tracking"] == 0.0  # tracking off here
    assert sum(share[key] for key in CATEGORIES) == pytest.approx(share["total"], abs=1e-3)
    assert 0.5 * wall < 4 * share["total"] <= wall
    assert trials[0].params["regularization.dropout.hidden_rate"] == 0.25  # enqueued: first
    for trial in trials:
        assert trial.state.name in ("COMPLETE", "PRUNED")
        assert set(trial.params) == set(SEARCH)
        history = trial.user_attrs["droptune.history"]
        assert trial.user_attrs["droptune.epochs"] == len(history)
        assert trial.user_attrs["droptune.population"] == 4
        assert trial.user_attrs["droptune.worker"] == "test"
        assert trial.intermediate_values == {
            i: pytest.approx(row["val_loss"], abs=1e-6) for i, row in enumerate(history)
        }
        assert trial.datetime_start is not None and trial.datetime_complete is not None
        assert trial.datetime_start <= trial.datetime_complete
        if trial.state.name == "COMPLETE":
            assert trial.value == pytest.approx(min(r["val_loss"] for r in history), abs=1e-6)
    # a second round asks on: numbers go on from the first round's
    assert population_round(study, objective, [0, 1], lambda s, t: None, lambda: None) == [4, 5]


def test_members_that_cannot_train_together_run_one_at_a_time_with_their_asking_share(
    tmp_path: Path,
) -> None:
    """A monitor a population does not log: the round's members run one at a time (process
    mode), and each still records its share of the round's asking in ``droptune.timing`` (here
    a slow config per trial: 0.8 s of asking each)."""
    study, objective = _study(
        tmp_path, regularization={"early_stopping": {"monitor": "train_loss", "patience": 5}}
    )
    config_for = objective.config_for

    def slow_config(trial: optuna.Trial) -> Any:
        time.sleep(0.8)
        return config_for(trial)

    calls: list[tuple[dict[str, float], float]] = []

    class Recording(Objective):
        def __call__(
            self, trial: optuna.Trial, spent: dict[str, float] | None = None
        ) -> float | list[float]:
            started = time.perf_counter()
            try:
                return super().__call__(trial, spent=spent)
            finally:
                calls.append((dict(spent or {}), time.perf_counter() - started))

    objective.config_for = slow_config  # type: ignore[method-assign]
    objective.__class__ = Recording
    population_round(study, objective, [0, 1], lambda s, t: None, lambda: None)
    trials = study.get_trials()
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all("droptune.population" not in t.user_attrs for t in trials)  # process mode
    assert len(calls) == 2 and calls[0][0] == calls[1][0]
    asking = calls[0][0]
    assert asking["setup"] >= 0.8  # (2 x 0.8 s) / 2 members
    for trial, (_, wall) in zip(trials, calls, strict=True):
        recorded = trial.user_attrs[TIMING_ATTR]
        assert set(recorded) == {*CATEGORIES, "total"} and recorded["train"] > 0
        assert sum(recorded[key] for key in CATEGORIES) == pytest.approx(
            recorded["total"], abs=1e-3
        )
        # the asking share, then the call's own time (all but its last write, which a
        # loaded machine may stretch)
        assert asking["total"] + wall - 0.5 <= recorded["total"] <= asking["total"] + wall


def test_a_round_broken_off_while_asking_fails_every_created_trial(tmp_path: Path) -> None:
    study, objective = _study(tmp_path)

    def bind(slot: int, trial: optuna.Trial) -> None:
        if slot == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        population_round(study, objective, [0, 1, 2, 3], bind, lambda: None)
    trials = study.get_trials()
    assert len(trials) == 4  # created in one transaction for the round
    assert [t.state.name for t in trials] == ["FAIL"] * 4
    assert all("KeyboardInterrupt" in t.user_attrs["droptune.fail_reason"] for t in trials)


def test_a_round_broken_off_while_training_fails_its_members(tmp_path: Path) -> None:
    study, objective = _study(tmp_path)

    def check_stop() -> None:
        raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        population_round(study, objective, [0, 1, 2], lambda s, t: None, check_stop)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    for trial in trials:
        assert "KeyboardInterrupt: interrupted" in trial.user_attrs["droptune.fail_reason"]
        assert set(trial.params) == set(SEARCH)  # suggested before training, kept
        assert trial.user_attrs["droptune.seed"] is not None


def test_trials_a_killed_round_had_asked_go_stale_without_its_heartbeat_thread(
    tmp_path: Path,
) -> None:
    """A worker killed after asking but before its round's heartbeat thread started: the
    trials it created (and the waiting one it took) beat from the moment they ran, so
    Optuna's stale sweep fails them (a RUNNING trial without a heartbeat row is never stale,
    and its slot would stay taken)."""
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    study = optuna.create_study(
        storage=open_storage(url, heartbeat_interval=1, grace_period=2, retry_stale=False),
        study_name="killed",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.enqueue_trial({"x": 0.5})
    view = with_storage(study, ParamBuffer(storage_of(study)))
    asked = list(ask_many(view, 3))  # then the worker dies: no heartbeat thread, no tell
    assert [t.number for t in asked] == [0, 1, 2]
    time.sleep(3.5)
    optuna.storages.fail_stale_trials(study)
    states = [t.state.name for t in optuna.load_study(study_name="killed", storage=url).trials]
    assert states == ["FAIL", "FAIL", "FAIL"]


def test_a_round_that_asks_for_longer_than_the_grace_period_keeps_its_trials_alive(
    tmp_path: Path,
) -> None:
    """A slow sampler (here: a slow config per trial) makes asking a round take longer than
    the grace period; another worker's stale sweep meanwhile must not fail the trials the
    round has created or asked: they beat from their creation on."""
    url = f"sqlite:///{tmp_path / 'slow.db'}"
    spec = spec_from_dict(
        merge(
            TINY,
            {
                "search": SEARCH,
                "train": {"max_epochs": 1},
                "execution": {"heartbeat_interval": 1, "grace_period": 2},
            },
        )
    )
    study = optuna.create_study(
        storage=open_storage(url, heartbeat_interval=1, grace_period=2, retry_stale=False),
        study_name="slow",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    objective = Objective(spec, worker="test")
    other = optuna.load_study(
        study_name="slow",
        storage=open_storage(url, heartbeat_interval=1, grace_period=2, retry_stale=False),
    )
    config_for = objective.config_for

    def slow_config(trial: optuna.Trial) -> Any:
        time.sleep(1.6)
        optuna.storages.fail_stale_trials(other)  # another worker's sweep
        return config_for(trial)

    objective.config_for = slow_config  # type: ignore[method-assign]
    population_round(study, objective, [0, 1, 2], lambda s, t: None, lambda: None)
    states = [t.state.name for t in optuna.load_study(study_name="slow", storage=url).trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE"]
