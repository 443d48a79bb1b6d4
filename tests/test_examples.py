"""The examples in examples/ run end to end as a user would run them."""

from __future__ import annotations

import math
from pathlib import Path
import re
import subprocess
import sys

import optuna
import pytest

from tests.study.helpers import cli_env
from tests.study.helpers import droptune_cmd


ROOT = Path(__file__).resolve().parents[1]


def test_apply_to_your_model_runs_and_learns() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "apply_to_your_model.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The report names every swapped module with its site.
    assert re.search(r"features\.2\s+conv\s+Dropout2d\(p=0\.0.*-> SpatialDropout\(p=0\.1\)", out)
    assert re.search(r"head\.1\s+hidden\s+Dropout\(p=0\.0.*-> Dropout\(p=0\.3\)", out)
    accuracies = [float(a) for a in re.findall(r"val_acc=([0-9.]+)", out)]
    assert len(accuracies) == 5
    assert accuracies[-1] > 0.8  # 10 classes: chance is 0.1


def test_use_best_config_trains_the_droptune_model_and_the_users_own() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "use_best_config.py"), "--max-epochs", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tuned regularization:" in out
    # The user's own dropout modules were swapped for the tuned kind and rates.
    assert re.search(r"body\.1\s+input\s+Dropout\(p=0\.1.*-> Dropout\(p=0\.1\)", out)
    assert re.search(r"body\.4\s+hidden\s+Dropout\(p=0\.5.*-> Dropout\(p=0\.35\)", out)
    accuracies = [float(a) for a in re.findall(r"val_acc=([0-9.]+)", out)]
    assert len(accuracies) == 2 and all(a > 0.2 for a in accuracies)


def test_hf_tiny_bert_example_prints_berts_sites() -> None:
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_tiny_bert.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**cli_env(), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"bert\.bert\.embeddings\.dropout\s+input\s+.*-> Dropout\(p=0\.05\)", out)
    assert re.search(
        r"layer\.0\.attention\.self\.dropout\s+attention\s+.*# the library reads p", out
    )
    assert re.search(r"layer\.1\.output\.dropout\s+hidden\s+.*-> Dropout\(p=0\.2\)", out)
    assert re.search(r"^bert\.dropout\s+hidden", out, re.MULTILINE)


@pytest.mark.slow
def test_custom_hf_bert_study_runs_end_to_end(tmp_path: Path) -> None:
    """``droptune run studies/custom-hf-bert.yaml`` from another folder, as a user runs it."""
    pytest.importorskip("transformers")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = subprocess.run(
        [
            *droptune_cmd(),
            "run",
            str(ROOT / "studies" / "custom-hf-bert.yaml"),
            "--storage",
            storage,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env={**cli_env(), "HF_HUB_OFFLINE": "1"},  # the repository root on PYTHONPATH
    )
    assert result.returncode == 0, result.stderr[-5000:]
    study = optuna.load_study(study_name="custom-hf-bert", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6
    assert all(
        t.state == optuna.trial.TrialState.COMPLETE or t.state.name == "PRUNED" for t in finished
    )
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    keys = {
        "regularization.dropout.input_rate",
        "regularization.dropout.hidden_rate",
        "regularization.dropout.attention_rate",
        "regularization.l2.strength",
    }
    assert all(set(t.params) == keys for t in complete)
    values = [t.value for t in complete]
    assert len(set(values)) == len(values)  # each trial's rates changed the model
    assert study.best_value < math.log(2) - 0.1  # BERT learned the task (chance is ln 2)
    assert "best value:" in result.stdout
