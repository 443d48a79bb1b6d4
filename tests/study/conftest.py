"""Fixtures of the study-runner tests: tiny specs on disk, a fresh PostgreSQL database per test,
and the real ``droptune`` command line in subprocesses (see :mod:`tests.study.helpers`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import secrets
from typing import Any

import pytest
import yaml

from tests.study.helpers import PG_URL
from tests.study.helpers import TINY
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import drop_database
from tests.study.helpers import merge
from tests.study.helpers import pg_admin


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An SQLite URL under ``tmp_path`` (the file does not exist yet)."""
    return f"sqlite:///{tmp_path / 'db' / 'study.db'}"


@pytest.fixture
def write_spec(tmp_path: Path, sqlite_url: str) -> SpecWriter:
    """``write_spec(name="spec", text=None, **sections)``: :data:`TINY` with ``sections`` laid
    over it (``search`` is replaced as a whole, a value ``DELETE`` removes a key), stored in
    ``sqlite_url`` unless a section says otherwise, written to ``tmp_path/<name>.yaml``;
    ``text`` writes that text verbatim instead."""

    def write(name: str = "spec", text: str | None = None, **sections: Any) -> Path:
        path = tmp_path / f"{name}.yaml"
        if text is not None:
            path.write_text(text)
            return path
        data = merge({**TINY, "storage": sqlite_url}, sections)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database ``droptune_test_<random>`` on the local server
    (127.0.0.1:5432, user postgres), dropped afterwards; skipped if the server is unreachable."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'droptune[postgres]')")
    try:
        admin = pg_admin()
    except Exception as exc:
        pytest.skip(f"PostgreSQL is unreachable at 127.0.0.1:5432 as user postgres: {exc}")
    name = f"droptune_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(db=name)
    finally:
        drop_database(name)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Runs the real CLI in subprocesses in ``tmp_path``; kills what is left afterwards."""
    manager = Procs(tmp_path)
    try:
        yield manager
    finally:
        manager.close()
