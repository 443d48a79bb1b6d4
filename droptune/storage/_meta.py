"""``droptune_meta``: droptune's own key-value table next to Optuna's, one row per (study,
key): the study's recorded trial budget, its MLflow parent run, links of runs created after
their trial ended. Claims go through the table's primary key, so exactly one process of many
creates a value (:func:`claim_once`).

One SQLAlchemy engine per store serves every call of a process (a few are kept, the least
recently used disposed); it pools no connection, and the table is created once per engine (again
if the database was replaced meanwhile).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
import logging
from pathlib import Path
import threading
import time
from typing import Any

import sqlalchemy as sa

from droptune.storage._open import engine_kwargs
from droptune.storage._retry import create_tables


__all__ = ["claim_once", "meta_delete", "meta_get", "meta_raise", "meta_set"]

log = logging.getLogger("droptune.storage")

_metadata = sa.MetaData()
_meta = sa.Table(
    "droptune_meta",
    _metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.String(2048), nullable=True),
)

#: Engines kept per process (a worker uses one storage; tests and tools open many in turn).
_KEEP = 4
_engines: OrderedDict[str, sa.Engine] = OrderedDict()
_made: set[str] = set()
_lock = threading.Lock()


def _key(url: str) -> str:
    """The store ``url`` names: an SQLite file by its absolute path (a relative URL names
    another file after a change of working directory)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return parsed.set(database=str(Path(parsed.database).resolve())).render_as_string(
            hide_password=False
        )
    return url


def _engine(url: str) -> sa.Engine:
    """The engine of ``url``'s store with the table in place, made once per process. It pools
    no connection (``NullPool``): each call connects, so a replaced SQLite file is the one
    read, and an idle worker holds no PostgreSQL connection."""
    key = _key(url)
    with _lock:
        engine = _engines.pop(key, None)
        if engine is None:
            engine = sa.create_engine(key, poolclass=sa.pool.NullPool, **engine_kwargs(key))
        _engines[key] = engine
        while len(_engines) > _KEEP:
            old, dropped = _engines.popitem(last=False)
            _made.discard(old)
            dropped.dispose()
    if key not in _made:  # outside the lock: a slow connect does not block other threads
        create_tables(_metadata, engine)
        _made.add(key)
    return engine


def _recreating(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function`` again, once, after re-creating the table, when the table is gone (the
    database was replaced under a cached engine: a deleted SQLite file, a dropped schema)."""
    import functools

    @functools.wraps(function)
    def wrapper(url: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(url, *args, **kwargs)
        except sa.exc.DBAPIError as exc:
            text = str(exc).lower()
            if "droptune_meta" not in text or not ("no such table" in text or "not exist" in text):
                raise
            create_tables(_metadata, _engine(url))
            return function(url, *args, **kwargs)

    return wrapper


def _where(study_name: str, key: str) -> Any:
    return (_meta.c.study_name == study_name) & (_meta.c.key == key)


@_recreating
def claim_once(
    url: str, study_name: str, key: str, create: Callable[[], Any], timeout: float = 60.0
) -> str:
    """Run ``create()`` in exactly one process per (study, key) and return its value (the
    winner's, in every process). A claim whose process died before writing its value is
    taken over after ``timeout`` seconds."""
    engine = _engine(url)
    where = _where(study_name, key)
    try:
        with engine.begin() as conn:
            conn.execute(_meta.insert().values(study_name=study_name, key=key, value=None))
        won = True
    except sa.exc.IntegrityError:
        won = False
    if won:
        try:
            value = str(create())
        except BaseException:
            with engine.begin() as conn:  # let another process try again
                conn.execute(_meta.delete().where(where & _meta.c.value.is_(None)))
            raise
        with engine.begin() as conn:
            written = conn.execute(
                _meta.update().where(where & _meta.c.value.is_(None)).values(value=value)
            ).rowcount
        if written != 1:  # taken over meanwhile (this process was too slow): theirs counts
            with engine.begin() as conn:
                row = conn.execute(sa.select(_meta.c.value).where(where)).first()
            if row is not None and row.value is not None:
                return str(row.value)
        return value
    deadline = time.time() + timeout
    while True:
        with engine.begin() as conn:
            row = conn.execute(sa.select(_meta.c.value).where(where)).first()
        if row is None:  # the winner failed and withdrew: take over
            return claim_once(url, study_name, key, create, timeout)
        if row.value is not None:
            return str(row.value)
        if time.time() > deadline:
            # The process that claimed it died between its claim and its value (kill -9):
            # withdraw its claim for it and take over (it would otherwise block every later
            # start of the study).
            log.warning(
                "study %s: %s was claimed %.0f s ago and never written; taking over",
                study_name,
                key,
                timeout,
            )
            with engine.begin() as conn:
                conn.execute(_meta.delete().where(where & _meta.c.value.is_(None)))
            return claim_once(url, study_name, key, create, timeout)
        time.sleep(0.2)


@_recreating
def meta_get(url: str, study_name: str, key: str) -> str | None:
    with _engine(url).begin() as conn:
        row = conn.execute(sa.select(_meta.c.value).where(_where(study_name, key))).first()
    return None if row is None else row.value


@_recreating
def meta_raise(url: str, study_name: str, key: str, value: int) -> int:
    """Raise the integer under ``key`` to ``value`` if it is lower, in one statement (two
    processes raising at once never lower it); returns the value now stored."""
    where = _where(study_name, key)
    with _engine(url).begin() as conn:
        conn.execute(
            _meta.update()
            .where(where & (sa.cast(_meta.c.value, sa.Integer) < value))
            .values(value=str(value))
        )
        row = conn.execute(sa.select(_meta.c.value).where(where)).first()
    return int(row.value) if row is not None and row.value is not None else value


@_recreating
def meta_set(url: str, study_name: str, key: str, value: str) -> None:
    where = _where(study_name, key)
    with _engine(url).begin() as conn:
        if conn.execute(_meta.update().where(where).values(value=value)).rowcount == 0:
            conn.execute(_meta.insert().values(study_name=study_name, key=key, value=value))


@_recreating
def meta_delete(url: str, study_name: str, key: str) -> None:
    with _engine(url).begin() as conn:
        conn.execute(_meta.delete().where(_where(study_name, key)))
