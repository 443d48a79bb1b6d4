"""The examples in examples/ run end to end as a user would run them."""

from __future__ import annotations

from pathlib import Path
import re
import subprocess
import sys


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
