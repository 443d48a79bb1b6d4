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


def _private_names() -> set[str]:
    """Private names of Optuna droptune knows it uses: every one ``_optuna`` checks, and the
    attributes its accessors read."""
    from droptune.storage import _optuna

    names = {name for names in _optuna._METHODS.values() for name in names}
    names |= {
        "_storage",
        "_study_id",
        "_trial_id",
        "_cached_frozen_trial",
        "_thread_local",
        "_backend",
        "_studies",
        "_lock",
        "_trial_id_to_study_id_and_number",
        "_filter_study",
        "_create_scoped_session",
        "_directions",
    }
    return {name for name in names if name.startswith("_")}


def _private_uses(path: Path) -> list[str]:
    """Uses of Optuna's private API in ``path``: imports of its private modules or names
    (``from``, plain ``import`` and ``importlib`` strings) and reads of its private
    attributes (on anything but ``self``)."""
    private = _private_names()
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
            parts = [p for name in [node.module or "", *(a.name for a in node.names)]
                     for p in name.split(".")]  # fmt: skip
            if any(p.startswith("_") for p in parts):
                found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("optuna") and "._" in alias.name:
                    found.append(f"{where} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{where} .{node.attr}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (
                node.value in private or (node.value.startswith("optuna.") and "._" in node.value)
            )
        ):
            found.append(f"{where} {node.value!r}")
    return found


def test_no_module_outside_the_storage_package_touches_optunas_internals() -> None:
    package = ROOT / "droptune"
    outside = [
        use
        for path in sorted(package.rglob("*.py"))
        if path.relative_to(package).parts[0] != "storage"
        for use in _private_uses(path)
    ]
    assert outside == []
    # and the check sees them where they are, in every form it looks for
    assert _private_uses(package / "storage" / "_optuna.py")


def test_the_boundary_check_sees_every_form_of_private_use(tmp_path: Path) -> None:
    forms = [
        "import optuna.storages._rdb.models as m",
        "import importlib; importlib.import_module('optuna.storages._rdb.storage')",
        "x = storage._lock",
        "optuna.pruners._filter_study(s, t)",
        "storage._set_trial_attr_without_commit(1)",
        "study._directions",
        "getattr(study, '_storage')",
        "from optuna.storages._cached_storage import _StudyInfo",
    ]
    for i, line in enumerate(forms):
        source = tmp_path / f"m{i}.py"
        source.write_text(line + "\n")
        assert _private_uses(source), line
    clean = tmp_path / "clean.py"
    clean.write_text("import optuna\nself._storage = 1\nstudy.trials\n")
    assert _private_uses(clean) == []
