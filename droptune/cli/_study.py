"""The study commands: ``run`` (local workers), ``worker`` (one of many, on any host),
``status`` and ``studies``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated
from typing import Any

import typer

from droptune.cli._common import StorageOpt
from droptune.cli._common import StudyOpt
from droptune.cli._common import StudyPos
from droptune.cli._common import _finite
from droptune.cli._common import _num
from droptune.cli._common import _one_study
from droptune.cli._common import _quiet_lightning
from droptune.cli._common import _require_storage
from droptune.cli._common import _spec_and_url
from droptune.cli._common import _study_name
from droptune.cli._common import _study_storage
from droptune.records import SPEC_ATTR


log = logging.getLogger("droptune")


def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec YAML.")],
    n_trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1_000_000,
            help="Trials to finish (COMPLETE or PRUNED); on an existing study, raises its "
            "recorded budget.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=1, callback=_finite("--timeout"), help="Seconds after which no new trial starts."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Worker processes (0: only create the study).")
    ] = None,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    per_device: Annotated[int | None, typer.Option(min=1, help="Workers per GPU.")] = None,
    storage: StorageOpt = None,
    study_name: Annotated[
        str | None,
        typer.Option(help="Override study.name.", callback=_study_name("--study-name")),
    ] = None,
    graceful: Annotated[bool, typer.Option(help="On Ctrl-C finish running trials.")] = False,
    population: Annotated[
        int | None,
        typer.Option(min=1, help="Trials per worker round trained as one batched network."),
    ] = None,
) -> None:
    """Create or resume a study and tune it with local workers; print the best trial."""
    from droptune.study.runner import run_study

    spec, url, name = _spec_and_url(spec_path, storage, study_name)
    _quiet_lightning(load=False)  # the workers train; this process only watches
    summary = run_study(
        spec,
        spec_path,
        storage_url=url,
        study_name=name,
        n_trials=n_trials,
        timeout=timeout,
        workers=workers,
        devices=devices,
        per_device=per_device,
        graceful=graceful,
        population=population,
    )
    finished = sum(summary.counts.get(k, 0) for k in ("COMPLETE", "PRUNED"))
    trials = f"{finished} trial{'' if finished == 1 else 's'}"
    typer.echo(f"study: {summary.study_name} ({trials} in {summary.elapsed_s:.0f} s)")
    typer.echo(f"storage: {summary.storage}")
    typer.echo(
        "trials: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(summary.counts.items()))
    )
    if summary.timing is not None:
        typer.echo(summary.timing)
    if summary.baseline_value is not None:
        typer.echo(f"baseline (the spec's config, trial 0): {_num(summary.baseline_value)}")
    if summary.best_params is not None:
        which = "" if summary.best_number is None else f" (trial {summary.best_number})"
        typer.echo(f"best value: {_num(summary.best_value)} {summary.metric}{which}")
        for key, value in summary.best_params.items():
            typer.echo(f"  {key}: {value}")
    for line in summary.confirmation:
        typer.echo(line)
    if summary.best_params is not None and not summary.interrupted:
        store = "" if storage is None else " --storage URL"
        typer.echo(f"next: droptune ui {summary.study_name}")
        typer.echo(f"      droptune export {summary.study_name}{store} -o best.yaml")
        typer.echo("      droptune train best.yaml")
    if summary.interrupted:
        typer.echo("interrupted: run the same command again to resume", err=True)
        raise typer.Exit(130)
    if (
        not summary.finished
        and (workers is None or workers > 0)
        and not timeout
        and not (spec.timeout)
    ):
        typer.echo(
            "error: the study did not reach its trial count (see the worker messages "
            "above); run again to resume",
            err=True,
        )
        raise typer.Exit(1)


def worker(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec YAML.")],
    storage: StorageOpt = None,
    study_name: Annotated[
        str | None,
        typer.Option(help="Override study.name.", callback=_study_name("--study-name")),
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1_000_000,
            help="The study's budget if this worker creates it (a study that exists keeps "
            "its recorded budget).",
        ),
    ] = None,
    owner: Annotated[str | None, typer.Option(help="Worker identity (default host:pid).")] = None,
    worker_index: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="This worker's number among its peers (for logs and schedulers; sampling "
            "does not depend on it). Default: the engine's task index, JOB_COMPLETION_INDEX "
            "(Kubernetes) or SLURM_ARRAY_TASK_ID (Slurm), else 0.",
            show_default=False,
        ),
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option(
            callback=_finite("--deadline"), help="Unix time after which no new trial starts."
        ),
    ] = None,
    graceful: Annotated[bool, typer.Option(help="On SIGTERM finish the running trial.")] = False,
    population: Annotated[
        int | None,
        typer.Option(min=1, help="Trials per round trained as one batched network."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override path=value (repeatable).")
    ] = None,
) -> None:
    """Join a study (creating it if needed) and run trials until it has its trial count."""
    from droptune.config import load_yaml_value
    from droptune.study.runner import create_study
    from droptune.study.worker import run_worker
    from droptune.study.worker import task_index

    if worker_index is None:
        worker_index = task_index()
    spec, url, name = _spec_and_url(spec_path, storage, study_name)
    overrides: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected path=value, got {item!r}", param_hint="--set")
        overrides[key] = load_yaml_value(value, f"--set {key}")
    if overrides:
        spec.base.with_overrides(overrides)  # validate before joining
    _quiet_lightning()
    create_study(spec, url, name, n_trials)
    report = run_worker(
        spec,
        url,
        name,
        worker_index=worker_index,
        owner=owner,
        device_overrides=overrides,
        deadline=deadline,
        graceful=graceful,
        population=population,
    )
    log.info("worker %s: %s", report.owner, report.states)
    if report.gave_up:
        typer.echo(f"error: {report.gave_up}", err=True)
        raise typer.Exit(1)
    if report.interrupted:
        raise typer.Exit(130)


def status(
    study_arg: StudyPos = None,
    storage: StorageOpt = None,
    study_opt: StudyOpt = None,
) -> None:
    """Trials by state, best value and params, and running trials with their age (of STUDY,
    or of every study in the storage)."""
    study = _one_study(study_arg, study_opt, required=False)
    import datetime as dt

    import optuna

    from droptune.export import load_study
    from droptune.storage import open_storage
    from droptune.study.runner import counts_by_state
    from droptune.study.runner import reap_trials
    from droptune.study.runner import timing_summary
    from droptune.study.runner import with_heartbeat

    url = _study_storage(storage, study) if study else _require_storage(storage)
    names = (
        [study]
        if study
        else [
            s.study_name for s in optuna.get_all_study_summaries(open_storage(url, existing=True))
        ]
    )
    for name in names:
        opened = with_heartbeat(load_study(name, url), url)
        reaped = reap_trials(opened)
        counts = counts_by_state(opened)
        typer.echo(
            f"study {name}: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
        )
        if reaped:
            typer.echo(f"  failed {reaped} stale trial(s) whose worker stopped beating")
            _close_reaped_runs(opened, url)
        spent = timing_summary(opened)
        if spent is not None:
            typer.echo(f"  {spent}")
        try:
            best = opened.best_trial if len(opened.directions) == 1 else opened.best_trials[0]
            typer.echo(f"  best: trial {best.number} value {best.values}")
            for key, value in best.params.items():
                typer.echo(f"    {key}: {value}")
        except (ValueError, IndexError):
            typer.echo("  best: none yet")
        now = dt.datetime.now()
        for trial in opened.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            age = (now - trial.datetime_start).total_seconds() if trial.datetime_start else 0
            typer.echo(
                f"  running: trial {trial.number} for {age:.0f}s on "
                f"{trial.user_attrs.get('droptune.worker', '?')}"
            )


def _close_reaped_runs(study: Any, url: str) -> None:
    """Whoever reaps trials ends their MLflow runs FAILED (and settles the study's run), best
    effort: ``status`` reports on the study even when MLflow is down."""
    from droptune.tracking import StudyTracking

    recorded = study.user_attrs.get(SPEC_ATTR) or {}
    if not (recorded.get("tracking") or {}).get("enabled", True):
        return
    try:
        tracking = StudyTracking.for_study(study, url)
        closed = tracking.close_ended_runs(study)
        tracking.settle_parent(study)
    except Exception as exc:
        log.warning("could not end the reaped trials' MLflow runs (%s); `droptune sync` does", exc)
        return
    if closed:
        typer.echo(f"  ended the MLflow runs of trial(s) {', '.join(map(str, closed))} as FAILED")


def studies(storage: StorageOpt = None) -> None:
    """List the studies in a storage."""
    import optuna

    from droptune.storage import open_storage

    for summary in optuna.get_all_study_summaries(
        open_storage(_require_storage(storage), existing=True)
    ):
        best = summary.best_trial.values if summary.best_trial else None
        typer.echo(f"{summary.study_name}\ttrials={summary.n_trials}\tbest={best}")
