"""A worker process: claim a slot, run one trial, repeat until the study has its trials.

Workers import torch, Lightning and Optuna once and run many trials. SIGTERM and SIGINT raise
:class:`WorkerInterrupted` inside the running trial, which Optuna records as FAIL (with the
reason) before the worker exits; with ``graceful`` the running trial finishes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
import logging
import os
import signal
import socket
import time
from types import FrameType
from typing import Any
import uuid

import optuna

from droptune.storage import open_storage
from droptune.study.factories import make_pruner
from droptune.study.factories import make_sampler
from droptune.study.objective import Objective
from droptune.study.slots import Slots
from droptune.study.spec import StudySpec


__all__ = ["WorkerInterrupted", "WorkerReport", "run_worker"]

log = logging.getLogger(__name__)


class WorkerInterrupted(Exception):
    """Raised in the running trial when the worker receives SIGTERM or SIGINT."""


@dataclass
class WorkerReport:
    """What one worker did."""

    owner: str
    states: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    gave_up: str | None = None


def _states(study: optuna.Study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def run_worker(
    spec: StudySpec,
    storage_url: str,
    study_name: str,
    *,
    worker_index: int = 0,
    owner: str | None = None,
    device_overrides: dict[str, Any] | None = None,
    deadline: float | None = None,
    graceful: bool = False,
    poll_interval: float = 1.0,
) -> WorkerReport:
    """Run trials of an existing study until every slot holds a finished trial.

    Args:
        spec: The validated spec (search space, sampler, pruner, objectives).
        storage_url: Where the study lives.
        study_name: Its name.
        worker_index: Offsets the sampler seed so parallel workers do not sample alike.
        owner: Identity recorded on slots and trials (default host:pid:random).
        device_overrides: Config overrides that pin this worker to a device.
        deadline: ``time.time()`` after which no new trial starts.
        graceful: On SIGTERM/SIGINT finish the running trial instead of failing it.
    """
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    report = WorkerReport(owner)
    execution = spec.execution
    storage = open_storage(
        storage_url,
        heartbeat_interval=execution.heartbeat_interval,
        grace_period=execution.grace_period,
    )
    sampler_seed = None if spec.sampler.seed is None else spec.sampler.seed + worker_index
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec, seed=sampler_seed),
        pruner=make_pruner(spec),
    )
    slots = Slots(storage_url, study_name)
    objective = Objective(spec, device_overrides, worker=owner)
    stop = {"requested": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if graceful and not stop["requested"]:
            stop["requested"] = True
            log.warning("worker %s: signal %d, finishing the running trial", owner, signum)
            return
        stop["requested"] = True
        raise WorkerInterrupted(f"worker interrupted by signal {signum}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    consecutive_failures = 0
    try:
        while not stop["requested"]:
            states = _states(study)
            slots.reclaim(states, stale_after=execution.grace_period)
            if deadline is not None and time.time() >= deadline:
                break
            slot = slots.claim(owner)
            if slot is None:
                if slots.finished(states):
                    break
                # Other workers hold the remaining slots: reap stale trials and wait, so that a
                # slot freed by a failure is run here if its worker is gone.
                optuna.storages.fail_stale_trials(study)
                time.sleep(poll_interval)
                continue

            def bind(trial: optuna.Trial, slot: int = slot) -> None:
                slots.bind(slot, owner, trial.number)

            objective.on_trial_start = [bind]
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,))
            except WorkerInterrupted:
                report.interrupted = True
            number = max((n for n in _states(study)), default=-1)
            trial = _bound_trial(study, slots, slot, owner)
            state = trial.state.name if trial is not None else "FAIL"
            report.states[state] = report.states.get(state, 0) + 1
            if state == "FAIL" or trial is None:
                slots.release(slot, owner)
                consecutive_failures += 1
                if consecutive_failures >= execution.max_consecutive_failures:
                    report.gave_up = (
                        f"{consecutive_failures} consecutive trials failed (last: trial "
                        f"{trial.number if trial else number}: "
                        f"{trial.user_attrs.get('droptune.fail_reason', '?') if trial else '?'}); "
                        "stopping this worker instead of burning the study — fix the cause and "
                        "run again to resume"
                    )
                    log.error("worker %s: %s", owner, report.gave_up)
                    break
            else:
                consecutive_failures = 0
            if report.interrupted:
                break
    except WorkerInterrupted:
        report.interrupted = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        slots.close()
    return report


def _bound_trial(
    study: optuna.Study, slots: Slots, slot: int, owner: str
) -> optuna.trial.FrozenTrial | None:
    row = next((r for r in slots.rows() if r.slot == slot), None)
    if row is None or row.trial_number is None:
        return None
    trials = study.get_trials(deepcopy=False)
    return next((t for t in trials if t.number == row.trial_number), None)
