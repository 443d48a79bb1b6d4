"""Trials written and read in batches through a study: what a population round does to P
trials at once in one transaction (create, suggest, record attributes, report, tell), with the
semantics of Optuna's one-trial calls, and narrow reads of trial states. Each function falls
back to Optuna's public one-trial calls on a storage that is not droptune's (an in-memory or
journal storage)."""

from __future__ import annotations

import math
from typing import Any
import warnings

import optuna

from droptune.storage._optuna import backend_of
from droptune.storage._optuna import cache_lock
from droptune.storage._optuna import cached_over
from droptune.storage._optuna import cached_trial
from droptune.storage._optuna import create_scoped_session
from droptune.storage._optuna import filter_study
from droptune.storage._optuna import latest_trial
from droptune.storage._optuna import models
from droptune.storage._optuna import param_distributions
from droptune.storage._optuna import register_trials
from droptune.storage._optuna import reset_trials_cache
from droptune.storage._optuna import storage_of
from droptune.storage._optuna import study_id_of
from droptune.storage._optuna import trial_id_of
from droptune.storage._retry import retry_outage


def _batch(storage: Any, name: str) -> Any:
    """droptune's batch method ``name`` of the RDB storage behind ``storage`` (Optuna's cache
    or the storage itself), or None where the storage is not droptune's."""
    return getattr(backend_of(storage), name, None)


def create_trials(storage: Any, study_id: int, count: int) -> list[Any]:
    """``count`` new RUNNING trials of a study, created in one transaction when ``storage``
    is droptune's behind Optuna's cache (registered in that cache as its ``create_new_trial``
    does); their ``FrozenTrial`` (empty: no params or attributes yet). Elsewhere one
    ``create_new_trial`` each."""
    from optuna.trial import FrozenTrial

    batch = _batch(storage, "create_new_trials")
    if batch is None or not cached_over(storage):
        made = []
        for _ in range(count):
            trial_id = storage.create_new_trial(study_id)
            made.append(storage.get_trial(trial_id))
        return made
    frozen: list[FrozenTrial] = batch(study_id, count)
    register_trials(storage, study_id, frozen)
    return frozen


def set_params_many(storage: Any, rows: list[tuple[int, str, float, Any]]) -> None:
    """``storage.set_trial_param(trial_id, name, internal value, distribution)`` for every
    row, in one transaction when ``storage`` is droptune's behind Optuna's cache (a trial's
    suggestions are one transaction each otherwise). The cache's record of each param's
    distribution is used and kept, as its own ``set_trial_param`` does."""
    batch = _batch(storage, "set_trials_params")
    if batch is None or not cached_over(storage):
        for row in rows:
            storage.set_trial_param(*row)
        return
    with cache_lock(storage):
        resolved = []
        for trial_id, name, internal, distribution in rows:
            known = param_distributions(storage, trial_id)
            resolved.append((trial_id, name, internal, distribution, known.get(name)))
        batch(resolved)
        for trial_id, name, _, distribution in rows:
            param_distributions(storage, trial_id).setdefault(name, distribution)


def set_user_attrs_many(attrs: list[tuple[Any, dict[str, Any]]]) -> None:
    """:func:`set_user_attrs` for several trials of one study, in one transaction when the
    storage is droptune's. Nothing is written if one trial has finished."""
    attrs = [(trial, items) for trial, items in attrs if items]
    if not attrs:
        return
    storage = storage_of(attrs[0][0].study)
    batch = _batch(storage, "set_trials_user_attrs")
    if batch is None:
        for trial, items in attrs:
            for key, value in items.items():
                trial.set_user_attr(key, value)
        return
    merged: dict[int, dict[str, Any]] = {}
    for trial, items in attrs:
        merged.setdefault(trial_id_of(trial), {}).update(items)
    batch(merged)
    for trial, items in attrs:
        cached_trial(trial).user_attrs.update(items)  # what ``trial.user_attrs`` reads


def set_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """``trial.set_user_attr`` for every item of ``attrs``, in one transaction when the study's
    storage is droptune's (each of Optuna's writes is its own transaction, several
    milliseconds apiece; a trial records a dozen attributes or more)."""
    set_user_attrs_many([(trial, attrs)])


def report_values(reports: list[tuple[Any, float, int]]) -> None:
    """``trial.report(value, step)`` for every ``(trial, value, step)``, in one transaction
    when the trials' storage is droptune's (a population reports P trials every epoch; each of
    Optuna's writes is its own transaction).

    As ``Trial.report``: ``value`` must convert to float and ``step`` to a non-negative int,
    and a step a trial already reported is ignored. The trials must belong to one study."""
    if not reports:
        return
    checked: list[tuple[Any, float, int]] = []
    for trial, value, step in reports:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"report of trial {trial.number}: value must be a float, got {value!r}"
            ) from None
        if int(step) != step or step < 0:
            raise ValueError(
                f"report of trial {trial.number}: step must be an int >= 0, got {step!r}"
            )
        if int(step) in cached_trial(trial).intermediate_values:
            continue  # Optuna keeps the first value reported for a step
        checked.append((trial, number, int(step)))
    storage = storage_of(reports[0][0].study)
    batch = _batch(storage, "set_trials_intermediate_values")
    if batch is None:
        for trial, value, step in checked:
            trial.report(value, step)
        return
    if checked:
        batch([(trial_id_of(trial), step, value) for trial, value, step in checked])
    for trial, value, step in checked:  # what ``Trial.report`` caches and pruners read
        cached_trial(trial).intermediate_values[step] = value


