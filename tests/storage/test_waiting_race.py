"""Workers that ask at the same moment never take the same enqueued trial: a WAITING trial
becomes RUNNING for exactly one of them. (Optuna reads the state and then writes it; on
SQLite, which has no row locks, two workers starting together both took the baseline trial,
ran it twice and left the study one trial short — seen with 8 workers on a loaded machine.)"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna
import pytest

from droptune.storage import open_storage


def _take(url: str, trial_id: int, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    from optuna.trial import TrialState

    storage = open_storage(url)
    storage.get_trial(trial_id)  # connected and warm before the race starts
    barrier.wait()
    out.put(bool(storage.set_trial_state_values(trial_id, TrialState.RUNNING)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_exactly_one_of_many_racing_workers_takes_a_waiting_trial(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'race.db'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    study = optuna.create_study(storage=open_storage(url), study_name="race")
    context = mp.get_context("spawn")
    racers = 6
    for round_ in range(8):
        study.enqueue_trial({"x": float(round_)})
        waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        trial_id = waiting[-1]._trial_id
        barrier, out = context.Barrier(racers), context.Queue()
        procs = [
            context.Process(target=_take, args=(url, trial_id, barrier, out))
            for _ in range(racers)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        taken = [out.get(timeout=10) for _ in procs]
        assert sum(taken) == 1, (round_, taken)
        frozen = study._storage.get_trial(trial_id)
        assert frozen.state == optuna.trial.TrialState.RUNNING
        assert frozen.datetime_start is not None
