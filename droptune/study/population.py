"""Population rounds of a worker: P trials asked at once, trained as one batched network.

One round: claim up to P slots, ``ask`` one trial per slot (the sampler suggests as usual),
record their seeds, then train them together with :func:`droptune.population.train_population`,
grouped by dropout kind (the kind is shared inside one population). Each member reports every
validation epoch to Optuna and is pruned on its own; early stopping is per member.

Bookkeeping is batched per round, not per trial: the members' start attributes, each epoch's
reports, the results and the tells are one transaction each for the whole population, and the
pruning decisions of an epoch read the study once. The MLflow runs are created by the tracking
writer thread while the population trains, linked to their trials in the results transaction,
and completed by the writer after the tell while the next round trains.

Optuna's heartbeat thread only runs inside ``study.optimize``, so the round beats for its asked
trials itself: a worker killed mid-round leaves trials that go stale and are failed (and retried)
like any other. A group the population trainer cannot take (a family without population mode,
configs that differ in shape) runs its trials one at a time instead, with a message saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import copy
from dataclasses import dataclass
from dataclasses import field
import logging
import math
import threading
import traceback
from typing import TYPE_CHECKING
from typing import Any
import warnings

import optuna
from optuna.trial import TrialState

from droptune import timing
from droptune.storage import create_trials
from droptune.storage import report_values
from droptune.storage import set_params_many
from droptune.storage import set_user_attrs
from droptune.storage import set_user_attrs_many
from droptune.storage import tell_trials
from droptune.storage import trial_states
from droptune.study.objective import GAP_METRIC
from droptune.study.objective import DuplicateConfig
from droptune.study.objective import Objective
from droptune.study.objective import TrialFailed
from droptune.study.objective import result_attrs
from droptune.study.space import BASELINE_ATTR


if TYPE_CHECKING:
    from droptune.config import TrainConfig

__all__ = ["Member", "population_round", "should_prune"]

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One asked trial of a round."""

    slot: int
    trial: optuna.Trial
    config: TrainConfig
    #: What the trial records about its MLflow run (its id, or the tracking error), filled in
    #: by the tracking writer while the round trains.
    linked: dict[str, Any] = field(default_factory=dict)
    #: The member's share of the round's asking (``droptune.timing``'s categories).
    asking: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _heartbeats(
    study: optuna.Study, trial_ids: Callable[[], list[int]], interval: int
) -> Iterator[None]:
    """Record a heartbeat for each trial ``trial_ids()`` names now and every ``interval``
    seconds until exit (the list may grow meanwhile: a round beats for its trials from the
    moment they are created, while it is still asking)."""
    storage: Any = study._storage
    if not _beating(storage):
        yield
        return
    record = storage.record_heartbeat
    stop = threading.Event()

    batch = getattr(getattr(storage, "_backend", None), "record_heartbeats", None)

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


def population_round(
    study: optuna.Study,
    objective: Objective,
    slots: list[int],
    bind: Callable[[int, optuna.Trial], None],
    check_stop: Callable[[], None],
) -> list[int]:
    """Ask one trial per slot, train them (as populations where possible), tell them.

    Args:
        study: The study (its storage has the spec's heartbeat settings).
        objective: The worker's objective (configs, seeds, tracking, metric and direction).
        slots: The slots this worker claimed for the round.
        bind: ``bind(slot, trial)`` records which trial a slot holds.
        check_stop: Raises when a signal asked the worker to stop; called every epoch.

    Returns:
        The numbers of the round's trials.
    """
    clock = timing.snapshot()
    timing.phase("setup")
    try:
        return _round(study, objective, slots, bind, check_stop, clock)
    finally:
        timing.phase("other")


