"""Confirmation: the top configs re-trained with several seeds, the best chosen by its mean,
recorded on the study and in MLflow, and used by best/export/load_best. Real CLI, SQLite and a
local MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

from mlflow import MlflowClient
import optuna
import pytest
import yaml

import droptune
from droptune.records import CONFIRMATION_ATTR
from droptune.study.confirm import confirmation_of
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import load
from tests.study.helpers import tracking_section


@pytest.mark.slow
def test_confirm_retrains_the_top_configs_and_best_uses_the_confirmed_one(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str, tmp_path: Path
) -> None:
    tracking = tracking_section(tmp_path)
    path = write_spec(
        study={"name": "conf"}, tracking=tracking, pruner={"name": "none"}, n_trials=4
    )
    assert procs.run("run", str(path)).returncode == 0

    result = procs.run("confirm", "conf", "--storage", sqlite_url, "--top-k", "3", "--seeds", "2")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "confirmation: top 3 trials x 2 seeds, val_loss (minimize)" in result.stdout
    assert "<- confirmed best" in result.stdout
    study = load(sqlite_url, "conf")
    confirmed = confirmation_of(study)
    assert confirmed is not None
    ranked = sorted(
        study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.value
    )
    assert [c.trial for c in confirmed.candidates] == [t.number for t in ranked[:3]]
    assert len(set(confirmed.seeds)) == 2
    for candidate in confirmed.candidates:
        assert len(candidate.values) == 2 and all(math.isfinite(v) for v in candidate.values)
        assert candidate.ci95 > 0
    means = {c.trial: c.mean for c in confirmed.candidates}
    assert confirmed.best_trial == min(means, key=means.__getitem__)

    # best, export and load_best give the confirmed trial's config, and say so
    best = procs.run("best", "--study", "conf", "--storage", sqlite_url)
    assert f"trial {confirmed.best_trial}: the confirmed best" in best.stderr
    chosen = next(t for t in study.trials if t.number == confirmed.best_trial)
    exported = yaml.safe_load(best.stdout)
    assert exported["train"]["seed"] == chosen.user_attrs["droptune.seed"]
    config = droptune.load_best("conf", sqlite_url)
    assert config.train.seed == chosen.user_attrs["droptune.seed"]

    # one MLflow run per re-training, under the study's run, tagged with its origin trial
    client = MlflowClient(tracking["uri"])
    experiment = client.get_experiment_by_name("conf")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("droptune.role") == "study")
    confirm_runs = [r for r in runs if r.data.tags.get("droptune.role") == "confirmation"]
    assert len(confirm_runs) == 6
    for run in confirm_runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert int(run.data.tags["droptune.confirmation_of"]) in means
        assert run.info.status == "FINISHED" and "objective" in run.data.metrics
    assert parent.data.tags["droptune.confirmed_best_trial"] == str(confirmed.best_trial)


@pytest.mark.slow
def test_confirm_bad_input_writes_nothing_and_fewer_trials_are_said(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    path = write_spec(study={"name": "few"}, pruner={"name": "none"}, n_trials=2)
    assert procs.run("run", str(path)).returncode == 0
    for args, message in [
        (["--top-k", "0"], "--top-k: must be >= 1, got 0"),
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
    ]:
        bad = procs.run("confirm", "few", "--storage", sqlite_url, *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    missing = procs.run("confirm", "nope", "--storage", sqlite_url)
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr
    assert CONFIRMATION_ATTR not in load(sqlite_url, "few").user_attrs

    result = procs.run("confirm", "few", "--storage", sqlite_url, "--top-k", "5", "--seeds", "1")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "only 2 COMPLETE trials; confirmed those instead of 5" in result.stdout


@pytest.mark.slow
def test_a_spec_confirm_section_runs_at_the_end_of_run(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    path = write_spec(
        study={"name": "endconf"},
        pruner={"name": "none"},
        confirm={"top_k": 2, "seeds": 2},
        n_trials=3,
    )

    result = procs.run("run", str(path))

    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline (the spec's config, trial 0):" in result.stdout
    assert "confirmation: top 2 trials x 2 seeds" in result.stdout
    confirmed = confirmation_of(load(sqlite_url, "endconf"))
    assert confirmed is not None and confirmed.complete == 3
    # run again: the study has its trials and its confirmation; nothing is re-trained
    again = procs.run("run", str(path))
    assert again.returncode == 0
    assert confirmation_of(load(sqlite_url, "endconf")) == confirmed
