"""The study-runner fixtures (tiny specs on disk, fresh PostgreSQL databases, the real CLI in
subprocesses), shared with the tracking tests."""

from tests.study.conftest import pg_url
from tests.study.conftest import procs
from tests.study.conftest import sqlite_url
from tests.study.conftest import write_spec


__all__ = ["pg_url", "procs", "sqlite_url", "write_spec"]
