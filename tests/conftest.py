"""Shared test setup: the repository root on ``sys.path`` and ``PYTHONPATH`` (so that droptune
and its workers can import the user code in ``tests/user_code`` as
``tests.user_code.<module>:<Class>``) and one MNIST-1D cache per test session."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import sys

import pytest


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# ... and in the workers droptune starts: they never search the working directory, so the
# user code of the tests is reached as a user's would be, through PYTHONPATH
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )


@pytest.fixture(scope="session", autouse=True)
def droptune_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$DROPTUNE_CACHE_DIR`` for the session: MNIST-1D is generated at most once, never in
    the user's home cache."""
    path = tmp_path_factory.mktemp("droptune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DROPTUNE_CACHE_DIR", str(path))
        yield path


#: Test modules whose tests start real studies, services or clusters (seconds to minutes each):
#: the fast tier (``pytest -m "not slow"``) leaves them out, CI runs everything.
SLOW_MODULES = {
    "tests/deploy/test_slurm.py",
    "tests/stack/test_stack_up.py",
    "tests/stack/test_stack_cli.py",
    "tests/storage/test_outages.py",
    "tests/storage/test_waiting_race.py",
    "tests/study/test_confirm.py",
    "tests/study/test_faults.py",
    "tests/study/test_no_wasted_trials.py",
    "tests/study/test_population_mode.py",
    "tests/study/test_runner.py",
    "tests/study/test_task_index.py",
    "tests/test_examples.py",
    "tests/tracking/test_mlflow_down.py",
    "tests/tracking/test_tracked_study.py",
}
#: Fixtures that start subprocesses or a database per test.
SLOW_FIXTURES = {"procs", "tracked", "pg_url"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`SLOW_MODULES` and those using :data:`SLOW_FIXTURES` as
    ``slow`` (besides those marked by hand)."""
    for item in items:
        module = Path(str(item.fspath)).relative_to(ROOT).as_posix()
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
