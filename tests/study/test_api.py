"""``droptune.run_study``: a study from Python, with a path, a mapping or a StudySpec; bad input
raises SpecError and creates nothing; it runs off the main thread too (as in a notebook's
background thread, where no signal handler can be installed)."""

from __future__ import annotations

from pathlib import Path
import threading
from typing import Any

import optuna
import pytest

import droptune
from droptune.exceptions import SpecError
from droptune.study.spec import spec_from_dict
from tests.study.helpers import TINY
from tests.study.helpers import merge


SMALL = merge(TINY, {"study": {"name": "api"}, "n_trials": 2, "pruner": {"name": "none"}})


@pytest.mark.slow
def test_run_study_takes_a_mapping_or_a_studyspec_and_returns_the_best_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    best = droptune.run_study(SMALL, workers=1)
    assert isinstance(best, optuna.trial.FrozenTrial) and best.state.name == "COMPLETE"
    assert (tmp_path / "runs" / "api" / "spec.yaml").is_file()  # what the workers read
    study = optuna.load_study(study_name="api", storage="sqlite:///runs/api/droptune.db")
    assert best.number == study.best_trial.number and len(study.trials) == 2

    # a StudySpec, run in a thread that is not the main one
    results: list[Any] = []
    spec = spec_from_dict(merge(SMALL, {"study": {"name": "api-thread"}}))
    thread = threading.Thread(target=lambda: results.append(droptune.run_study(spec)))
    thread.start()
    thread.join(timeout=300)
    assert results and results[0].state.name == "COMPLETE"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (merge(SMALL, {"train": {"lr": -1.0}}), "train.lr"),
        ({"study": {"name": "../x"}}, "study.name"),
        (42, "spec: give a spec file's path"),
        ("missing.yaml", "does not exist"),
    ],
)
def test_bad_input_raises_specerror_and_creates_nothing(
    spec: Any, field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=field.replace("[", r"\[").replace(".", r"\.")):
        droptune.run_study(spec)
    assert list(tmp_path.iterdir()) == []