def _round(
    study: optuna.Study,
    objective: Objective,
    slots: list[int],
    bind: Callable[[int, optuna.Trial], None],
    check_stop: Callable[[], None],
    clock: dict[str, float],
) -> list[int]:
    params = _ParamBuffer(study._storage)
    view = copy.copy(study)  # the round's trials suggest through the buffer
    view._storage = params  # type: ignore[assignment]
    members: list[Member] = []
    asked: list[optuna.Trial] = []
    spec = objective.spec

    def beating() -> list[int]:
        # the asked trials and those created for the round but not asked yet (they got a first
        # beat when created): asking P trials may take longer than the grace period
        return [trial._trial_id for trial in asked] + params.unclaimed()

    objective.finished.refresh(study)  # one read for the round's duplicate checks
    with _heartbeats(study, beating, spec.execution.heartbeat_interval):
        try:
            for slot, trial in zip(slots, _ask(view, len(slots)), strict=True):
                asked.append(trial)
                bind(slot, trial)
                try:
                    config, _ = objective.config_for(trial)
                except Exception as exc:  # a config the search produced but droptune refuses
                    params.flush([trial._trial_id])  # the suggestions that led to it are kept
                    _fail(objective, trial, exc)
                    continue
                members.append(Member(slot, trial, config))
        except BaseException as exc:  # interrupted while asking: no created trial stays RUNNING
            _abandon(objective, study, asked, params.unclaimed(), exc)
            raise
    try:
        params.flush()
        asking = timing.since(clock, share=max(1, len(members)))
        for member in members:
            member.asking = asking
        training = [member.trial._trial_id for member in members]
        with _heartbeats(study, lambda: training, spec.execution.heartbeat_interval):
            for group in _groups(members):
                _train_group(objective, group, check_stop)
    except BaseException as exc:
        # Interrupted (or broken) mid-round: no asked trial may stay RUNNING.
        states = trial_states(study)
        _fail_members(
            objective, [m for m in members if states.get(m.trial.number) == "RUNNING"], exc
        )
        raise
    return [member.trial.number for member in members]


class _ParamBuffer:
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
        self._fresh.update((t._trial_id, t) for t in made)
        return [t._trial_id for t in made]

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
            self._trials = {t._trial_id: t for t in read}  # in trial-number order
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


def should_prune(study: optuna.Study, trials: list[optuna.Trial]) -> list[bool]:
    """``trial.should_prune()`` for each of ``trials`` (running trials of ``study``, which
    reported their latest values already), with one read of the study's trials for all the
    decisions instead of one per decision."""
    if not trials:
        return []
    view = copy.copy(study)
    view._storage = _Snapshot(study._storage)  # type: ignore[assignment]
    decisions = []
    for trial in trials:
        latest = trial._get_latest_trial()  # what ``Trial.should_prune`` hands the pruner
        decisions.append(bool(study.pruner.prune(view, latest)))
    return decisions


def _ask(study: optuna.Study, count: int) -> Iterator[optuna.Trial]:
    """``study.ask()`` ``count`` times, looking for waiting trials (enqueued, or re-queued
    after a worker died) only until none is left.

    Each of Optuna's ``ask`` calls re-reads every unfinished trial of the study to find waiting
    ones; inside a round, that is the round's own running trials, so P asks cost O(P²) reads.
    A trial made waiting by another worker meanwhile is picked up by the next round."""
    pop = getattr(study, "_pop_waiting_trial_id", None)
    local = getattr(study, "_thread_local", None)
    if pop is None or local is None:  # an Optuna without these internals: plain ``ask``
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
            for _ in range(count):
                yield study.ask()
        return
    buffer = study._storage if isinstance(study._storage, _ParamBuffer) else None
    fresh: Iterator[int] = iter(())
    waiting = True
    for left in range(count, 0, -1):
        local.cached_all_trials = None  # as ``ask`` does: samplers see the latest trials
        trial_id = pop() if waiting else None
        if trial_id is not None:
            _first_beat(study, trial_id)
        else:
            if waiting and buffer is not None:  # the rest of the round in one transaction
                fresh = iter(buffer.create_trials(study._study_id, left))
            waiting = False
            trial_id = next(fresh, None)
            if trial_id is None:
                trial_id = study._storage.create_new_trial(study._study_id)
                _first_beat(study, trial_id)
        yield optuna.Trial(study, trial_id)


def _first_beat(study: optuna.Study, trial_id: int) -> None:
    """A heartbeat for a waiting trial the round just took (made RUNNING): until the round's
    heartbeat thread starts, a worker killed meanwhile must leave a trial that goes stale.
    (Trials the round creates get theirs in the creating transaction.)"""
    storage: Any = study._storage
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


def _groups(members: list[Member]) -> list[list[Member]]:
    """Members with the same dropout kind train together (the kind is shared in a population)."""
    by_kind: dict[str, list[Member]] = {}
    for member in members:
        by_kind.setdefault(member.config.regularization.dropout.kind, []).append(member)
    return list(by_kind.values())


def _train_group(
    objective: Objective, group: list[Member], check_stop: Callable[[], None]
) -> None:
    from droptune.population import population_support

    reason = population_support([m.config for m in group])
    if reason is not None:
        log.warning(
            "population mode cannot train trials %s together (%s): running them one at a time",
            [m.trial.number for m in group],
            reason,
        )
        for member in group:
            check_stop()
            _single(objective, member)
        return
    _population(objective, group, check_stop)


