"""A worker process: claim a slot, run one trial, repeat until the study has its trials.

Workers import torch, Lightning and Optuna once and run many trials. SIGTERM and SIGINT raise
:class:`WorkerInterrupted` inside the running trial, which Optuna records as FAIL (with the
reason) before the worker exits with code 130; with ``graceful`` the running trial finishes
first (a second signal, :data:`REPEAT_AFTER_S` or more later, interrupts it).

The signal handler itself only records the signal: an exception raised from a handler lands
wherever the main thread happens to be, and Python swallows it when that is a finalizer or a
weakref callback (the trial then went on, or Lightning's own SIGTERM handling ended the process
with the trial left RUNNING). The trial raises at the next batch boundary instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any
import uuid

import optuna
import pytorch_lightning as pl

from droptune.exceptions import SpecError
from droptune.records import DUPLICATE_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.storage import fail_stale_trials
from droptune.storage import open_storage
from droptune.storage import trial_states
from droptune.study.factories import make_pruner
from droptune.study.factories import make_sampler
from droptune.study.objective import Objective
from droptune.study.population import population_round
from droptune.study.slots import Slots
from droptune.study.spec import StudySpec
from droptune.tracking import StudyTracking


__all__ = [
    "REPEAT_AFTER_S",
    "TASK_INDEX_VARIABLES",
    "WorkerInterrupted",
    "WorkerReport",
    "run_worker",
    "task_index",
]

log = logging.getLogger(__name__)


#: Where batch engines put a task's index, read in this order when ``--worker-index`` is not
#: given: a Kubernetes Indexed Job (``completionMode: Indexed``), a Slurm job array.
TASK_INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")


def task_index(environ: Mapping[str, str] | None = None) -> int:
    """The worker's index as its batch engine numbered it, 0 outside one.

    The index only names the worker in logs: slots hand out the trials, so an index beyond the
    number of workers (a larger array, a re-run task) is harmless.

    Args:
        environ: The environment to read (default ``os.environ``).

    Raises:
        SpecError: The first variable of :data:`TASK_INDEX_VARIABLES` that is set is not a
            whole number >= 0.

    Example:
        >>> task_index({"SLURM_ARRAY_TASK_ID": "3"})
        3
    """
    env = os.environ if environ is None else environ
    for name in TASK_INDEX_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        if not (value.isascii() and value.isdecimal()):
            raise SpecError(
                f"{name}: must be a whole number >= 0 (the task index, read when "
                f"--worker-index is not given), got {value!r}"
            )
        return int(value)
    return 0


class WorkerInterrupted(Exception):
    """Raised in the running trial when the worker receives SIGTERM or SIGINT."""


#: With ``graceful``, a second signal interrupts the running trial, unless it came this soon
#: after the first: Ctrl-C reaches every process of the terminal's group, and ``droptune run``
#: forwards it to its workers a moment later.
REPEAT_AFTER_S = 2.0

#: A worker stops after this many trials in a row were sampled with a finished trial's params
#: (a discrete search space with fewer configs than the study's budget).
MAX_DUPLICATES = 50

#: How often a waiting worker completes the MLflow runs of trials reaped on a dead worker's
#: behalf.
SWEEP_EVERY_S = 15.0


class _Stop:
    """What the signal handler recorded: the signal, and whether the running trial must stop."""

    def __init__(self, graceful: bool) -> None:
        self.graceful = graceful
        self.signum: int | None = None
        self.first_at = 0.0
        self.force = False

    def record(self, signum: int) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.first_at = now
        elif now - self.first_at >= REPEAT_AFTER_S:
            self.force = True
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise WorkerInterrupted if a signal asked the running trial to stop."""
        if self.signum is not None and (self.force or not self.graceful):
            raise WorkerInterrupted(f"worker interrupted by signal {self.signum}")


class _StopCallback(pl.Callback):
    """Ends the trial at the next batch boundary once a signal was received.

    Lightning wraps the SIGTERM handler during fit() with its own, which ends fit() with
    ``SIGTERMException`` (a SystemExit) — the running trial would stop even with ``graceful``.
    The worker's handler is put back when training starts (Lightning restores it afterwards).
    """

    def __init__(self, stop: _Stop, handler: Any) -> None:
        self.stop = stop
        self.handler = handler

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handler)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.stop.check()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.stop.check()


