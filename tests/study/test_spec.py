"""Bad study specs are refused by ``droptune run`` before any storage is touched: exit code 2,
one ``error:`` line naming the field (and the allowed values where there is a list of them),
and no database file, table or study left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from droptune.cli import main
from droptune.exceptions import SpecError
from droptune.study.spec import load_spec
from droptune.study.spec import spec_from_dict
from tests.study.helpers import DELETE
from tests.study.helpers import ROOT
from tests.study.helpers import TINY
from tests.study.helpers import SpecWriter
from tests.study.helpers import merge
from tests.study.helpers import pg_tables


SEARCH = TINY["search"]
RATE = "regularization.dropout.hidden_rate"
KIND = "regularization.dropout.kind"
L2 = "regularization.l2.strength"
SAMPLERS = "'tpe', 'random', 'cmaes', 'gp', 'qmc', 'grid' or 'nsgaii'"
PRUNERS = "'median', 'asha', 'successive_halving', 'hyperband' or 'none'"
MLP_KINDS = "allowed: none, standard, gaussian, alpha"

#: (id, spec sections laid over TINY or YAML text, substrings the one error line must hold)
CASES: list[tuple[str, dict[str, Any] | str, list[str]]] = [
    (
        "yaml-syntax",
        "study:\n  name: x\nsearch: [1, 2\nn_trials: 3\n",
        ["invalid YAML", "spec.yaml", "at line 4"],
    ),
    ("top-level-list", "- study\n- search\n", ["top level must be a mapping", "got list"]),
    ("top-level-scalar", "just text\n", ["top level must be a mapping", "got str"]),
    (
        "unknown-section",
        {"optimizer": {"lr": 1}},
        ["optimizer: unknown key", "allowed keys: study, data, model, train", "execution"],
    ),
    (
        "unknown-key-in-section",
        {"execution": {"heartbeat": 3}},
        ["execution.heartbeat: unknown key", "heartbeat_interval", "grace_period"],
    ),
    (
        "unknown-key-in-train",
        {"train": {"epochs": 3}},
        ["train.epochs: unknown key", "allowed keys:", "max_epochs"],
    ),
    ("wrong-type", {"n_trials": "ten"}, ["n_trials: must be a valid integer", "'ten'"]),
    (
        "wrong-type-in-section",
        {"execution": {"grace_period": "long"}},
        ["execution.grace_period: must be a valid integer", "'long'"],
    ),
    (
        "low-above-high",
        {"search": {**SEARCH, RATE: {"low": 0.5, "high": 0.1}}},
        [f"search.{RATE}.low", "low <= high", "low=0.5, high=0.1"],
    ),
    (
        "log-with-low-zero",
        {
            "search": {
                **SEARCH,
                "regularization.l2.strength": {"low": 0.0, "high": 1.0, "log": True},
            }
        },
        ["search.regularization.l2.strength.low", "must be > 0 when log is true", "0.0"],
    ),
    (
        "rate-1-fixed",
        {"regularization": {"dropout": {"hidden_rate": 1.0}}},
        [f"{RATE}: must be < 1.0", "got 1.0"],
    ),
    (
        "rate-1-in-search-bound",
        {"search": {**SEARCH, RATE: {"low": 0.0, "high": 1.0}}},
        [f"search.{RATE}", "candidate 1.0", "must be < 1.0"],
    ),
    (
        "unknown-kind-fixed",
        {"regularization": {"dropout": {"kind": "bogus"}}, "search": {RATE: SEARCH[RATE]}},
        [f"{KIND}: must be one of none, standard, spatial", "'bogus'"],
    ),
    (
        "unknown-kind-in-choices",
        {"search": {**SEARCH, KIND: {"choices": ["standard", "bogus"]}}},
        [f"search.{KIND}", "'bogus' is not a dropout kind", MLP_KINDS],
    ),
    (
        "kind-not-for-family-in-choices",
        {"search": {**SEARCH, KIND: {"choices": ["standard", "spatial"]}}},
        [f"search.{KIND}", "'spatial'", "model.family 'mlp'", MLP_KINDS],
    ),
    (
        "kind-not-for-family-fixed",
        {"regularization": {"dropout": {"kind": "spatial"}}, "search": {RATE: SEARCH[RATE]}},
        [KIND, "'spatial'", "model.family 'mlp'", MLP_KINDS],
    ),
    ("unknown-sampler", {"sampler": {"name": "bayes"}}, ["sampler.name", SAMPLERS, "'bayes'"]),
    ("unknown-pruner", {"pruner": {"name": "early"}}, ["pruner.name", PRUNERS, "'early'"]),
    (
        "search-path-missing",
        {"search": {**SEARCH, "regularization.dropout.hiden_rate": {"low": 0.0, "high": 0.5}}},
        ["search.regularization.dropout.hiden_rate: no such config field", "data, model"],
    ),
    (
        "search-path-not-a-leaf",
        {"search": {**SEARCH, "regularization.dropout": {"choices": [0.1]}}},
        ["search.regularization.dropout: no such config field"],
    ),
    (
        "search-path-not-for-family",
        {"search": {**SEARCH, "regularization.dropout.recurrent_rate": {"low": 0.0, "high": 0.5}}},
        ["search.regularization.dropout.recurrent_rate", "rnn or custom", "not 'mlp'"],
    ),
    (
        "nsgaii-single-objective",
        {"sampler": {"name": "nsgaii"}},
        ["sampler.name: nsgaii is for multi-objective", "tpe, random"],
    ),
    (
        "metrics-directions-mismatch",
        {
            "study": {
                "name": "mo",
                "metric": DELETE,
                "direction": DELETE,
                "metrics": ["val_loss", "val_train_gap"],
                "directions": ["minimize"],
            }
        },
        ["study.directions", "2 metrics need 2 directions, got 1"],
    ),
    (
        "patience-float-range",
        {"search": {**SEARCH, "regularization.early_stopping.patience": {"low": 2, "high": 9}}},
        ["search.regularization.early_stopping.patience", "candidate 2.0", "valid integer"],
    ),
    (
        "unparsable-storage-url",
        {"storage": "not a url at all"},
        ["storage: not a valid SQLAlchemy URL", "'not a url at all'", "sqlite:///"],
    ),
    (
        "unsupported-backend",
        {"storage": "mongodb://localhost/db"},
        ["storage: unsupported backend 'mongodb'", "allowed: sqlite, postgresql, mysql"],
    ),
    (
        "unreachable-storage",
        {"storage": "postgresql+psycopg://tuner:s3cr3t-pw@127.0.0.1:1/nowhere"},
        ["storage 'postgresql+psycopg://tuner:***@127.0.0.1:1/nowhere'", "unreachable"],
    ),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error(err: str, expected: list[str]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    for part in expected:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    return errors[0]


@pytest.mark.parametrize(("case", "spec", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exits_2_before_touching_storage(
    case: str,
    spec: dict[str, Any] | str,
    expected: list[str],
    write_spec: SpecWriter,
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the default storage would be ./runs/<study>/droptune.db
    path = write_spec(text=spec) if isinstance(spec, str) else write_spec(**spec)

    code, out, err = _run(["run", str(path), "--workers", "1"], capsys)

    # a database that cannot be reached is the environment failing (1), not the input (2)
    assert code == (1 if case == "unreachable-storage" else 2), (
        f"exit {code}\nstdout: {out}\nstderr: {err}"
    )
    line = _assert_one_error(err, expected)
    assert "s3cr3t-pw" not in err + out
    print(line)
    db_file = Path(sqlite_url.removeprefix("sqlite:///"))
    assert not db_file.exists() and not db_file.parent.exists()
    assert not (tmp_path / "runs").exists()
    assert out == ""


def test_missing_spec_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(["run", "nowhere/spec.yaml"], capsys)
    assert code == 2
    _assert_one_error(err, ["spec file 'nowhere/spec.yaml' does not exist"])
    assert list(tmp_path.iterdir()) == []


def test_bad_storage_option_is_refused_before_the_spec_runs(
    write_spec: SpecWriter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_spec(storage=DELETE)
    code, _, err = _run(["run", str(path), "--storage", "redis://localhost:6379"], capsys)
    assert code == 2
    _assert_one_error(err, ["--storage: unsupported backend 'redis'", "sqlite, postgresql"])
    assert not (tmp_path / "runs").exists()


def test_bad_spec_creates_no_table_in_a_reachable_postgres(
    write_spec: SpecWriter,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_spec(storage=pg_url, sampler={"name": "nsgaii"})
    code, _, err = _run(["run", str(path)], capsys)
    assert code == 2
    _assert_one_error(err, ["sampler.name: nsgaii"])
    assert pg_tables(pg_url) == []
    # The same spec, fixed, does create the study (so the check above can fail).
    path = write_spec(storage=pg_url)
    code, _, err = _run(["run", str(path), "--workers", "0"], capsys)
    assert code == 0, err
    assert "studies" in pg_tables(pg_url)


def test_spec_from_dict_names_the_field() -> None:
    data = merge(TINY, {"execution": {"grace_period": 1}})
    with pytest.raises(SpecError, match=r"^execution\.grace_period: must be >= 2"):
        spec_from_dict(data)
    with pytest.raises(SpecError, match="top level must be a mapping"):
        spec_from_dict([1, 2])


def test_tiny_spec_and_shipped_specs_are_valid() -> None:
    spec = spec_from_dict(TINY)
    assert spec.study.objectives == ["val_loss"]
    assert spec.base.model.hidden == [16]
    shipped = sorted((ROOT / "studies").glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert load_spec(path).study.name == path.stem
