"""The storage tests use the study tests' fixtures: a fresh PostgreSQL database per test, an
SQLite URL, tiny specs on disk and the real command line in subprocesses."""

from tests.study.conftest import pg_url
from tests.study.conftest import procs
from tests.study.conftest import sqlite_url
from tests.study.conftest import write_spec


__all__ = ["pg_url", "procs", "sqlite_url", "write_spec"]
