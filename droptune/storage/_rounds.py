"""The views of a study's storage a population round works through.

* :class:`ParamBuffer`: the round's trials suggest through it; their params are written for
  the whole round in one transaction (each suggestion is its own otherwise).
* :func:`ask_many`: P asks that read the waiting trials only until none is left and create
  the rest of the round's trials in one transaction.
* :func:`should_prune_many`: P pruning decisions from one read of the study's trials.
* :func:`round_heartbeats`: one heartbeat transaction for all of a round's running trials.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import copy
import threading
from typing import Any

import optuna

from droptune.storage._optuna import backend_of
from droptune.storage._optuna import latest_trial
from droptune.storage._optuna import pop_waiting_trial
from droptune.storage._optuna import reset_trials_cache
from droptune.storage._optuna import storage_of
from droptune.storage._optuna import study_id_of
from droptune.storage._optuna import trial_id_of
from droptune.storage._optuna import with_storage
from droptune.storage._trials import create_trials
from droptune.storage._trials import set_params_many


__all__ = ["ParamBuffer", "ask_many", "round_heartbeats", "should_prune_many"]


@contextlib.contextmanager
def round_heartbeats(
    study: optuna.Study, trial_ids: Callable[[], list[int]], interval: int
) -> Iterator[None]:
    """Record a heartbeat for each trial ``trial_ids()`` names now and every ``interval``
    seconds until exit (the list may grow meanwhile: a round beats for its trials from the
    moment they are created, while it is still asking)."""
    storage: Any = storage_of(study)
    if not _beating(storage):
        yield
        return
    record = storage.record_heartbeat
    stop = threading.Event()

    batch = getattr(backend_of(storage), "record_heartbeats", None)

    def beat() -> None:
        if batch is not None:  # one transaction for the whole round
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                batch(trial_ids())
            return
        for trial_id in trial_ids():
            with contextlib.suppress(Exception):
                record(trial_id)

    beat()

    def loop() -> None:
        while not stop.wait(interval):
            beat()

    thread = threading.Thread(target=loop, name="droptune-population-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class ParamBuffer:
    """A study's storage that holds back the params its trials suggest until ``flush``, which
    writes them for all of a round's trials in one transaction (each suggestion is its own
    transaction otherwise: three or more per trial). Everything else goes to the real storage;
    after the flush, params are written at once as usual."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self._rows: list[tuple[int, str, float, Any]] = []
        self._buffering = True
        self._fresh: dict[int, optuna.trial.FrozenTrial] = {}

    def create_trials(self, study_id: int, count: int) -> list[int]:
        """``count`` new trials in one transaction; the first ``get_trial`` of each (made
        by ``optuna.Trial`` when it wraps the id) is answered without a read."""
        made = create_trials(self._storage, study_id, count)
        self._fresh.update((trial_id_of(t), t) for t in made)
        return [trial_id_of(t) for t in made]

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        fresh = self._fresh.pop(trial_id, None)
        if fresh is not None:
            return fresh
        return self._storage.get_trial(trial_id)

    def unclaimed(self) -> list[int]:
        """Trials created for the round that no ``optuna.Trial`` has wrapped yet."""
        return list(self._fresh)

    def set_trial_param(self, trial_id: int, name: str, internal: float, dist: Any) -> None:
        if not self._buffering:
            self._storage.set_trial_param(trial_id, name, internal, dist)
            return
        self._rows.append((trial_id, name, internal, dist))

    def flush(self, trial_ids: list[int] | None = None) -> None:
        """Write the held params (only those of ``trial_ids`` if given; else all, and stop
        holding)."""
        if trial_ids is None:
            rows, self._rows, self._buffering = self._rows, [], False
        else:
            rows = [row for row in self._rows if row[0] in trial_ids]
            self._rows = [row for row in self._rows if row[0] not in trial_ids]
        if rows:
            set_params_many(self._storage, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class _Snapshot:
    """A study's storage whose ``get_all_trials`` answers every call from one read.

    Optuna's cached RDB storage re-reads every unfinished trial in full (params, attributes,
    intermediate values) on each ``get_all_trials``, and a pruner calls it once per decision:
    P decisions over P running trials are O(P²) row reads per epoch. The pruners see the
    study's trials as they were when the epoch's decisions began, plus the system attributes
    the decisions write meanwhile (Successive Halving records each trial's rung there and
    compares the next trial against it), exactly as in a sequence of ``should_prune`` calls.
    Everything else goes to the real storage."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self._trials: dict[int, optuna.trial.FrozenTrial] | None = None

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Any = None
    ) -> list[optuna.trial.FrozenTrial]:
        if self._trials is None:
            read = self._storage.get_all_trials(study_id, deepcopy=False)
            self._trials = {trial_id_of(t): t for t in read}  # in trial-number order
        trials = [t for t in self._trials.values() if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._storage.set_trial_system_attr(trial_id, key, value)
        cached = None if self._trials is None else self._trials.get(trial_id)
        if cached is not None:  # a new copy: the storage's cached trial stays as it was read
            updated = copy.copy(cached)
            updated.system_attrs = {**cached.system_attrs, key: value}
            self._trials[trial_id] = updated  # type: ignore[index]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def should_prune_many(study: optuna.Study, trials: list[optuna.Trial]) -> list[bool]:
    """``trial.should_prune()`` for each of ``trials`` (running trials of ``study``, which
    reported their latest values already), with one read of the study's trials for all the
    decisions instead of one per decision."""
    if not trials:
        return []
    view = with_storage(study, _Snapshot(storage_of(study)))
    decisions = []
    for trial in trials:
        latest = latest_trial(trial)
        decisions.append(bool(study.pruner.prune(view, latest)))
    return decisions


def ask_many(study: optuna.Study, count: int) -> Iterator[optuna.Trial]:
    """``study.ask()`` ``count`` times, looking for waiting trials (enqueued, or re-queued
    after a worker died) only until none is left.

    Each of Optuna's ``ask`` calls re-reads every unfinished trial of the study to find waiting
    ones; inside a round, that is the round's own running trials, so P asks cost O(P²) reads.
    A trial made waiting by another worker meanwhile is picked up by the next round."""
    storage = storage_of(study)
    buffer = storage if isinstance(storage, ParamBuffer) else None
    fresh: Iterator[int] = iter(())
    waiting = True
    for left in range(count, 0, -1):
        reset_trials_cache(study)  # as ``ask`` does: samplers see the latest trials
        trial_id = pop_waiting_trial(study) if waiting else None
        if trial_id is not None:
            _first_beat(study, trial_id)
        else:
            if waiting and buffer is not None:  # the rest of the round in one transaction
                fresh = iter(buffer.create_trials(study_id_of(study), left))
            waiting = False
            trial_id = next(fresh, None)
            if trial_id is None:
                trial_id = storage.create_new_trial(study_id_of(study))
                _first_beat(study, trial_id)
        yield optuna.Trial(study, trial_id)


def _first_beat(study: optuna.Study, trial_id: int) -> None:
    """A heartbeat for a waiting trial the round just took (made RUNNING): until the round's
    heartbeat thread starts, a worker killed meanwhile must leave a trial that goes stale.
    (Trials the round creates get theirs in the creating transaction.)"""
    storage: Any = storage_of(study)
    if not _beating(storage):
        return
    with contextlib.suppress(Exception):  # the round's thread beats again shortly
        storage.record_heartbeat(trial_id)


def _beating(storage: Any) -> bool:
    """Whether ``storage`` records heartbeats (not every storage can; an RDB storage only
    with a heartbeat interval)."""
    interval_of = getattr(storage, "get_heartbeat_interval", None)
    return (
        hasattr(storage, "record_heartbeat")
        and interval_of is not None
        and interval_of() is not None
    )