def _single(objective: Objective, member: Member) -> None:
    """Process mode for one asked trial: the objective, then ``tell``."""
    study = member.trial.study
    try:
        value = objective(member.trial, spent=member.asking)
    except optuna.TrialPruned:
        study.tell(member.trial, state=TrialState.PRUNED)
        return
    except Exception:
        study.tell(member.trial, state=TrialState.FAIL)
        return
    study.tell(member.trial, value)


def _population(objective: Objective, group: list[Member], check_stop: Callable[[], None]) -> None:
    """Train ``group`` as one population: record the starts, train, record the ends. An
    exception leaves the members RUNNING for :func:`population_round` to fail."""
    from droptune.population import train_population

    spec = objective.spec
    metrics = spec.study.objectives
    prune = len(metrics) == 1 and spec.pruner.name != "none"
    clock = timing.snapshot()
    timing.phase("setup")
    _start(objective, group)
    # the baseline reports like any member but is never pruned (see PruningCallback)
    exempt = {i for i, m in enumerate(group) if m.trial.user_attrs.get(BASELINE_ATTR)}

    def on_epochs(epoch: int, rows: dict[int, dict[str, float]]) -> list[int]:
        check_stop()
        if not prune:
            return []
        reported: dict[int, optuna.Trial] = {}
        for index, row in rows.items():
            value = row.get(metrics[0])
            if value is not None and math.isfinite(value):
                reported[index] = group[index].trial
        report_values([(trial, rows[i][metrics[0]], epoch) for i, trial in reported.items()])
        decisions = should_prune(group[0].trial.study, list(reported.values()))
        return [
            index
            for index, prune_it in zip(reported, decisions, strict=True)
            if prune_it and index not in exempt
        ]

    data = _data(objective, group)
    timing.phase("train")
    try:
        results = train_population(
            [m.config for m in group],
            on_epochs=on_epochs,
            datamodule=data,
            init=spec.execution.population_init,
        )
    finally:
        timing.phase("other")
    _end(objective, group, results, clock)


def _start(objective: Objective, group: list[Member]) -> None:
    """The members' start attributes in one transaction; their MLflow runs created by the
    tracking writer while the population trains (linked to the trials when the round ends)."""
    set_user_attrs_many([(m.trial, objective.start_attrs(m.config)) for m in group])
    tracking, writer = objective.tracking, objective.tracking_writer()
    if tracking is None or writer is None:
        return
    study = group[0].trial.study
    starts = [(m.trial.number, dict(m.trial.user_attrs)) for m in group]

    def job() -> None:
        linked = tracking.start_runs(study, starts)
        for member in group:
            member.linked = linked.get(member.trial.number, {})

    writer.submit(job)


def _linked(objective: Objective, member: Member) -> dict[str, Any]:
    """The member's run link and the seconds its tracking took (call after a drain)."""
    from droptune.tracking._study import SECONDS_ATTR

    if objective.tracking is None:
        return {}
    return {**member.linked, SECONDS_ATTR: round(objective.tracking.spent(member.trial.number), 4)}


def _end(
    objective: Objective, group: list[Member], results: list[Any], clock: dict[str, float]
) -> None:
    """Every member's results and history in one transaction, one tell for all of them, then
    their MLflow runs completed in the background."""
    spec = objective.spec
    metrics = spec.study.objectives
    directions = spec.study.study_directions
    writer = objective.tracking_writer()
    if writer is not None:
        with timing.timed("tracking"):  # the round waits for MLflow
            writer.drain()  # this round's runs exist; the previous round's are written
    records: list[tuple[optuna.Trial, dict[str, Any]]] = []
    outcomes: list[tuple[optuna.Trial, TrialState, Any]] = []
    share = timing.since(clock, share=len(group))
    for member, result in zip(group, results, strict=True):
        trial, history = member.trial, result.history
        final = dict(result.metrics)
        if "val_loss" in final and "train_loss" in final:
            final[GAP_METRIC] = final["val_loss"] - final["train_loss"]
        attrs = result_attrs(result.epochs, result.stopped_early, final)
        attrs["droptune.population"] = len(group)
        attrs.update(objective.end_attrs(history))
        attrs.update(_linked(objective, member))
        attrs[timing.TIMING_ATTR] = timing.add(member.asking, share)
        records.append((trial, attrs))
        if result.pruned:
            attrs["droptune.pruned_at_epoch"] = result.epochs - 1
            outcomes.append((trial, TrialState.PRUNED, None))
            continue
        try:
            if result.timed_out:
                raise TrialFailed("the deadline passed while the trial was training")
            if len(metrics) == 1:
                values: float | list[float] = Objective._best(
                    metrics[0], directions[0], history, final
                )
            else:
                values = [Objective._final(m, final) for m in metrics]
        except TrialFailed as exc:
            attrs.update(_failure(exc))
            outcomes.append((trial, TrialState.FAIL, None))
            continue
        outcomes.append((trial, TrialState.COMPLETE, values))
    set_user_attrs_many(records)
    told = tell_trials(group[0].trial.study, outcomes)
    for member, outcome, recorded in zip(group, outcomes, told, strict=True):
        _write_run(objective, member.trial, member.config, outcome[1], recorded)


