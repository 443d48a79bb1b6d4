"""What ``droptune run`` prints, read as a user reads a log (stdout and stderr not a terminal):
one line per finished trial of at most 100 characters, no line over 200, no traceback or
library chatter, and an end summary with the best trial's number and the next commands."""

from __future__ import annotations

import re

import pytest

from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter


@pytest.mark.slow
def test_run_prints_one_short_line_per_trial_and_a_summary_with_next_steps(
    procs: Procs, write_spec: SpecWriter
) -> None:
    path = write_spec(
        study={"name": "out"},
        tracking={"enabled": True},  # MLflow's own INFO lines must not show
        pruner={"name": "none"},
        n_trials=4,
    )
    result = procs.run("run", str(path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert all(len(line) <= 200 for line in lines), max(lines, key=len)
    trial_lines = [line for line in lines if re.match(r"#\d+ ", line)]
    numbers = sorted(int(line.split()[0][1:]) for line in trial_lines)
    assert numbers == [0, 1, 2, 3], trial_lines
    assert all(len(line) <= 100 and "COMPLETE" in line for line in trial_lines), trial_lines
    assert "baseline" in next(line for line in trial_lines if line.startswith("#0 "))
    text = "\n".join(lines)
    for noise in ("Traceback", "INFO", "Warning", "Creating initial MLflow"):
        assert noise not in text, text[-3000:]
    best = re.search(r"best value: \S+ val_loss \(trial (\d+)\)", result.stdout)
    assert best is not None, result.stdout
    assert "next: droptune ui out" in result.stdout
    assert "droptune export out -o best.yaml" in result.stdout
