"""droptune's storage against Optuna's own storage contract, and the boundary around Optuna's
private API: Optuna's ``StorageTestCase`` (every method of ``BaseStorage``, as Optuna tests its
own storages) on :class:`DroptuneStorage` over SQLite and PostgreSQL; an Optuna outside the
supported range, or one that renamed a private name droptune uses, fails on import with the
range to install; and no module outside ``droptune/storage/`` touches Optuna's internals."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
import subprocess
import sys
import tomllib

import optuna
import pytest

from droptune.storage import SUPPORTED
from droptune.storage import DroptuneStorage
from droptune.storage import open_storage


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DroptuneStorage]:
    url = (
        f"sqlite:///{tmp_path / 'contract.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    opened = open_storage(url)
    assert isinstance(opened, DroptuneStorage)
    yield opened
    opened.engine.dispose()


try:  # Optuna ships its storage tests since 5.0
    from optuna.testing.pytest_storages import StorageTestCase
except ImportError:  # pragma: no cover - an Optuna 4.x install
    StorageTestCase = None

if StorageTestCase is not None:

    class TestDroptuneStorageContract(StorageTestCase):
        """Optuna's own storage tests, inherited unchanged."""


def test_the_storage_is_a_named_rdbstorage_that_pickles(storage: DroptuneStorage) -> None:
    import pickle

    assert type(storage).__module__ == "droptune.storage._rdb"
    again = pickle.loads(pickle.dumps(storage))
    assert isinstance(again, DroptuneStorage)
    assert isinstance(again, optuna.storages.RDBStorage)


def _import_with(patch: str) -> subprocess.CompletedProcess[str]:
    code = f"import optuna\n{patch}\nimport droptune.storage._optuna\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize("version", ["4.5.0", "5.2.0", "6.0.0"])
def test_an_optuna_outside_the_supported_range_fails_loudly_on_import(version: str) -> None:
    done = _import_with(f"optuna.__version__ = {version!r}")
    assert done.returncode != 0
    assert "UnsupportedOptuna" in done.stderr, done.stderr
    assert f"optuna {version} is not supported" in done.stderr
    assert f"optuna>={SUPPORTED[0]},<{SUPPORTED[1]}" in done.stderr


@pytest.mark.parametrize(
    "patch",
    [
        "del optuna.Study._pop_waiting_trial_id",
        "del optuna.storages.RDBStorage._set_trial_attr_without_commit",
        "import optuna.storages._rdb.models as m\ndel m.TrialHeartbeatModel",
    ],
)
def test_an_optuna_that_renamed_a_private_name_fails_loudly_on_import(patch: str) -> None:
    done = _import_with(patch)
    assert done.returncode != 0 and "UnsupportedOptuna" in done.stderr, done.stderr
    missing = patch.rsplit(".", 1)[-1].split()[-1]
    assert missing.split(".")[-1] in done.stderr, done.stderr


def test_the_supported_range_is_the_one_pyproject_requires() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"optuna>={SUPPORTED[0]},<{SUPPORTED[1]}" in deps
    from packaging.version import Version

    assert Version(SUPPORTED[0]) <= Version(optuna.__version__) < Version(SUPPORTED[1])


#: Attributes of Optuna's objects that are not its public API.
PRIVATE = {
    "_storage",
    "_study_id",
    "_trial_id",
    "_cached_frozen_trial",
    "_thread_local",
    "_pop_waiting_trial_id",
    "_get_latest_trial",
    "_backend",
    "_studies",
    "_add_trials_to_cache",
    "_trial_id_to_study_id_and_number",
}


def _private_uses(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
            names = [node.module or "", *(alias.name for alias in node.names)]
            parts = [p for name in names for p in name.split(".")]
            if any(p.startswith("_") for p in parts):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            # a class's own attribute of that name (self._storage of a view) is not Optuna's
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in PRIVATE
        ):
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
    return found


def test_no_module_outside_the_storage_package_touches_optunas_internals() -> None:
    package = ROOT / "droptune"
    outside = [
        use
        for path in sorted(package.rglob("*.py"))
        if "storage" not in path.relative_to(package).parts
        for use in _private_uses(path)
    ]
    assert outside == []
    # and the check sees them where they are
    assert _private_uses(package / "storage" / "_optuna.py")
