"""``droptune run``: create or resume a study, start local worker processes, show progress.

Workers are real processes (``droptune worker``), each pinned to one device through
``CUDA_VISIBLE_DEVICES`` (M per GPU with ``per_device``), so a crash or SIGKILL of one never
takes the others down, and the same command joins a study from another machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
import logging
from pathlib import Path
import signal
import subprocess
import time
from typing import Any
import uuid
import warnings

import optuna

from droptune.exceptions import SpecError
from droptune.processes import SignalFlag
from droptune.records import BASELINE_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.records import METRIC_ATTR
from droptune.records import SPEC_ATTR
from droptune.records import STARTED_FROM_ATTR
from droptune.records import VERSION_ATTR
from droptune.records import WORKER_ATTR
from droptune.storage import claim_once
from droptune.storage import default_url
from droptune.storage import fail_stale_trials
from droptune.storage import mask_url
from droptune.storage import meta_get
from droptune.storage import meta_raise
from droptune.storage import open_storage
from droptune.storage import storage_of
from droptune.storage import trial_id_of
from droptune.storage import trial_states
from droptune.study.devices import check_gpu_ids
from droptune.study.devices import plan_workers
from droptune.study.factories import make_pruner
from droptune.study.factories import make_sampler
from droptune.study.launcher import WorkerLaunch
from droptune.study.launcher import start_workers
from droptune.study.progress import best_so_far as _best
from droptune.study.progress import watch
from droptune.study.slots import Slots
from droptune.study.space import baseline_gaps
from droptune.study.space import baseline_params
from droptune.study.spec import StudySpec
from droptune.tracking import StudyTracking


__all__ = [
    "RunSummary",
    "baseline_value",
    "check_gpu_ids",
    "create_study",
    "plan_workers",
    "reap_trials",
    "run_study",
    "study_budget",
    "timing_summary",
    "with_heartbeat",
]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """How a ``run`` ended."""

    study_name: str
    storage: str
    counts: dict[str, int]
    best_value: Any
    best_params: dict[str, Any] | None
    interrupted: bool
    finished: bool
    worker_codes: list[int]
    #: Where the finished trials' time went on average (:func:`droptune.timing.summary_line`).
    timing: str | None = None
    #: The baseline trial's value (the spec's fixed config), when it completed.
    baseline_value: Any = None
    #: What the spec's ``confirm`` stage found, one line per candidate (empty without one).
    confirmation: list[str] = field(default_factory=list)
    #: The best trial's number, the objective's name(s), and the run's wall-clock seconds.
    best_number: int | None = None
    metric: str = "objective"
    elapsed_s: float = 0.0


#: Samplers whose search space comes from the finished trials rather than from each suggest.
RELATIVE_SAMPLERS = ("cmaes", "gp", "qmc", "nsgaii")
#: ``droptune_meta`` key of the study's trial budget (finished trials it ends with).
BUDGET_KEY = "n_trials"


def create_study(
    spec: StudySpec,
    storage_url: str,
    study_name: str,
    n_trials: int | None = None,
    *,
    explicit: bool = False,
) -> optuna.Study:
    """Create the study (or load it to resume), record the spec and the trial budget on it,
    and size its slots.

    The budget is recorded once, by whichever process creates the study (the spec's
    ``n_trials``, or ``n_trials``), together with the baseline trial (the spec's fixed config,
    enqueued first unless ``study.baseline`` is false). Every process that joins later
    honours it: ``n_trials`` then only changes it when ``explicit`` (``run --n-trials``), and
    only upwards; a disagreeing spec is reported and the recorded budget kept.

    Raises:
        SpecError: The study exists with other directions, or ``explicit`` asks for fewer
            trials than its budget.
    """
    import droptune

    # configs to start from, read before the study's storage is created (a source study that
    # cannot be read leaves nothing behind), and only by the process that creates the study
    starts = start_configs(spec) if not _study_exists(storage_url, study_name) else []
    # With the spec's heartbeat settings, so that reap_trials() can fail (and retry) trials
    # whose worker died, as the workers do.
    storage = open_storage(
        storage_url,
        heartbeat_interval=spec.execution.heartbeat_interval,
        grace_period=spec.execution.grace_period,
    )
    directions = spec.study.study_directions
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        directions=directions,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise SpecError(
            f"study.direction: study {study_name!r} already exists with directions "
            f"{[d.name.lower() for d in study.directions]}, the spec asks for "
            f"{directions}; use another study.name"
        )
    if SPEC_ATTR not in study.user_attrs:
        recorded = spec.to_dict()
        # keys newer than the first release, at their defaults, are left out: an earlier
        # droptune reading the study refuses keys it does not know. A spec that names user
        # code records its code_dir (absolute): `confirm`, `export` and `train` import from it.
        for key in ("confirm", "code_dir", "start_from"):
            if recorded.get(key) is None:
                recorded.pop(key, None)
        if recorded["study"].get("baseline") is True:
            recorded["study"].pop("baseline")
        for key in ("storage",):
            if recorded.get(key):
                recorded[key] = mask_url(recorded[key])
        source = (recorded.get("start_from") or {}).get("study") or {}
        if source.get("storage"):
            source["storage"] = mask_url(source["storage"])
        if (recorded.get("tracking") or {}).get("uri"):
            recorded["tracking"]["uri"] = mask_url(recorded["tracking"]["uri"])
        study.set_user_attr(SPEC_ATTR, recorded)
        study.set_user_attr(METRIC_ATTR, ",".join(spec.study.objectives))
        with warnings.catch_warnings():  # "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.study.objectives))
        study.set_user_attr(VERSION_ATTR, droptune.__version__)
    asked = n_trials or spec.n_trials
    slots = Slots(storage_url, study_name)
    try:
        budget = int(
            claim_once(
                storage_url,
                study_name,
                BUDGET_KEY,
                lambda: _first_budget(study, spec, slots, asked, starts),
            )
        )
        if explicit and asked != budget:
            if asked < budget:
                raise SpecError(
                    f"--n-trials: study {study_name!r} has a budget of {budget} trials; it can "
                    f"grow, not shrink (got {asked})"
                )
            log.info("study %s: budget raised from %d to %d trials", study_name, budget, asked)
            budget = meta_raise(storage_url, study_name, BUDGET_KEY, asked)
        elif asked != budget:
            log.warning(
                "study %s has a budget of %d trials (recorded when it was created or raised "
                "with `droptune run --n-trials`); this %s asks for %d: using %d",
                study_name,
                budget,
                "option" if n_trials else "spec's n_trials",
                asked,
                budget,
            )
        slots.ensure(budget)
    finally:
        slots.close()
    return study


def _first_budget(
    study: optuna.Study,
    spec: StudySpec,
    slots: Slots,
    n_trials: int,
    starts: Sequence[tuple[dict[str, Any], str]] = (),
) -> int:
    """Run once per study, by the process that records its budget: enqueue the baseline
    trial, then the configs to start from (``starts``), in a study that has no trial yet. A
    study made by an earlier droptune keeps the budget its slots say."""
    existing = slots.total()
    if existing:
        return existing
    if study.get_trials(deepcopy=False):
        return n_trials
    baseline = _enqueue_baseline(study, spec)
    seen = [] if baseline is None else [baseline]
    room = n_trials - len(seen)
    for params, origin in starts:
        if params in seen:  # the baseline's config, or one given twice: one trial is enough
            continue
        if room <= 0:
            log.warning(
                "start_from: the budget of %d trials is used up; %s and the configs after it "
                "are not enqueued",
                n_trials,
                origin,
            )
            break
        study.enqueue_trial(params, user_attrs={STARTED_FROM_ATTR: origin})
        seen.append(params)
        room -= 1
    return n_trials


def _study_exists(url: str, name: str) -> bool:
    """Whether the storage of ``url`` holds the study ``name`` (nothing is created)."""
    from droptune.exceptions import StorageError
    from droptune.exceptions import StorageUnreachable

    try:
        existing = open_storage(url, existing=True)
    except StorageUnreachable:
        raise
    except StorageError:  # no such storage yet
        return False
    return name in optuna.study.get_all_study_names(existing)


def start_configs(spec: StudySpec) -> list[tuple[dict[str, Any], str]]:
    """``spec.start_from`` as ``(params, origin)``: the explicit configs, then the top trials
    of the source study (best first), each restricted to what this study's search space can
    take (the rest is left to the sampler, with a warning).

    Raises:
        StorageError: The source study or its storage does not exist.
    """
    start = spec.start_from
    if start is None:
        return []
    configs = [(dict(params), f"start_from.params[{i}]") for i, params in enumerate(start.params)]
    if start.study is None:
        return configs
    from droptune.exceptions import StorageError
    from droptune.export import load_study

    source = start.study
    try:
        other = load_study(source.name, source.storage or default_url(source.name))
    except StorageError as exc:  # the unreachable kind (exit 1) stays what it is
        raise type(exc)(f"start_from.study: {exc}") from None
    if len(other.directions) != 1:
        raise SpecError(
            f"start_from.study: study {source.name!r} has {len(other.directions)} objectives; "
            "its top trials rank by one"
        )
    complete = other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    maximize = other.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: float(t.value or 0.0), reverse=maximize)
    for trial in ranked[: source.top_k]:
        taken = {p: v for p, v in trial.params.items() if p in spec.search}
        taken = {p: v for p, v in taken.items() if spec.search[p].contains(v)}
        left = sorted(set(trial.params) - set(taken))
        if left:
            log.warning(
                "start_from.study: trial %d of %s: %s not in this study's search space; left "
                "to the sampler",
                trial.number,
                source.name,
                ", ".join(left),
            )
        if taken:
            configs.append((taken, f"study {source.name} trial {trial.number}"))
    if len(ranked) < source.top_k:
        log.warning(
            "start_from.study: study %s has %d COMPLETE trials, fewer than top_k %d",
            source.name,
            len(ranked),
            source.top_k,
        )
    return configs


def _enqueue_baseline(study: optuna.Study, spec: StudySpec) -> dict[str, Any] | None:
    """Enqueue the baseline trial (the spec's own config); its params, or None."""
    if spec.study.baseline:
        base = spec.base
        missing = baseline_gaps(spec, base)
        if missing and spec.sampler.name in RELATIVE_SAMPLERS:
            # These samplers take their search space from the finished trials (CMA-ES, GP and
            # NSGA-II: the parameters all of them share; QMC: the first one's), so a baseline
            # without these parameters would leave them out of the search for good.
            log.warning(
                "study.baseline: no baseline trial: the spec's values of %s are outside the "
                "search space, and sampler %s builds its search space from the finished "
                "trials; make them searchable (e.g. a choice) or set study.baseline: false",
                ", ".join(missing),
                spec.sampler.name,
            )
        else:
            params = baseline_params(spec, base)
            study.enqueue_trial(params, user_attrs={BASELINE_ATTR: True})
            return params
    return None


def study_budget(storage_url: str, study_name: str) -> int | None:
    """The trial budget recorded with the study (None for a study droptune did not create)."""
    value = meta_get(storage_url, study_name, BUDGET_KEY)
    return None if value is None else int(value)


def counts_by_state(study: optuna.Study) -> dict[str, int]:
    return dict(Counter(trial_states(study).values()))


def reap_trials(
    study: optuna.Study, owner_prefix: str | None = None, reason: str = "interrupted"
) -> int:
    """Mark RUNNING trials FAIL: those of workers whose owner starts with ``owner_prefix``
    (all of them gone), then any whose heartbeat is stale. Returns how many were failed."""
    from optuna.trial import TrialState

    failed = 0
    storage = storage_of(study)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if owner_prefix is not None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if str(trial.user_attrs.get(WORKER_ATTR, "")).startswith(owner_prefix):
                storage.set_trial_user_attr(trial_id_of(trial), FAIL_REASON_ATTR, reason)
                if storage.set_trial_state_values(trial_id_of(trial), TrialState.FAIL):
                    failed += 1
    try:
        fail_stale_trials(study)  # returns None: count what it failed
    except Exception as exc:  # storages without heartbeat support
        log.debug("fail_stale_trials: %s", exc)
        return failed
    now_failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return max(failed, len(running & now_failed))


def with_heartbeat(study: optuna.Study, url: str) -> optuna.Study:
    """``study`` through a storage with the heartbeat settings of its spec, so that trials whose
    worker died can be failed (and retried) from here; ``study`` itself when it has none."""
    execution = (study.user_attrs.get(SPEC_ATTR) or {}).get("execution") or {}
    interval = execution.get("heartbeat_interval")
    if not interval:
        return study
    storage = open_storage(
        url,
        heartbeat_interval=int(interval),
        grace_period=int(execution.get("grace_period") or 2 * int(interval)),
    )
    return optuna.load_study(study_name=study.study_name, storage=storage)


def _best_number(study: optuna.Study) -> int | None:
    try:
        return None if len(study.directions) > 1 else study.best_trial.number
    except ValueError:
        return None


def run_study(
    spec: StudySpec,
    spec_path: Path,
    *,
    storage_url: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int | None = None,
    devices: str | None = None,
    per_device: int | None = None,
    graceful: bool = False,
    progress: bool = True,
    population: int | None = None,
) -> RunSummary:
    """Create or resume the study and run it with local worker processes until it has
    ``n_trials`` COMPLETE or PRUNED trials (or the timeout passes, or Ctrl-C)."""
    started = time.monotonic()
    name = study_name or spec.study.name
    url = storage_url or spec.storage or default_url(name)
    execution = spec.execution
    # Options first (a bad --devices must not leave a study behind), then the study.
    plan = plan_workers(
        devices or execution.devices,
        workers if workers is not None else execution.workers,
        per_device or execution.per_device,
    )
    study = create_study(spec, url, name, n_trials, explicit=n_trials is not None)
    total = study_budget(url, name) or n_trials or spec.n_trials
    reap_trials(study)
    deadline_s = timeout or spec.timeout
    deadline = time.time() + deadline_s if deadline_s else None
    if spec.base.train.num_threads is not None:
        # The spec's own thread count: what the exported best config will train with too.
        for entry in plan:
            entry["overrides"].pop("train.num_threads", None)
    tracking = StudyTracking(spec, name, url) if spec.tracking.enabled and plan else None
    if tracking is not None:
        tracking.study_started(study)
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    interrupted = False
    received = SignalFlag()
    # Trapped until every worker is stopped: a second Ctrl-C or a SIGTERM while they stop must
    # not end `run` and leave them running.
    with received.trapped():
        try:
            size = population or execution.population
            if size and size > 1:
                _announce_population(spec, size)
            launch = WorkerLaunch(
                str(spec_path), name, url, total, prefix, deadline, graceful, size
            )
            start_workers(launch, plan, procs)
            watch(study, procs, total, progress, received)
            received.check()  # a signal that arrived as the last worker exited
        except KeyboardInterrupt:
            interrupted = True
            log.info("interrupted: stopping %d workers", len(procs))  # `run` ends saying so
            # Workers fail their running trial on SIGTERM; with graceful they get SIGINT,
            # which they take as "finish the running trial" (also when a terminal's Ctrl-C
            # reached them a moment ago).
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT if graceful else signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=120 if graceful else 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    codes = [proc.wait() for proc in procs]
    reap_trials(
        study,
        owner_prefix=prefix,
        reason="droptune run was interrupted" if interrupted else "worker exited",
    )
    counts = counts_by_state(study)
    slots = Slots(url, name)
    try:
        states = trial_states(study)
        finished = slots.finished(states)
    finally:
        slots.close()
    confirmation: list[str] = []
    try:
        if spec.confirm is not None and finished and not interrupted and plan:
            confirmation = _confirm(study, spec, tracking, plan[0]["overrides"])
    finally:  # the study's MLflow run is closed however the confirmation ends
        if tracking is not None:
            tracking.study_ended(study, finished)
    best_value, best_params = _best(study)
    return RunSummary(
        name,
        mask_url(url),
        counts,
        best_value,
        best_params,
        interrupted,
        finished,
        codes,
        timing_summary(study),
        baseline_value(study),
        confirmation,
        best_number=_best_number(study),
        metric=",".join(spec.study.objectives),
        elapsed_s=time.monotonic() - started,
    )


def _confirm(
    study: optuna.Study,
    spec: StudySpec,
    tracking: StudyTracking | None,
    overrides: dict[str, Any],
) -> list[str]:
    """The spec's confirmation stage, unless the study was confirmed with the trials it has."""
    from optuna.trial import TrialState

    from droptune.study.confirm import confirm_study
    from droptune.study.confirm import confirmation_of

    assert spec.confirm is not None
    done = confirmation_of(study)
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done is not None and done.complete == complete:
        return done.lines()
    return confirm_study(
        study,
        spec.confirm.top_k,
        spec.confirm.seeds,
        tracking=tracking,
        device_overrides=overrides,
    ).lines()


def baseline_value(study: optuna.Study) -> Any:
    """The value of the study's baseline trial (the spec's fixed config), if it completed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get(BASELINE_ATTR):
            return trial.value if len(study.directions) == 1 else trial.values
    return None


def timing_summary(study: optuna.Study) -> str | None:
    """The mean time per finished trial by category (None before any trial recorded one)."""
    from optuna.trial import TrialState

    from droptune.timing import summary_line

    ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return summary_line(t.user_attrs for t in ended)


def _announce_population(spec: StudySpec, size: int) -> None:
    """Say up front whether the study's trials can train as populations, and if not, why."""
    from droptune.population import population_support

    reason = population_support([spec.base, spec.base])
    if reason is None:
        log.info("population mode: each worker trains up to %d trials as one network", size)
    else:
        log.warning("population mode is not available (%s): trials run one at a time", reason)
