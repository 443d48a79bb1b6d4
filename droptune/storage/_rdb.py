"""``DroptuneStorage``: Optuna's ``RDBStorage`` that rides out database outages and writes a
population round's trials in batches.

* Every call a worker, ``run`` or ``status`` makes during a study is retried with backoff
  while the database is unreachable (:func:`~droptune.storage.retry_outage`): a PostgreSQL
  restart mid-study costs a pause, not a crashed worker or a heartbeat thread that died and
  let its running trial go stale.
* Batch methods (``create_new_trials``, ``set_trials_params``, ``set_trials_user_attrs``,
  ``set_trials_intermediate_values``, ``set_trials_state_values``, ``record_heartbeats``)
  write many trials in one transaction, with the checks Optuna's one-trial methods make: a
  trial that is no longer updatable refuses the whole batch, as it refuses one write.
* Heartbeats: a worker killed mid-trial leaves its trial RUNNING until the grace period has
  passed; then any worker (or ``droptune status``) marks it FAIL, and the retry callback
  enqueues the same parameters once more.
"""

from __future__ import annotations

import functools
from typing import Any

import optuna

from droptune.storage._optuna import create_scoped_session
from droptune.storage._optuna import models
from droptune.storage._retry import retry_outage


__all__ = ["DroptuneStorage"]

#: RDBStorage methods retried while the database is unreachable (everything a worker, ``run``
#: and ``status`` call during a study).
_RETRIED = (
    "get_study_id_from_name",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "set_study_user_attr",
    "set_study_system_attr",
    "create_new_trial",
    "set_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "get_trial_id_from_study_id_trial_number",
    "record_heartbeat",
    "get_study_name_from_id",
    "get_all_studies",
    # What Optuna's cache layer calls on the RDB storage directly.
    "_get_stale_trial_ids",
    "_get_trials",
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
)


class DroptuneStorage(optuna.storages.RDBStorage):
    """An ``RDBStorage`` (same constructor) whose calls ride out a database outage, with
    batch writes for population rounds. ``droptune.storage.open_storage`` makes one."""

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        """Optuna's, except that making a WAITING trial RUNNING is one conditional update
        (``... WHERE state = 'WAITING'``): Optuna reads the state, then writes it, which on
        SQLite (no row locks) lets two workers that ask at once both take the same enqueued
        trial, run it twice and tell it twice."""
        from optuna.trial import TrialState

        if state == TrialState.RUNNING and values is None:
            return bool(retry_outage(lambda: _start_waiting(self, trial_id), "start_trial"))
        parent = optuna.storages.RDBStorage.set_trial_state_values
        return bool(
            retry_outage(lambda: parent(self, trial_id, state, values), "set_trial_state_values")
        )

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes of one trial in one transaction."""
        retry_outage(lambda: _write_user_attrs(self, {trial_id: attrs}), "set_trial_user_attrs")

    def set_trials_user_attrs(self, attrs: dict[int, dict[str, Any]]) -> None:
        retry_outage(lambda: _write_user_attrs(self, attrs), "set_trials_user_attrs")

    def create_new_trials(self, study_id: int, count: int) -> list[optuna.trial.FrozenTrial]:
        return retry_outage(lambda: _create_trials(self, study_id, count), "create_new_trials")

    def record_heartbeats(self, trial_ids: list[int]) -> None:
        retry_outage(lambda: _write_heartbeats(self, trial_ids), "record_heartbeats")

    def set_trials_params(self, rows: list[tuple[Any, ...]]) -> None:
        retry_outage(lambda: _write_params(self, rows), "set_trials_params")

    def set_trials_state_values(self, outcomes: list[tuple[int, Any, list[float] | None]]) -> None:
        retry_outage(lambda: _write_state_values(self, outcomes), "set_trials_state_values")

    def set_trials_intermediate_values(self, values: list[tuple[int, int, float]]) -> None:
        retry_outage(
            lambda: _write_intermediate_values(self, values), "set_trials_intermediate_values"
        )


def _retried(name: str) -> Any:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return retry_outage(lambda: method(self, *args, **kwargs), name)

    return wrapper


for _name in _RETRIED:
    setattr(DroptuneStorage, _name, _retried(_name))


def _start_waiting(storage: Any, trial_id: int) -> bool:
    """WAITING → RUNNING for one trial, in one statement that only a WAITING trial matches:
    of several processes asking at once, exactly one gets it (True); a trial that does not
    exist or has finished raises as Optuna's ``set_trial_state_values`` does."""
    from datetime import datetime

    from optuna.trial import TrialState
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy import update

    model: Any = models.TrialModel
    with create_scoped_session(storage.scoped_session) as session:
        trial = model.find_or_raise_by_id(trial_id, session)
        storage.check_trial_is_updatable(trial_id, trial.state)
        if trial.state != TrialState.WAITING:
            return False
        # the start time as the model stores it (as Optuna's own setter would)
        column = model.__table__.c.datetime_start
        probe = model(datetime_start=datetime.now())
        stored = getattr(probe, sa_inspect(model).get_property_by_column(column).key)
        table = model.__table__
        result: Any = session.execute(
            update(table)
            .where(table.c.trial_id == trial_id, table.c.state == TrialState.WAITING)
            .values(state=TrialState.RUNNING, datetime_start=stored)
        )
    return bool(result.rowcount == 1)


