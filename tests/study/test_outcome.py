"""The one mapping from a finished training to a trial's record (``droptune.study.outcome``),
which the Lightning path and population rounds both use."""

from __future__ import annotations

import math

from optuna.trial import TrialState
import pytest

from droptune.records import EPOCHS_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.records import PRUNED_AT_EPOCH_ATTR
from droptune.records import STOPPED_EARLY_ATTR
from droptune.study.outcome import Fitted
from droptune.study.outcome import trial_outcome


ROWS = [
    {"val_loss": 0.9, "val_acc": 0.50},
    {"val_loss": 0.4, "val_acc": 0.70},
    {"val_loss": 0.6, "val_acc": 0.80},
]
FINAL = {"val_loss": 0.6, "val_acc": 0.8, "train_loss": 0.1}


@pytest.mark.parametrize(
    ("metric", "direction", "expected"),
    [("val_loss", "minimize", 0.4), ("val_acc", "maximize", 0.8)],
)
def test_a_single_objective_is_its_best_epoch(
    metric: str, direction: str, expected: float
) -> None:
    out = trial_outcome(Fitted(3, True, FINAL, ROWS), [metric], [direction])
    assert out.state is TrialState.COMPLETE
    assert out.values == expected
    assert out.attrs[EPOCHS_ATTR] == 3 and out.attrs[STOPPED_EARLY_ATTR] is True
    assert out.attrs["metric.val_train_gap"] == pytest.approx(0.5)
    assert out.attrs["metric.val_acc"] == 0.8
    assert out.error is None


def test_several_objectives_are_their_final_values() -> None:
    out = trial_outcome(Fitted(3, False, FINAL, ROWS), ["val_loss", "val_acc"], ["minimize"] * 2)
    assert out.state is TrialState.COMPLETE and out.values == [0.6, 0.8]


def test_a_metric_never_logged_fails_naming_what_was() -> None:
    out = trial_outcome(Fitted(3, False, FINAL, ROWS), ["val_f1"], ["maximize"])
    assert out.state is TrialState.FAIL and out.values is None
    reason = out.attrs[FAIL_REASON_ATTR]
    assert "val_f1" in reason and "val_loss" in reason and "val_acc" in reason
    assert out.attrs[EPOCHS_ATTR] == 3  # what trained is still recorded


def test_a_diverged_epoch_fails_with_the_epoch() -> None:
    rows = [{"val_loss": 0.9}, {"val_loss": math.nan}, {"val_loss": 0.1}]
    out = trial_outcome(Fitted(3, False, {"val_loss": 0.1}, rows), ["val_loss"], ["minimize"])
    assert out.state is TrialState.FAIL
    assert "val_loss became nan at epoch 1" in out.attrs[FAIL_REASON_ATTR]


def test_a_non_finite_final_metric_is_left_out_of_the_attributes() -> None:
    final = {"val_loss": math.inf, "val_acc": 0.3}
    out = trial_outcome(Fitted(1, False, final), ["val_loss", "val_acc"], ["minimize"] * 2)
    assert out.state is TrialState.FAIL
    assert "metric.val_loss" not in out.attrs and out.attrs["metric.val_acc"] == 0.3


def test_a_pruned_member_is_pruned_at_its_last_epoch() -> None:
    out = trial_outcome(Fitted(3, False, FINAL, ROWS, pruned=True), ["val_loss"], ["minimize"])
    assert out.state is TrialState.PRUNED and out.values is None
    assert out.attrs[PRUNED_AT_EPOCH_ATTR] == 2


def test_a_member_past_the_deadline_fails_with_the_reason() -> None:
    out = trial_outcome(Fitted(2, False, FINAL, ROWS, timed_out=True), ["val_loss"], ["minimize"])
    assert out.state is TrialState.FAIL
    assert "deadline" in out.attrs[FAIL_REASON_ATTR]
