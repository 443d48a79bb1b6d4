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
import contextlib
import copy
from dataclasses import dataclass
from dataclasses import field
import logging
import math
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.trial import TrialState

from droptune import timing
from droptune.data import build_datamodule
from droptune.records import BASELINE_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.records import POPULATION_ATTR
from droptune.records import RUN_ID_ATTR
from droptune.records import failure_attrs
from droptune.storage import ParamBuffer
from droptune.storage import ask_many
from droptune.storage import cached_trial
from droptune.storage import report_values
from droptune.storage import round_heartbeats
from droptune.storage import set_user_attrs
from droptune.storage import set_user_attrs_many
from droptune.storage import should_prune_many
from droptune.storage import storage_of
from droptune.storage import tell_trials
from droptune.storage import trial_id_of
from droptune.storage import trial_states
from droptune.storage import with_storage
from droptune.study.objective import DuplicateConfig
from droptune.study.objective import Objective
from droptune.study.outcome import Fitted
from droptune.study.outcome import trial_outcome


if TYPE_CHECKING:
    from droptune.config import TrainConfig

__all__ = ["Member", "population_round"]

log = logging.getLogger(__name__)
#: Fallback reasons already warned about in this process (later rounds log them at INFO).
_SAID: list[str] = []


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
    params = ParamBuffer(storage_of(study))
    view = with_storage(study, params)  # the round's trials suggest through the buffer
    members: list[Member] = []
    asked: list[optuna.Trial] = []
    spec = objective.spec

    def beating() -> list[int]:
        # the asked trials and those created for the round but not asked yet (they got a first
        # beat when created): asking P trials may take longer than the grace period
        return [trial_id_of(trial) for trial in asked] + params.unclaimed()

    objective.finished.refresh(study)  # one read for the round's duplicate checks
    with round_heartbeats(study, beating, spec.execution.heartbeat_interval):
        try:
            for slot, trial in zip(slots, ask_many(view, len(slots)), strict=True):
                asked.append(trial)
                bind(slot, trial)
                try:
                    config, _ = objective.config_for(trial)
                except Exception as exc:  # a config the search produced but droptune refuses
                    params.flush([trial_id_of(trial)])  # the suggestions that led to it are kept
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
        training = [trial_id_of(member.trial) for member in members]
        with round_heartbeats(study, lambda: training, spec.execution.heartbeat_interval):
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


def _groups(members: list[Member]) -> list[list[Member]]:
    """Members with the same dropout kind train together (the kind is shared in a population)."""
    by_kind: dict[str, list[Member]] = {}
    for member in members:
        by_kind.setdefault(member.config.regularization.dropout.kind, []).append(member)
    return list(by_kind.values())


def _train_group(
    objective: Objective, group: list[Member], check_stop: Callable[[], None]
) -> None:
    from droptune.exceptions import PopulationUnsupported
    from droptune.population import population_support
    from droptune.population import prepare_population

    configs = [m.config for m in group]
    reason = population_support(configs)
    prepared, clock = None, timing.snapshot()
    if reason is None:  # a user's model is also checked and trial-run as it is built
        try:
            prepared = prepare_population(
                configs,
                datamodule=_data(objective, group),
                init=objective.spec.execution.population_init,
            )
        except PopulationUnsupported as exc:
            reason = str(exc)
        except Exception as exc:  # never a failed trial because of batching
            reason = f"the population could not be built ({type(exc).__name__}: {exc})"
    if prepared is None:
        said, _SAID[:] = reason in _SAID, [*_SAID, str(reason)][-16:]
        log.log(
            logging.INFO if said else logging.WARNING,
            "population mode cannot train trials %s together (%s): running them one at a time",
            [m.trial.number for m in group],
            reason,
        )
        for member in group:
            check_stop()
            _single(objective, member)
        return
    _population(objective, group, check_stop, prepared, clock)


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