def _failure(exc: BaseException) -> dict[str, Any]:
    """Why a trial failed, as it records it."""
    return {
        "droptune.fail_reason": f"{type(exc).__name__}: {exc}"[:1000],
        "droptune.traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def _fail_members(objective: Objective, members: list[Member], exc: BaseException) -> None:
    """Record why, tell FAIL and complete the runs of a round's members still RUNNING after
    it broke off; best effort per member where the batch cannot be written (one of them was
    failed meanwhile, e.g. by a stale-trial sweep)."""
    if not members:
        return
    writer = objective.tracking_writer()
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.drain()  # the runs started for the round exist and get linked below
    records = [
        (m.trial, {**_failure(exc), **objective.end_attrs([]), **_linked(objective, m)})
        for m in members
    ]
    study = members[0].trial.study
    try:
        set_user_attrs_many(records)
        tell_trials(study, [(m.trial, TrialState.FAIL, None) for m in members])
    except Exception:
        for trial, attrs in records:
            with contextlib.suppress(Exception):
                set_user_attrs(trial, attrs)
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
    for member in members:
        _write_run(objective, member.trial, member.config, TrialState.FAIL, None)


def _write_run(
    objective: Objective,
    trial: optuna.Trial,
    config: TrainConfig,
    state: TrialState,
    values: list[float] | None,
) -> None:
    """Complete the told trial's MLflow run in the background (its params, tags, per-epoch
    metrics and final status), while the worker goes on with the next round. The run is
    written from the trial's own up-to-date copy (every write of the round went through it),
    with the state and values it was told, not from another read of the trial."""
    writer, tracking = objective.tracking_writer(), objective.tracking
    if writer is None or tracking is None:
        return
    import datetime

    frozen = copy.deepcopy(trial._cached_frozen_trial)
    frozen.state, frozen.values = state, values
    frozen.datetime_complete = datetime.datetime.now()
    study, data = trial.study, config.to_dict()
    writer.submit(lambda: tracking.trial_finished(study, frozen, data))


def _data(objective: Objective, group: list[Member]) -> Any:
    """The group's data, built once per worker while the data config stays the same (rounds
    then skip rebuilding and re-uploading it)."""
    import json

    config = group[0].config
    key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
    cached = objective.population_data
    if cached is not None and cached[0] == key:
        return cached[1]
    datamodule = config.build_datamodule()
    objective.population_data = (key, datamodule)
    return datamodule


def _abandon(
    objective: Objective,
    study: optuna.Study,
    asked: list[optuna.Trial],
    unclaimed: list[int],
    exc: BaseException,
) -> None:
    """Fail the trials of a round interrupted while it was still asking: those already asked
    (with their runs) and those created for it but not yet asked."""
    states = trial_states(study)
    for trial in asked:
        if states.get(trial.number) == "RUNNING":
            with contextlib.suppress(Exception):
                _fail(objective, trial, exc)
    reason = _failure(exc)["droptune.fail_reason"]
    for trial_id in unclaimed:
        with contextlib.suppress(Exception):
            study._storage.set_trial_user_attr(trial_id, "droptune.fail_reason", reason)
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _fail(objective: Objective, trial: optuna.Trial, exc: BaseException) -> None:
    """Record why the trial failed, end its run, tell FAIL (a trial that never trained)."""
    with contextlib.suppress(Exception):
        set_user_attrs(trial, _failure(exc))
    if not isinstance(exc, DuplicateConfig):  # a duplicate trained nothing: no MLflow run
        objective.record_end(trial, "FAIL", None, [], None)
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.study.tell(trial, state=TrialState.FAIL)
