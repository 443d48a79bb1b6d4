"""Fixtures of the stack tests: fresh PostgreSQL databases on the local server."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import secrets

import pytest

from tests.study.helpers import PG_URL
from tests.study.helpers import drop_database
from tests.study.helpers import pg_admin


#: ``new_database() -> URL`` (the fixture below).
DatabaseFactory = Callable[[], str]


@pytest.fixture
def new_database() -> Iterator[DatabaseFactory]:
    """Creates empty databases ``droptune_test_<random>`` on 127.0.0.1:5432 (user postgres) on
    demand and drops them afterwards; skips the test if the server is unreachable."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'droptune[postgres]')")
    try:
        pg_admin().close()
    except Exception as exc:
        pytest.skip(f"PostgreSQL is unreachable at 127.0.0.1:5432 as user postgres: {exc}")
    created: list[str] = []

    def create() -> str:
        name = f"droptune_test_{secrets.token_hex(6)}"
        with pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return PG_URL.format(db=name)

    try:
        yield create
    finally:
        for name in created:
            drop_database(name)