@dataclass
class WorkerReport:
    """What one worker did."""

    owner: str
    states: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    gave_up: str | None = None


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
    population: int | None = None,
) -> WorkerReport:
    """Run trials of an existing study until every slot holds a finished trial.

    Args:
        spec: The validated spec (search space, sampler, pruner, objectives).
        storage_url: Where the study lives.
        study_name: Its name.
        worker_index: The worker's number among its peers (kept for engines that number
            their tasks; sampling does not depend on it: every trial number has its own
            random stream, so no two workers sample alike).
        owner: Identity recorded on slots and trials (default host:pid:random).
        device_overrides: Config overrides that pin this worker to a device.
        deadline: ``time.time()`` after which no new trial starts.
        graceful: On SIGTERM/SIGINT finish the running trial instead of failing it.
        population: Trials per round trained as one batched network (default: the spec's
            ``execution.population``; 1 runs one trial at a time).
    """
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    report = WorkerReport(owner)
    log.info("worker %s (index %d) joins study %s", owner, worker_index, study_name)
    execution = spec.execution
    storage = open_storage(
        storage_url,
        heartbeat_interval=execution.heartbeat_interval,
        grace_period=execution.grace_period,
    )
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
    )
    slots = Slots(storage_url, study_name)
    stop = _Stop(graceful)
    _quiet_duplicates()

    closing = threading.Event()
    first_while_closing: float | None = None  # when the first signal came while closing

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal first_while_closing
        stop.record(signum)
        if closing.is_set():
            # Writing the last MLflow runs: the signals of one interruption (Ctrl-C reaches
            # the whole group, then `droptune run` forwards SIGTERM) must not cut it short; a
            # second one at least REPEAT_AFTER_S later gives up on them (`droptune sync`).
            if first_while_closing is None:
                first_while_closing = time.monotonic()
                log.warning(
                    "worker %s: signal %d while writing its last MLflow runs; another one in "
                    "%g s or later gives up on them (`droptune sync` writes them afterwards)",
                    owner,
                    signum,
                    REPEAT_AFTER_S,
                )
            elif time.monotonic() - first_while_closing >= REPEAT_AFTER_S:
                raise KeyboardInterrupt(f"signal {signum} while the worker was closing")
            return
        if graceful and not stop.force:
            log.warning("worker %s: signal %d, finishing the running trial", owner, signum)

    tracking = StudyTracking(spec, study_name, storage_url) if spec.tracking.enabled else None
    objective = Objective(
        spec,
        device_overrides,
        worker=owner,
        extra_callbacks=[_StopCallback(stop, on_signal)],
        tracking=tracking,
    )
    if tracking is not None:
        tracking.warm_up(study)
    swept_at = 0.0
    size = population or execution.population or 1
    last = ""

    def run_trial(trial: optuna.Trial) -> Any:
        try:
            return objective(trial)
        except SystemExit as exc:
            # pytorch_lightning's SIGTERMException: Lightning wraps our SIGTERM handler with its
            # own and ends fit() this way; record it as the interruption it is.
            if not stop.requested:
                raise
            reason = f"worker interrupted by signal {stop.signum}"
            trial.set_user_attr(FAIL_REASON_ATTR, f"WorkerInterrupted: {reason}")
            raise WorkerInterrupted(reason) from exc

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    consecutive_failures = 0
    duplicates = 0  # trials in a row sampled with a finished trial's params
    try:
        while not stop.requested:
            states = trial_states(study)
            slots.reclaim(states, stale_after=execution.grace_period)
            if deadline is not None and time.time() >= deadline:
                break
            claimed = slots.claim_many(owner, size)
            if not claimed:
                if slots.finished(states):
                    break
                # Other workers hold the remaining slots: reap stale trials and wait, so that a
                # slot freed by a failure is run here if its worker is gone.
                fail_stale_trials(study)
                if tracking is not None and time.monotonic() - swept_at > SWEEP_EVERY_S:
                    swept_at = time.monotonic()
                    _close_runs(tracking, study)  # runs of trials failed on a dead worker's behalf
                time.sleep(poll_interval)
                continue

            slot = claimed[0]
            if size > 1:
                try:
                    population_round(
                        study,
                        objective,
                        claimed,
                        bind=lambda s, t: slots.bind(s, owner, t.number),
                        check_stop=stop.check,
                    )
                except WorkerInterrupted:
                    report.interrupted = True
            else:

                def bind(trial: optuna.Trial, slot: int = slot) -> None:
                    slots.bind(slot, owner, trial.number)
                    stop.check()  # a signal between claim and here: fail this trial at once

                objective.on_trial_start = [bind]
                try:
                    study.optimize(run_trial, n_trials=1, catch=(Exception,))
                except WorkerInterrupted:
                    report.interrupted = True
            if stop.requested:
                report.interrupted = True
            bound = _bound_numbers(slots, claimed)
            round_states = trial_states(study)
            for held in claimed:
                number = bound.get(held)
                state = round_states.get(number, "FAIL") if number is not None else "FAIL"
                report.states[state] = report.states.get(state, 0) + 1
                if state == "FAIL":
                    slots.release(held, owner)
                    if report.interrupted:
                        continue  # the signal's doing, not the trial's
                    attrs = _user_attrs(study, number)
                    if DUPLICATE_ATTR in attrs:  # not trained: its slot is sampled anew
                        duplicates += 1
                        continue
                    consecutive_failures += 1
                    last = (
                        f"trial {number}: {attrs.get('droptune.fail_reason', '?')}"
                        if number is not None
                        else "a trial that was never asked"
                    )
                else:
                    consecutive_failures = 0
                    duplicates = 0
            if report.interrupted:
                break
            if duplicates >= MAX_DUPLICATES:
                report.gave_up = (
                    f"the sampler proposed {duplicates} configs in a row that the study had "
                    "already finished; the search space looks exhausted (widen it, or lower "
                    "n_trials)"
                )
                log.error("worker %s: %s", owner, report.gave_up)
                break
            if consecutive_failures >= execution.max_consecutive_failures:
                report.gave_up = (
                    f"{consecutive_failures} consecutive trials failed (last: {last}); "
                    "stopping this worker instead of burning the study — fix the cause and "
                    "run again to resume"
                )
                log.error("worker %s: %s", owner, report.gave_up)
                break
    except WorkerInterrupted:
        report.interrupted = True
    finally:
        # Our handler stays until the worker has closed: with the default one back, the
        # SIGTERM that follows a Ctrl-C killed the worker while its writer was still writing
        # the round's MLflow runs (runs went missing).
        closing.set()
        try:
            slots.close()
            objective.close()  # the runs the background writer still holds
            if tracking is not None:
                _close_runs(tracking, study)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stop.requested:  # a signal before the close or during it
            report.interrupted = True
    return report


