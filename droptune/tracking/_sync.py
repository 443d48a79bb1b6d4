"""``droptune sync``: back-fill MLflow from the Optuna storage, so every trial has one run.

Trials run while the tracking server was down (or unreachable from a worker) have no run, or a
run left RUNNING. Sync walks the study: it (re)creates the parent run if the server does not know
it, adopts an existing child run of the same trial number instead of creating a duplicate,
completes runs left RUNNING by ended trials, and creates the missing ones from what Optuna
recorded (params, resolved config, per-epoch metrics, state, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
import logging
from typing import TYPE_CHECKING
from typing import Any

from droptune.records import DUPLICATE_ATTR
from droptune.records import PARENT_ATTR
from droptune.records import TRIAL_NUMBER_TAG


if TYPE_CHECKING:
    import optuna

    from droptune.tracking._study import StudyTracking

__all__ = ["SyncReport", "sync_study"]

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """What sync did, by trial number."""

    created: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    adopted: list[int] = field(default_factory=list)
    duplicates_removed: list[str] = field(default_factory=list)
    parent_created: bool = False


def _parent_exists(tracking: StudyTracking, study: optuna.Study) -> bool:
    parent = study.user_attrs.get(PARENT_ATTR)
    if not parent:
        return False
    try:
        run = tracking.tracker.client.get_run(str(parent))
    except Exception:
        return False
    return bool(run.info.lifecycle_stage == "active")


def sync_study(study: optuna.Study, tracking: StudyTracking) -> SyncReport:
    """Make MLflow hold exactly one run per ended trial of ``study``."""
    from optuna.trial import TrialState

    report = SyncReport()
    if not _parent_exists(tracking, study):
        tracking.forget_parent(study)
        report.parent_created = True
    parent = tracking.parent_run_id(study)
    runs: dict[int, list[Any]] = {}
    for run in tracking.tracker.child_runs(parent):
        number = run.data.tags.get(TRIAL_NUMBER_TAG)
        if number is not None and number.isdigit():
            runs.setdefault(int(number), []).append(run)
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for frozen in study.get_trials(deepcopy=False, states=ended):
        if DUPLICATE_ATTR in frozen.user_attrs:
            continue  # sampled a finished config again: failed before training, no run
        existing = sorted(runs.get(frozen.number, []), key=lambda r: r.info.start_time or 0)
        own = str(tracking.run_id_of(frozen) or "")
        keep = next(
            (r for r in existing if r.info.run_id == own), existing[0] if existing else None
        )
        for extra in existing:
            if keep is not None and extra.info.run_id != keep.info.run_id:
                tracking.tracker.client.delete_run(extra.info.run_id)
                report.duplicates_removed.append(extra.info.run_id)
        if keep is None:
            tracking.log_trial(study, frozen, new_run=True)
            report.created.append(frozen.number)
            continue
        if keep.info.run_id != own:
            tracking.link(study, frozen, keep.info.run_id)
            report.adopted.append(frozen.number)
        if keep.info.status == "RUNNING":
            tracking.log_trial(study, frozen, run_id=keep.info.run_id)
            report.completed.append(frozen.number)
    return report
