"""Riding out a database outage: which errors are an outage, and the retry of a storage call
while one lasts (``tenacity``: exponential backoff from 0.5 s to 5 s, one warning, up to
:data:`OUTAGE_S`); and racing creators of the same tables."""

from __future__ import annotations

import logging
import time
from typing import Any

import tenacity

from droptune.storage._urls import mask_text
from droptune.timing import timed


log = logging.getLogger("droptune.storage")

#: How long a storage call keeps retrying while the database is unreachable (e.g. PostgreSQL
#: restarting) before the error reaches the caller.
OUTAGE_S = 120.0

#: OperationalError messages that no retry cures.
_PERMANENT = (
    "no such table",
    "no such column",
    "does not exist",
    "syntax error",
    "password authentication failed",
    "unable to open database file",
    "readonly database",
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unreachable or dropped the connection (worth
    retrying), as opposed to a bad query or a constraint violation."""
    import sqlalchemy.exc as sa_exc

    # Optuna wraps the SQLAlchemy error in StorageInternalError: look down the chain. A
    # PendingRollbackError is a session used again after its connection broke (Optuna's
    # `_get_trials` retries its query in the same session): what broke it decides.
    for _ in range(6):
        if isinstance(exc, sa_exc.PendingRollbackError):
            below = exc.__cause__ or exc.__context__
        elif isinstance(exc, sa_exc.SQLAlchemyError):
            break
        else:
            below = exc.__cause__
        if below is None:
            break
        exc = below
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        text = str(exc).lower()
        return not any(marker in text for marker in _PERMANENT)
    return isinstance(exc, sa_exc.TimeoutError)  # the pool ran dry while the server was away


def retry_outage(call: Any, what: str, outage_s: float = OUTAGE_S) -> Any:
    """``call()``, retried with backoff while the database is unreachable, up to ``outage_s``
    (the whole time counted as ``storage`` by :mod:`droptune.timing`); any other error, and
    the outage's last one, reach the caller as raised."""
    warned = False

    def warn_once(state: tenacity.RetryCallState) -> None:
        nonlocal warned
        if warned or state.outcome is None:
            return
        warned = True
        root: BaseException | None = state.outcome.exception()
        while root is not None and root.__cause__ is not None and root is not root.__cause__:
            root = root.__cause__
        text = str(getattr(root, "orig", None) or root).strip().splitlines()
        log.warning(
            "storage unreachable during %s (%s); retrying for up to %.0fs",
            what,
            mask_text(text[0] if text else type(root).__name__),
            outage_s,
        )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_outage),
        wait=tenacity.wait_exponential(multiplier=0.5, min=0.5, max=5.0),
        stop=tenacity.stop_before_delay(outage_s),
        before_sleep=warn_once,
        reraise=True,
    )
    with timed("storage"):
        return retrying(call)


_RACE_MARKERS = ("already exists", "duplicate key", "unique constraint")


def creation_race(exc: BaseException) -> bool:
    """Whether ``exc`` is another process winning a race to create the same table or row."""
    text = str(exc).lower()
    return any(marker in text for marker in _RACE_MARKERS)


def create_tables(metadata: Any, engine: Any, attempts: int = 5) -> None:
    """``metadata.create_all(engine)`` when other processes may create the same tables at
    the same moment (workers started together on a fresh database): a lost race is retried,
    by when the tables exist."""
    import sqlalchemy as sa

    for attempt in range(attempts):
        try:
            metadata.create_all(engine, checkfirst=True)
            return
        except sa.exc.DBAPIError as exc:
            if not creation_race(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
