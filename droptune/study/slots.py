"""Exact trial counts with many workers: one reservation row per requested trial.

Optuna's ``MaxTrialsCallback`` stops a worker once enough trials finished, but trials that other
workers started meanwhile still run, so K workers overshoot by up to K-1. Here the study owns a
table of N slots in the same database. A worker claims a free slot with a compare-and-swap
``UPDATE ... WHERE owner IS NULL`` (atomic on SQLite and PostgreSQL) before it asks Optuna for a
trial, and binds the trial number to it. A slot whose trial FAILs (an exception, a stale
heartbeat after SIGKILL) is released and claimed again, so the study ends with exactly N
COMPLETE or PRUNED trials.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import sqlalchemy as sa

from droptune.storage import create_tables
from droptune.storage import engine_kwargs
from droptune.storage import retry_outage


__all__ = ["Slots"]

_metadata = sa.MetaData()
_table = sa.Table(
    "droptune_slots",
    _metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("claimed_at", sa.Float, nullable=True),
)


def _riding_outages(method: Any) -> Any:
    """Retry a slot-table call while the database is unreachable (see ``retry_outage``); every
    call is idempotent or, for ``claim``, leaves at worst an orphan slot that ``reclaim`` frees."""

    @functools.wraps(method)
    def wrapper(self: Slots, *args: Any, **kwargs: Any) -> Any:
        return retry_outage(lambda: method(self, *args, **kwargs), f"slots.{method.__name__}")

    return wrapper


class Slots:
    """The reservation table of one study."""

    def __init__(self, url: str, study_name: str) -> None:
        self.study_name = study_name
        self.engine = sa.create_engine(url, **engine_kwargs(url))
        create_tables(_metadata, self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @_riding_outages
    def ensure(self, n: int) -> None:
        """Make sure slots 0..n-1 exist (never removes any)."""
        with self.engine.begin() as conn:
            existing = {
                row[0]
                for row in conn.execute(
                    sa.select(_table.c.slot).where(_table.c.study_name == self.study_name)
                )
            }
        missing = [slot for slot in range(n) if slot not in existing]
        for start in range(0, len(missing), 1000):
            chunk = [
                {"study_name": self.study_name, "slot": slot}
                for slot in missing[start : start + 1000]
            ]
            try:
                with self.engine.begin() as conn:  # one transaction per thousand slots
                    conn.execute(_table.insert(), chunk)
            except sa.exc.IntegrityError:
                # Another process created some of them meanwhile: add the rest one by one.
                for row in chunk:
                    try:
                        with self.engine.begin() as conn:
                            conn.execute(_table.insert().values(**row))
                    except sa.exc.IntegrityError:
                        pass

    @_riding_outages
    def total(self) -> int:
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(_table)
                    .where(_table.c.study_name == self.study_name)
                ).scalar_one()
            )

    @_riding_outages
    def rows(self) -> list[Any]:
        with self.engine.begin() as conn:
            return list(
                conn.execute(
                    sa.select(_table)
                    .where(_table.c.study_name == self.study_name)
                    .order_by(_table.c.slot)
                )
            )

    def claim(self, owner: str) -> int | None:
        """Atomically take a free slot; None when every slot is taken."""
        taken = self.claim_many(owner, 1)
        return taken[0] if taken else None

    @_riding_outages
    def claim_many(self, owner: str, count: int) -> list[int]:
        """Atomically take up to ``count`` free slots (fewer when fewer are free), reading the
        table once: a population round claims P slots."""
        taken: list[int] = []
        for row in self.rows():
            if len(taken) >= count:
                break
            if row.owner is not None:
                continue
            with self.engine.begin() as conn:
                result = conn.execute(
                    _table.update()
                    .where(
                        _table.c.study_name == self.study_name,
                        _table.c.slot == row.slot,
                        _table.c.owner.is_(None),
                    )
                    .values(owner=owner, trial_number=None, claimed_at=time.time())
                )
            if result.rowcount == 1:
                taken.append(int(row.slot))
        return taken

    @_riding_outages
    def bind(self, slot: int, owner: str, trial_number: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                _table.update()
                .where(
                    _table.c.study_name == self.study_name,
                    _table.c.slot == slot,
                    _table.c.owner == owner,
                )
                .values(trial_number=trial_number)
            )

    @_riding_outages
    def release(
        self,
        slot: int,
        owner: str,
        trial_number: int | None = None,
        claimed_before: float | None = None,
    ) -> bool:
        """Give a slot back (its trial failed); only its owner's claim is released.

        A release decided on a row read earlier states what it saw, and the slot is freed only
        if it still holds that: ``trial_number`` (the failed trial it is bound to), or for a
        claim never bound, ``claimed_before`` (the claim is still that old). A worker that
        released a slot may claim it again at once under the same owner, and a release decided
        on the old row must not free the new claim: its trial would finish unbound, one more
        than the study's budget. (Times are compared by order, not equality: MySQL stores
        them as single-precision FLOAT.)"""
        where = [
            _table.c.study_name == self.study_name,
            _table.c.slot == slot,
            _table.c.owner == owner,
        ]
        if trial_number is not None:
            where.append(_table.c.trial_number == trial_number)
        elif claimed_before is not None:
            where += [_table.c.trial_number.is_(None), _table.c.claimed_at < claimed_before]
        with self.engine.begin() as conn:
            result = conn.execute(
                _table.update()
                .where(*where)
                .values(owner=None, trial_number=None, claimed_at=None)
            )
        return result.rowcount == 1

    def reclaim(self, states: dict[int, str], stale_after: float) -> int:
        """Release slots whose trial FAILed, or that were claimed but never bound to a trial for
        longer than ``stale_after`` seconds (a worker killed between claim and ask).

        Args:
            states: Optuna trial state names by trial number.
        """
        released = 0
        cutoff = time.time() - stale_after
        for row in self.rows():
            if row.owner is None:
                continue
            if row.trial_number is not None:
                if states.get(row.trial_number) == "FAIL" and self.release(
                    int(row.slot), row.owner, trial_number=int(row.trial_number)
                ):
                    released += 1
            elif (row.claimed_at or cutoff) < cutoff and self.release(
                int(row.slot), row.owner, claimed_before=cutoff
            ):
                released += 1
        return released

    def finished(self, states: dict[int, str]) -> bool:
        """True when every slot holds a COMPLETE or PRUNED trial."""
        return all(
            row.trial_number is not None and states.get(row.trial_number) in ("COMPLETE", "PRUNED")
            for row in self.rows()
        )
