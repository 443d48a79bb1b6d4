"""A finished training → the trial's outcome: its state, objective value(s) and attributes.

One mapping for both ways a trial trains — alone through Lightning (``Objective``) and as a
member of a population round — so that the same curve always gives the same record:

- the value of a single objective is its best epoch (the epoch early stopping restores), of
  several objectives each one's final value;
- a metric that was never logged, or a non-finite value on the way, fails the trial with the
  reason (a diverged loss is a result about the config, not a crash);
- a run that passed the study's deadline while training fails; a pruned member is PRUNED at its
  last epoch;
- the attributes every finished training records: epochs, whether early stopping ended it,
  ``metric.<name>`` for each finite final metric, including the validation-train loss gap.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
import math
from typing import Any

from optuna.trial import TrialState

from droptune.records import EPOCHS_ATTR
from droptune.records import PRUNED_AT_EPOCH_ATTR
from droptune.records import STOPPED_EARLY_ATTR
from droptune.records import failure_attrs


__all__ = ["GAP_METRIC", "Fitted", "Outcome", "TrialFailed", "result_attrs", "trial_outcome"]


class TrialFailed(Exception):
    """A trial could not produce a usable value (NaN/inf metric, missing metric)."""


#: val_loss − train_loss of the final epoch, recorded as ``metric.val_train_gap``.
GAP_METRIC = "val_train_gap"


@dataclass(frozen=True)
class Fitted:
    """What one training produced."""

    epochs: int
    stopped_early: bool
    #: The final metrics (``val_loss``, ``val_acc``, ...).
    metrics: Mapping[str, float]
    #: One row of metrics per epoch.
    history: Sequence[Mapping[str, float]] = field(default_factory=list)
    #: A population's pruner stopped this member.
    pruned: bool = False
    #: The study's deadline passed while it trained.
    timed_out: bool = False


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    #: The objective value(s) of a COMPLETE trial, None otherwise.
    values: float | list[float] | None
    #: The trial's user attributes from this training.
    attrs: dict[str, Any]
    #: Why a FAIL'd trial failed.
    error: TrialFailed | None = None


def result_attrs(epochs: int, stopped_early: bool, final: Mapping[str, float]) -> dict[str, Any]:
    """A finished fit's user attributes: epochs trained, whether early stopping ended it, and
    ``metric.<name>`` for each finite final metric."""
    attrs: dict[str, Any] = {EPOCHS_ATTR: epochs, STOPPED_EARLY_ATTR: stopped_early}
    attrs.update({f"metric.{k}": v for k, v in final.items() if math.isfinite(v)})
    return attrs


def trial_outcome(fitted: Fitted, objectives: Sequence[str], directions: Sequence[str]) -> Outcome:
    """The state, value(s) and attributes a trial records for ``fitted``.

    Example:
        >>> rows = [{"val_loss": 0.9}, {"val_loss": 0.5}, {"val_loss": 0.7}]
        >>> fitted = Fitted(3, False, {"val_loss": 0.7, "train_loss": 0.2}, rows)
        >>> out = trial_outcome(fitted, ["val_loss"], ["minimize"])
        >>> out.state.name, out.values, round(out.attrs["metric.val_train_gap"], 3)
        ('COMPLETE', 0.5, 0.5)
    """
    final = dict(fitted.metrics)
    if "val_loss" in final and "train_loss" in final:
        final[GAP_METRIC] = final["val_loss"] - final["train_loss"]
    attrs = result_attrs(fitted.epochs, fitted.stopped_early, final)
    if fitted.pruned:
        attrs[PRUNED_AT_EPOCH_ATTR] = fitted.epochs - 1
        return Outcome(TrialState.PRUNED, None, attrs)
    try:
        if fitted.timed_out:
            raise TrialFailed("the deadline passed while the trial was training")
        values: float | list[float]
        if len(objectives) == 1:
            values = best_value(objectives[0], directions[0], fitted.history, final)
        else:
            values = [final_value(m, final) for m in objectives]
    except TrialFailed as exc:
        attrs.update(failure_attrs(exc))
        return Outcome(TrialState.FAIL, None, attrs, exc)
    return Outcome(TrialState.COMPLETE, values, attrs)


def final_value(metric: str, final: Mapping[str, float]) -> float:
    """``metric``'s final value; TrialFailed if it was not logged or is not finite."""
    if metric not in final:
        raise TrialFailed(f"metric {metric!r} was not logged; logged: {', '.join(final)}")
    value = final[metric]
    if not math.isfinite(value):
        raise TrialFailed(f"{metric} is {value} (the loss diverged)")
    return value


def best_value(
    metric: str,
    direction: str,
    rows: Sequence[Mapping[str, float]],
    final: Mapping[str, float],
) -> float:
    """``metric``'s best epoch (its final value if no epoch logged it); TrialFailed at the first
    non-finite epoch."""
    values = [row[metric] for row in rows if metric in row]
    if not values:
        return final_value(metric, final)
    if any(not math.isfinite(v) for v in values):
        bad = next(v for v in values if not math.isfinite(v))
        raise TrialFailed(
            f"{metric} became {bad} at epoch {values.index(bad)} (the loss diverged)"
        )
    return min(values) if direction == "minimize" else max(values)