def _check_updatable(storage: Any, ids: list[int], states: dict[int, Any]) -> None:
    """Raise as Optuna does unless every trial of ``ids`` is in ``states`` (it exists) and
    may still be written."""
    for trial_id in ids:
        if trial_id not in states:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        storage.check_trial_is_updatable(trial_id, states[trial_id])


def _updatable(storage: Any, session: Any, ids: list[int], lock: bool = False) -> None:
    """Raise as Optuna does unless every trial of ``ids`` exists and is still RUNNING (or
    WAITING): one query for all of them (``lock``: ``FOR UPDATE`` where the database has it).
    Call it before writing anything in ``session``: Optuna's refusal reads the trial through
    the same thread-local session and commits whatever that session holds."""

    trials = models.TrialModel
    query = session.query(trials.trial_id, trials.state).filter(trials.trial_id.in_(ids))
    if lock:
        query = query.with_for_update()
    _check_updatable(storage, ids, dict(query.all()))


def _upsert(session: Any, model: Any, rows: list[dict[str, Any]], keys: list[Any]) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` of every row (SQLite, PostgreSQL): one
    statement executed for the list, which SQLAlchemy sends as few multi-row batches (its
    "insertmanyvalues"; a statement compiled once and cached, where building one multi-row
    ``VALUES`` per call cost ~10x more)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.dialects import sqlite

    if not rows:
        return
    insert: Any = sqlite.insert if session.bind.dialect.name == "sqlite" else postgresql.insert
    names = {column.name for column in keys}
    stmt = insert(model.__table__)  # by column name: an unknown key raises
    update = {c: getattr(stmt.excluded, c) for c in rows[0] if c not in names}
    session.execute(stmt.on_conflict_do_update(index_elements=keys, set_=update), rows)


def _bulk(storage: Any) -> bool:
    """Whether the database takes droptune's multi-row upserts."""
    return bool(storage.engine.name in ("sqlite", "postgresql"))


def _write_user_attrs(storage: Any, attrs: dict[int, dict[str, Any]]) -> None:
    """User attributes of several trials in one transaction: one multi-row upsert on SQLite
    and PostgreSQL (Optuna's own upsert, for many keys at once), Optuna's per-key write inside
    the same transaction elsewhere. Every trial must still be updatable, as for
    ``set_trial_user_attr``; if one is not, nothing is written."""
    import json

    model = models.TrialUserAttributeModel
    attrs = {trial_id: items for trial_id, items in attrs.items() if items}
    if not attrs:
        return
    with create_scoped_session(storage.scoped_session, True) as session:
        _updatable(storage, session, sorted(attrs))
        if not _bulk(storage):
            for trial_id, items in attrs.items():
                for key, value in items.items():
                    storage._set_trial_attr_without_commit(session, model, trial_id, key, value)
            return
        rows = [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for trial_id, items in attrs.items()
            for key, value in items.items()
        ]
        _upsert(session, model, rows, [model.trial_id, model.key])


def _write_state_values(storage: Any, outcomes: list[tuple[int, Any, list[float] | None]]) -> None:
    """``set_trial_state_values`` for several trials (each to a finished state) in one
    transaction. If one trial is no longer updatable, nothing is written."""
    from datetime import datetime

    if not outcomes:
        return
    model: Any = models.TrialModel
    values: Any = models.TrialValueModel
    ids = sorted({trial_id for trial_id, _, _ in outcomes})
    with create_scoped_session(storage.scoped_session, True) as session:
        found = {
            t.trial_id: t
            for t in session.query(model).filter(model.trial_id.in_(ids)).with_for_update()
        }
        _check_updatable(storage, ids, {trial_id: t.state for trial_id, t in found.items()})
        rows = [
            {
                "trial_id": trial_id,
                "objective": objective,
                "value": stored,
                "value_type": kind,
            }
            for trial_id, _, told in outcomes
            for objective, (stored, kind) in enumerate(
                values.value_to_stored_repr(v) for v in told or []
            )
        ]
        if rows and _bulk(storage):
            _upsert(session, values, rows, [values.trial_id, values.objective])
        elif rows:
            for trial_id, _, told in outcomes:
                for objective, value in enumerate(told or []):
                    storage._set_trial_value_without_commit(
                        session, found[trial_id], objective, value
                    )
        now = datetime.now()
        for trial_id, state, _ in outcomes:  # Optuna's own setters (its datetime convention)
            found[trial_id].state = state
            found[trial_id].datetime_complete = now


def _create_trials(storage: Any, study_id: int, count: int) -> list[Any]:
    """``count`` new RUNNING trials of ``study_id`` in one transaction, numbered under the
    study's lock as Optuna's ``create_new_trial`` numbers one (a trial's number is the count of
    the study's trials with a smaller id); their ``FrozenTrial``. One insert, one read of the
    new ids, one update of their numbers (Optuna's takes three statements per trial)."""
    from datetime import datetime

    from optuna.trial import FrozenTrial
    from optuna.trial import TrialState
    from sqlalchemy import bindparam
    from sqlalchemy import insert
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy import update

    if count < 1:
        return []
    model: Any = models.TrialModel
    # the start time as Optuna's model stores it (naive UTC in Optuna 5, local before) and as
    # a read gives it back, through the model's own setter
    probe = model(datetime_start=datetime.now())
    column = model.__table__.c.datetime_start
    stored = getattr(probe, sa_inspect(model).get_property_by_column(column).key)
    row = {"study_id": study_id, "number": None, "state": TrialState.RUNNING}
    with create_scoped_session(storage.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        session.execute(
            insert(model.__table__), [{**row, "datetime_start": stored} for _ in range(count)]
        )
        # under the lock (SQLite: the write lock the insert took), the only trials of the
        # study without a number are these: every creator numbers its trials before commit
        ids = [
            trial_id
            for (trial_id,) in session.query(model.trial_id)
            .filter(model.study_id == study_id, model.number.is_(None))
            .order_by(model.trial_id)
        ]
        past = session.query(model).filter(model.study_id == study_id).count() - len(ids)
        numbers = {trial_id: past + i for i, trial_id in enumerate(ids)}
        table = model.__table__
        session.execute(
            update(table).where(table.c.trial_id == bindparam("id")).values(number=bindparam("n")),
            [{"id": t, "n": n} for t, n in numbers.items()],
        )
        if getattr(storage, "heartbeat_interval", None) is not None:
            # beating from their creation: a worker killed before its round's heartbeat
            # thread starts leaves trials that go stale (Optuna never fails a RUNNING trial
            # without a heartbeat row, and its slot would stay taken)
            session.execute(
                insert(models.TrialHeartbeatModel.__table__), [{"trial_id": t} for t in ids]
            )
    return [
        FrozenTrial(
            number=number,
            state=TrialState.RUNNING,
            value=None,
            values=None,
            datetime_start=probe.datetime_start,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=trial_id,
        )
        for trial_id, number in numbers.items()
    ]


def _write_heartbeats(storage: Any, trial_ids: list[int]) -> None:
    """``record_heartbeat`` for several trials in one transaction (a population round beats
    for P trials at once): one read of the existing beats, one update, one insert."""
    import sqlalchemy

    model: Any = models.TrialHeartbeatModel
    ids = sorted(set(trial_ids))
    if not ids:
        return
    with create_scoped_session(storage.scoped_session, True) as session:
        beating = {
            trial_id
            for (trial_id,) in session.query(model.trial_id).filter(model.trial_id.in_(ids))
        }
        if beating:
            session.query(model).filter(model.trial_id.in_(sorted(beating))).update(
                {model.heartbeat: sqlalchemy.func.current_timestamp()}, synchronize_session=False
            )
        session.add_all([model(trial_id=trial_id) for trial_id in ids if trial_id not in beating])


def _write_params(storage: Any, rows: list[tuple[Any, ...]]) -> None:
    """``(trial_id, name, internal value, distribution, previous distribution or None)``
    params of several trials in one transaction, checked as Optuna's ``set_trial_param``
    checks one: every trial must still be updatable, and each param's distribution must be
    compatible with the study's earlier one of that name (the ``previous`` the caller knows,
    else the study's stored one, else the batch's first); a duplicate (trial, name) raises the
    database's integrity error and nothing of the batch is written (Optuna's per-param write
    ignores it). One query per trial set and per name not known yet, one insert of all rows
    (Optuna's per-param write reads the trial again for every param)."""
    from optuna.distributions import check_distribution_compatibility
    from optuna.distributions import distribution_to_json
    from optuna.distributions import json_to_distribution
    from sqlalchemy import insert

    if not rows:
        return
    model: Any = models.TrialParamModel
    trials: Any = models.TrialModel
    with create_scoped_session(storage.scoped_session) as session:  # a duplicate raises
        # every trial checked before any write: Optuna's refusal of a finished trial reads it
        # through the same thread-local session and commits what that session holds
        ids = sorted({row[0] for row in rows})
        found = {
            trial_id: (state, study_id)
            for trial_id, state, study_id in session.query(
                trials.trial_id, trials.state, trials.study_id
            ).filter(trials.trial_id.in_(ids))
        }
        _check_updatable(storage, ids, {trial_id: v[0] for trial_id, v in found.items()})
        reference: dict[tuple[int, str], Any] = {}
        values = []
        for trial_id, name, internal, distribution, previous in rows:
            if previous is None:
                key = (found[trial_id][1], name)
                if key not in reference:
                    stored = (
                        session.query(model.distribution_json)
                        .join(trials)
                        .filter(trials.study_id == key[0], model.param_name == name)
                        .first()
                    )
                    reference[key] = (
                        distribution if stored is None else json_to_distribution(stored[0])
                    )
                previous = reference[key]
            check_distribution_compatibility(previous, distribution)
            values.append(
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": internal,
                    "distribution_json": distribution_to_json(distribution),
                }
            )
        session.execute(insert(model.__table__), values)


def _write_intermediate_values(storage: Any, values: list[tuple[int, int, float]]) -> None:
    """``(trial_id, step, value)`` intermediate values of several trials in one transaction:
    one multi-row upsert on SQLite and PostgreSQL, Optuna's per-value write inside the same
    transaction elsewhere. Every trial must still be updatable, as for
    ``set_trial_intermediate_value``; if one is not, nothing is written."""

    model = models.TrialIntermediateValueModel
    with create_scoped_session(storage.scoped_session, True) as session:
        _updatable(storage, session, sorted({trial_id for trial_id, _, _ in values}))
        if not _bulk(storage):
            for trial_id, step, value in values:
                storage._set_trial_intermediate_value_without_commit(
                    session, trial_id, step, value
                )
            return
        rows = []
        for trial_id, step, value in values:
            stored, kind = model.intermediate_value_to_stored_repr(value)
            rows.append(
                {
                    "trial_id": trial_id,
                    "step": step,
                    "intermediate_value": stored,
                    "intermediate_value_type": kind,
                }
            )
        _upsert(session, model, rows, [model.trial_id, model.step])
