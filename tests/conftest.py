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
