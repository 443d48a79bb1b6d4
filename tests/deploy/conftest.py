"""Fixtures of the deployment tests: a fresh PostgreSQL database (the study tests' fixture)
and a single-node Slurm cluster."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path

import pytest

from tests.deploy.slurm_cluster import SlurmCluster
from tests.deploy.slurm_cluster import missing_binaries
from tests.study.conftest import pg_url


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


__all__ = ["pg_url", "slurm"]