def _population(
    objective: Objective,
    group: list[Member],
    check_stop: Callable[[], None],
    prepared: Any,
    clock: dict[str, float],
) -> None:
    """Train ``group`` as one population: record the starts, train, record the ends. An
    exception leaves the members RUNNING for :func:`population_round` to fail."""
    from droptune.population import train_population

    spec = objective.spec
    metrics = spec.study.objectives
    prune = len(metrics) == 1 and spec.pruner.name != "none"
    timing.phase("setup")
    _start(objective, group)
    # the baseline reports like any member but is never pruned (see PruningCallback)
    exempt = {i for i, m in enumerate(group) if m.trial.user_attrs.get(BASELINE_ATTR)}

    live = _live_metrics(objective)

    def on_epochs(epoch: int, rows: dict[int, dict[str, float]]) -> list[int]:
        check_stop()
        if live is not None:
            for index, row in rows.items():
                member = group[index]
                live.add(
                    member.trial.number, lambda m=member: m.linked.get(RUN_ID_ATTR), epoch, row
                )
        if not prune:
            return []
        reported: dict[int, optuna.Trial] = {}
        for index, row in rows.items():
            value = row.get(metrics[0])
            if value is not None and math.isfinite(value):
                reported[index] = group[index].trial
        report_values([(trial, rows[i][metrics[0]], epoch) for i, trial in reported.items()])
        decisions = should_prune_many(group[0].trial.study, list(reported.values()))
        return [
            index
            for index, prune_it in zip(reported, decisions, strict=True)
            if prune_it and index not in exempt
        ]

    timing.phase("train")
    try:
        results = train_population(
            [m.config for m in group], on_epochs=on_epochs, prepared=prepared
        )
    finally:
        timing.phase("other")
    _end(objective, group, results, clock)


def _live_metrics(objective: Objective) -> Any:
    """Members' epochs on their MLflow runs while the round trains (batched), or None."""
    writer = objective.tracking_writer()
    if objective.tracking is None or writer is None or not objective.spec.tracking.live:
        return None
    from droptune.tracking._live import POPULATION_EVERY_S
    from droptune.tracking._live import LiveMetrics

    return LiveMetrics(objective.tracking, writer, every_s=POPULATION_EVERY_S)


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
    from droptune.records import SECONDS_ATTR

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
        fitted = Fitted(
            result.epochs,
            result.stopped_early,
            result.metrics,
            result.history,
            pruned=result.pruned,
            timed_out=result.timed_out,
        )
        outcome = trial_outcome(fitted, metrics, directions)
        attrs = outcome.attrs
        attrs[POPULATION_ATTR] = len(group)
        attrs.update(objective.end_attrs(result.history))
        attrs.update(_linked(objective, member))
        attrs[timing.TIMING_ATTR] = timing.add(member.asking, share)
        records.append((member.trial, attrs))
        outcomes.append((member.trial, outcome.state, outcome.values))
    set_user_attrs_many(records)
    told = tell_trials(group[0].trial.study, outcomes)
    for member, (_, state, _), recorded in zip(group, outcomes, told, strict=True):
        _write_run(objective, member.trial, member.config, state, recorded)


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
        (m.trial, {**failure_attrs(exc), **objective.end_attrs([]), **_linked(objective, m)})
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

    frozen = copy.deepcopy(cached_trial(trial))
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
    datamodule = build_datamodule(config)
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
    reason = failure_attrs(exc)[FAIL_REASON_ATTR]
    for trial_id in unclaimed:
        with contextlib.suppress(Exception):
            storage_of(study).set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
            storage_of(study).set_trial_state_values(trial_id, TrialState.FAIL)


def _fail(objective: Objective, trial: optuna.Trial, exc: BaseException) -> None:
    """Record why the trial failed, end its run, tell FAIL (a trial that never trained)."""
    with contextlib.suppress(Exception):
        set_user_attrs(trial, failure_attrs(exc))
    if not isinstance(exc, DuplicateConfig):  # a duplicate trained nothing: no MLflow run
        objective.record_end(trial, "FAIL", None, [], None)
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.study.tell(trial, state=TrialState.FAIL)