def _close_runs(tracking: StudyTracking, study: optuna.Study) -> None:
    try:
        tracking.close_ended_runs(study)
    except Exception as exc:  # MLflow down: `droptune sync` does it later
        log.debug("could not close ended MLflow runs: %s", exc)


def _bound_numbers(slots: Slots, held: list[int]) -> dict[int, int]:
    """The trial number each of the ``held`` slots is bound to (never-bound slots left out),
    from one read of the slot table."""
    mine = set(held)
    return {
        r.slot: int(r.trial_number)
        for r in slots.rows()
        if r.slot in mine and r.trial_number is not None
    }


class _QuietDuplicates(logging.Filter):
    """Drops Optuna's warnings (one with a traceback, then "failed with value None") for a
    trial refused as a duplicate (no failure of the config, and a discrete space can produce
    many) or ended by an interruption (Ctrl-C, SIGTERM: ``run`` says so in one line, and the
    trial keeps its reason)."""

    #: What such a trial's exception looks like in Optuna's message.
    QUIET = ("DuplicateConfig(", "WorkerInterrupted(")

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(marker in message for marker in self.QUIET):
            self.numbers.add(message.split()[1])  # "Trial <n> failed with parameters ..."
            return False
        words = message.split()
        return not (len(words) > 1 and words[0] == "Trial" and words[1] in self.numbers)


def _quiet_duplicates() -> None:
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _QuietDuplicates) for f in handler.filters):
            handler.addFilter(_QuietDuplicates())


def _user_attrs(study: optuna.Study, number: int | None) -> dict[str, Any]:
    """A trial's user attributes by number (empty when it cannot be read: they only serve
    the worker's messages and its duplicate count)."""
    if number is None:
        return {}
    from droptune.storage import storage_of
    from droptune.storage import study_id_of

    storage = storage_of(study)
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id_of(study), number)
        return dict(storage.get_trial(trial_id).user_attrs)
    except Exception:
        return {}