def tell_trials(study: Any, outcomes: list[tuple[Any, Any, Any]]) -> list[list[float] | None]:
    """``study.tell(trial, values, state=state)`` for every ``(trial, state, values)``, with
    the states and values of all trials written in one transaction when the storage is
    droptune's (Optuna's ``tell`` costs two full reads of the trial and a transaction each).

    As Optuna's ``tell``: ``COMPLETE`` needs one finite float per objective; ``PRUNED`` records
    the trial's last reported value as its value when it is one; ``FAIL`` has none; the
    sampler's ``after_trial`` sees each trial before the write. If a trial can no longer be
    told (it finished meanwhile), nothing is written and Optuna's
    ``UpdateFinishedTrialError`` is raised.

    Returns:
        The values recorded for each trial (None where it has none)."""
    from optuna.trial import TrialState

    if not outcomes:
        return []
    batch = _batch(storage_of(study), "set_trials_state_values")
    if batch is None:
        return [study.tell(trial, values, state=state).values for trial, state, values in outcomes]
    reset_trials_cache(study)  # as ``tell``: the cache held one trial's view
    checked: list[tuple[Any, Any, list[float] | None]] = []
    for trial, state, values in outcomes:
        told: list[float] | None = None
        if state == TrialState.COMPLETE:
            told = _feasible(study, trial.number, values)
            if told is None:
                raise ValueError(
                    f"tell of trial {trial.number}: COMPLETE needs one finite float per "
                    f"objective ({len(study.directions)}), got {values!r}"
                )
        elif state == TrialState.PRUNED:
            if values is not None:
                raise ValueError(f"tell of trial {trial.number}: a PRUNED trial takes no values")
            reported = cached_trial(trial).intermediate_values
            if reported:
                told = _feasible(study, trial.number, reported[max(reported)])
        elif state == TrialState.FAIL:
            if values is not None:
                raise ValueError(f"tell of trial {trial.number}: a FAIL trial takes no values")
        else:
            raise ValueError(
                f"tell of trial {trial.number}: state must be COMPLETE, PRUNED or FAIL, got "
                f"{state!r}"
            )
        checked.append((trial, state, told))
    for trial, state, told in checked:
        frozen = latest_trial(trial)
        study.sampler.after_trial(filter_study(study, frozen), frozen, state, told)
    batch([(trial_id_of(trial), state, told) for trial, state, told in checked])
    return [told for _, _, told in checked]


def _feasible(study: Any, number: int, values: Any) -> list[float] | None:
    """``values`` as one float per objective, or None where Optuna's ``tell`` would refuse
    them (not floats, NaN, the wrong count)."""
    listed = list(values) if isinstance(values, (list, tuple)) else [values]
    try:
        floats = [float(v) for v in listed]
    except (TypeError, ValueError):
        return None
    if any(math.isnan(v) for v in floats) or len(floats) != len(study.directions):
        return None
    return floats


def trial_states(study: Any) -> dict[int, str]:
    """``{trial number: state name}`` for every trial of ``study``.

    On an RDB storage this is one narrow query (number and state only). Optuna's
    ``get_trials`` re-reads every unfinished trial with all its params and attributes on each
    call, which costs seconds per call once hundreds of population trials are running, and
    workers and the runner poll the states all the time."""
    import optuna

    backend = backend_of(storage_of(study))
    if not isinstance(backend, optuna.storages.RDBStorage):
        return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}

    def query() -> dict[int, str]:
        model = models.TrialModel
        with create_scoped_session(backend.scoped_session) as session:
            rows = (
                session.query(model.number, model.state)
                .filter(model.study_id == study_id_of(study))
                .all()
            )
        return {int(number): state.name for number, state in rows}

    return retry_outage(query, "trial_states")


def fixed_params(trial: Any) -> dict[str, Any]:
    """The params ``trial`` (an ``optuna.Trial``) was enqueued with (``study.enqueue_trial``,
    droptune's baseline), empty for a sampled trial. Optuna keeps them in the trial's
    ``fixed_params`` system attribute, which its public ``Trial`` no longer exposes."""
    return dict(cached_trial(trial).system_attrs.get("fixed_params") or {})


def is_enqueued(trial: Any) -> bool:
    """Whether ``trial`` was enqueued with fixed params rather than sampled."""
    return bool(fixed_params(trial))


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's ``fail_stale_trials`` (FAIL every RUNNING trial whose heartbeat is older than
    the grace period; its retry callback re-queues their params), without its "experimental"
    warning on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
