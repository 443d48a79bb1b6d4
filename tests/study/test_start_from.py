"""``start_from``: a study starts from configs the user already knows (explicit param sets,
the top trials of another study), enqueued after the baseline when the study is created,
once; bad input is refused before anything is created."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from droptune.cli import main
from tests.fuzz.fuzzing import _no_study_anywhere
from tests.study.helpers import DELETE
from tests.study.helpers import SpecWriter


def _waiting(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t for t in study.trials if t.state.name == "WAITING"]


def _fixed(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return dict(trial.system_attrs["fixed_params"])


def test_explicit_configs_are_enqueued_after_the_baseline_once(
    write_spec: SpecWriter, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configs = [
        {"regularization.dropout.kind": "none", "regularization.l2.strength": 1.0e-3},
        {"regularization.dropout.kind": "gaussian", "regularization.dropout.hidden_rate": 0.25},
    ]
    path = write_spec(study={"name": "known"}, start_from={"params": configs}, n_trials=4)
    assert main(["run", str(path), "--workers", "0"]) == 0
    waiting = _waiting(sqlite_url, "known")
    assert [t.number for t in waiting] == [0, 1, 2]
    assert waiting[0].user_attrs["droptune.baseline"] is True
    assert [_fixed(t) for t in waiting[1:]] == configs
    assert [t.user_attrs["droptune.started_from"] for t in waiting[1:]] == [
        "start_from.params[0]",
        "start_from.params[1]",
    ]
    # resuming never enqueues them again
    assert main(["run", str(path), "--workers", "0"]) == 0
    assert len(_waiting(sqlite_url, "known")) == 3


@pytest.mark.slow
def test_a_study_starts_from_the_top_trials_of_another(
    write_spec: SpecWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_url = f"sqlite:///{tmp_path / 'small.db'}"
    small = write_spec(
        "small", study={"name": "small"}, storage=small_url, pruner={"name": "none"}, n_trials=4
    )
    assert main(["run", str(small)]) == 0
    source = optuna.load_study(study_name="small", storage=small_url)
    ranked = sorted(
        (t for t in source.trials if t.state.name == "COMPLETE"), key=lambda t: float(t.value)
    )
    # the larger model's study: another width, the same regularization paths, but a
    # narrower l2 range, so that a source value outside it is left to the sampler
    big_url = f"sqlite:///{tmp_path / 'big.db'}"
    big = write_spec(
        "big",
        study={"name": "big"},
        storage=big_url,
        model={"family": "mlp", "hidden": [32]},
        start_from={"study": {"name": "small", "storage": small_url, "top_k": 2}},
        search={
            "regularization.dropout.kind": {"choices": ["none", "standard", "gaussian"]},
            "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
            "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
        },
        n_trials=3,
    )
    assert main(["run", str(big)]) == 0
    trials = optuna.load_study(study_name="big", storage=big_url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for trial, origin in zip(trials[1:], ranked[:2], strict=True):
        assert trial.user_attrs["droptune.started_from"] == f"study small trial {origin.number}"
        assert trial.params == origin.params  # the same search space: the same config


@pytest.mark.parametrize(
    ("start_from", "field"),
    [
        ({"params": [{"train.lr": 0.1}]}, "start_from.params[0]: 'train.lr' is not searched"),
        (
            {"params": [{"regularization.dropout.hidden_rate": 0.9}]},
            "start_from.params[0]: regularization.dropout.hidden_rate=0.9 is outside",
        ),
        ({"params": [{}]}, "start_from.params[0]: an empty config"),
        ({"study": {"name": "../x"}}, "start_from.study.name"),
        ({"study": {"name": "nowhere", "top_k": 0}}, "start_from.study.top_k"),
        ({"study": {"name": "nowhere"}}, "start_from.study: no such storage"),
        ({"params": [{"regularization.l2.strength": 1e-4}] * 3}, "do not fit in n_trials 3"),
        ({"studyy": {"name": "x"}}, "start_from.studyy"),
    ],
)
def test_bad_start_from_is_refused_naming_the_field_and_creates_nothing(
    start_from: dict[str, Any],
    field: str,
    write_spec: SpecWriter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    # the default storage (runs/bad/droptune.db): not even an empty database file is left
    path = write_spec(study={"name": "bad"}, start_from=start_from, storage=DELETE)
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["run", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before
    _no_study_anywhere(tmp_path)


def test_a_source_config_equal_to_the_baseline_is_not_enqueued_twice(
    write_spec: SpecWriter, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.study.helpers import TINY

    dropout = TINY["regularization"]["dropout"]
    baseline = {
        "regularization.dropout.kind": dropout["kind"],
        "regularization.dropout.hidden_rate": dropout["hidden_rate"],
    }
    path = write_spec(
        study={"name": "twice"},
        search={
            "regularization.dropout.kind": {"choices": ["none", "standard"]},
            "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        },
        start_from={"params": [baseline, {**baseline, "regularization.dropout.hidden_rate": 0.4}]},
        n_trials=3,
    )
    assert main(["run", str(path), "--workers", "0"]) == 0
    waiting = _waiting(sqlite_url, "twice")
    assert [_fixed(t) for t in waiting] == [
        baseline,
        {**baseline, "regularization.dropout.hidden_rate": 0.4},
    ]
