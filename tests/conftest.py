"""Shared test setup: the repository root on ``sys.path`` (so that droptune can import the user
code in ``tests/user_code`` as ``tests.user_code.<module>:<Class>``) and one MNIST-1D cache per
test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import sys

import pytest


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def droptune_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$DROPTUNE_CACHE_DIR`` for the session: MNIST-1D is generated at most once, never in
    the user's home cache."""
    path = tmp_path_factory.mktemp("droptune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DROPTUNE_CACHE_DIR", str(path))
        yield path
