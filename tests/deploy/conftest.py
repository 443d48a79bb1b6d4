"""Fixtures of the deployment tests: a fresh PostgreSQL database, a single-node Slurm cluster."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import secrets

import pytest

from tests.deploy.slurm_cluster import SlurmCluster
from tests.deploy.slurm_cluster import missing_binaries
from tests.study.helpers import PG_URL
from tests.study.helpers import drop_database
from tests.study.helpers import pg_admin


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database ``droptune_test_<random>`` on 127.0.0.1:5432 (user postgres),
    dropped afterwards; skipped if the server is unreachable."""
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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster (munged, slurmctld, slurmd) in a temporary folder, for the
    session; skipped without the Slurm binaries or without root, stopped by PID at the end."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"no Slurm here (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged needs root (the CI runs as root)")
    cluster = SlurmCluster(Path(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except RuntimeError as exc:  # installed but broken: a failure, not a skip
        cluster.stop()
        pytest.fail(f"the Slurm daemons did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
