"""The ``droptune`` command line.

Results go to stdout, status to stderr through logging. Exit codes: 0 success, 2 bad usage or a
bad config/spec (a :class:`~droptune.exceptions.DroptuneError` before anything ran), 1 a runtime
failure.
"""

from __future__ import annotations

from datetime import datetime
import json
import logging
import math
from pathlib import Path
import sys
from typing import Annotated
from typing import Any

import typer

from droptune.exceptions import DroptuneError
from droptune.records import SPEC_ATTR


__all__ = ["app", "main"]

app = typer.Typer(
    name="droptune",
    help="Tune the regularization of PyTorch Lightning models with Optuna and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Sections of a study spec that are about tuning, not training; ``train`` ignores them.
SPEC_ONLY_SECTIONS = (
    "study",
    "search",
    "sampler",
    "pruner",
    "storage",
    "tracking",
    "n_trials",
    "timeout",
    "execution",
    "confirm",
    "code_dir",
)

log = logging.getLogger("droptune")


def _quiet_lightning(load: bool = True) -> None:
    """Lightning sets its own loggers to INFO when imported: import it first, then quiet it.
    ``load=False`` (a process that never trains, such as ``run``'s own): quiet its loggers
    without importing it (seconds of start-up)."""
    import warnings

    if load:
        import pytorch_lightning  # noqa: F401

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Under a Slurm job array each task runs one worker process by design: Lightning's Slurm
    # detection would suggest `srun` at every trial's fit.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _devices_overrides(devices: str | None) -> dict[str, Any]:
    """``auto`` | ``cpu`` | ``0,1`` → TrainSettings overrides."""
    if devices is None:
        return {}
    if devices == "auto":
        return {"train.accelerator": "auto", "train.devices": "auto"}
    if devices == "cpu":
        return {"train.accelerator": "cpu", "train.devices": 1}
    try:
        ids = [int(part) for part in devices.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"must be auto, cpu or GPU ids like 0,1; got {devices!r}", param_hint="--devices"
        ) from None
    if not ids:
        raise typer.BadParameter("no GPU ids given", param_hint="--devices")
    from droptune.study.runner import check_gpu_ids

    check_gpu_ids(ids, "--devices")
    return {"train.accelerator": "gpu", "train.devices": ids}


def _load_train_config(path: Path) -> Any:
    from droptune.config import TrainConfig
    from droptune.config import load_yaml_mapping
    from droptune.exceptions import ConfigError

    if not path.is_file():
        from droptune.config import why_not_a_file

        raise ConfigError(f"config file {str(path)!r} {why_not_a_file(path)}")
    data = load_yaml_mapping(path.read_text(), what=str(path))
    fixed = {k: v for k, v in data.items() if k not in SPEC_ONLY_SECTIONS}
    if not fixed:
        raise ConfigError(
            f"{path}: no training section; a config needs at least one of data, model, train, "
            "regularization (an exported best config or a study spec has them)"
        )
    config = TrainConfig.from_dict(fixed)
    from droptune.study.spec import code_folder
    from droptune.study.spec import import_user_code
    from droptune.study.spec import names_user_code

    if names_user_code(config):  # from the environment or the config's folder (its code_dir)
        import_user_code(config, [str(code_folder(path, data.get("code_dir")))])
    return config


def _output_dir(path: Path, option: str) -> Path:
    """Create ``path`` (a folder) or fail with a ConfigError naming ``option``."""
    from droptune.exceptions import ConfigError

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option}: {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".droptune-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{option}: cannot write to {str(path)!r}: {exc.strerror or exc}"
        ) from None
    return path


def _write_output(path: Path, text: str, option: str) -> None:
    """Write a result file or fail with a ConfigError naming ``option``."""
    from droptune.exceptions import ConfigError

    if path.is_dir():
        raise ConfigError(f"{option}: {str(path)!r} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot write {str(path)!r}: {exc.strerror or exc}") from None


@app.command()
def train(
    config: Annotated[
        Path,
        typer.Argument(
            help="A config YAML: an exported best config or a "
            "study spec (its tuning sections are ignored)."
        ),
    ],
    max_epochs: Annotated[
        int | None, typer.Option(min=1, help="Override train.max_epochs.")
    ] = None,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override train.seed.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output directory (default runs/train-<time>).")
    ] = None,
) -> None:
    """Train one model from a config file; print validation and test metrics, save the
    checkpoint and the resolved config."""
    from droptune.exceptions import ConfigError
    from droptune.study.spec import check_data_source

    cfg = _load_train_config(config)
    overrides: dict[str, Any] = _devices_overrides(devices)
    if max_epochs is not None:
        overrides["train.max_epochs"] = max_epochs
    if seed is not None:
        overrides["train.seed"] = seed
    if overrides:
        cfg = cfg.with_overrides(overrides)
    try:  # every check before anything is written
        check_data_source(cfg.data)
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}") from None
    out = _output_dir(output or Path("runs") / f"train-{datetime.now():%Y%m%d-%H%M%S}", "--output")
    from droptune.study.spec import code_folder
    from droptune.study.spec import names_user_code

    saved = cfg.to_yaml()
    if names_user_code(cfg):  # the folder the user code came from, for a re-run from here
        from droptune.config import load_yaml_mapping

        code_dir = load_yaml_mapping(config.read_text(), what=str(config)).get("code_dir")
        saved = f"code_dir: {json.dumps(str(code_folder(config, code_dir)))}\n{saved}"
    (out / "config.yaml").write_text(saved)
    _quiet_lightning()
    from droptune.training import fit

    result = fit(cfg, checkpoint=out / "model.ckpt")
    metrics = dict(sorted(result.metrics.items()))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        if key.startswith(("val_", "test_", "best_")):
            typer.echo(f"{key}: {value:.6g}")
    typer.echo(f"epochs: {result.epochs}{' (early stopped)' if result.stopped_early else ''}")
    typer.echo(f"output: {out}")


def _num(value: Any) -> str:
    """A value as the end of ``run`` prints it: a float to 6 significant digits."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _finite(option: str) -> Any:
    """A typer callback: a float option must be a finite number (click's ranges let ``inf``
    and ``nan`` through)."""

    def check(value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number of seconds, got {value}")
        return value

    return check


def _study_name(field: str) -> Any:
    """A typer callback: the study name through the one check every name passes
    (:func:`droptune.storage.check_study_name`) before it becomes part of a path."""

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        from droptune.storage import check_study_name

        return check_study_name(value, field)

    return check


#: ``STUDY``: how every command that reads a study names it (``best``, ``export``, ``status``
#: also take the older ``--study NAME``).
StudyPos = Annotated[
    str | None,
    typer.Argument(metavar="STUDY", help="Study name.", callback=_study_name("STUDY")),
]
StudyOpt = Annotated[
    str | None,
    typer.Option(
        "--study", help="Same as STUDY (the older form).", callback=_study_name("--study")
    ),
]


def _one_study(positional: str | None, option: str | None, required: bool = True) -> str | None:
    """The study named by ``STUDY`` or ``--study`` (one of them, or both the same)."""
    import click

    if positional and option and positional != option:
        raise click.UsageError(f"STUDY {positional!r} and --study {option!r} disagree; give one")
    name = positional or option
    if name is None and required:
        raise click.UsageError("Missing argument 'STUDY' (the study's name).")
    return name


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", envvar="DROPTUNE_STORAGE", help="SQLAlchemy URL of the Optuna storage."
    ),
]


def _spec_and_url(
    spec_path: Path, storage: str | None, study_name: str | None
) -> tuple[Any, str, str]:
    from droptune.storage import default_url
    from droptune.study.spec import load_spec

    spec = load_spec(spec_path)
    name = study_name or spec.study.name
    if storage is not None:
        from droptune.storage import check_url

        check_url(storage, "--storage")
    if spec.tracking.enabled:
        import os

        from droptune.tracking._client import check_tracking_database
        from droptune.tracking._client import check_tracking_uri

        env = os.environ.get("MLFLOW_TRACKING_URI")
        if spec.tracking.uri:
            check_tracking_database(spec.tracking.uri, "tracking.uri")
        elif env:  # checked before anything is created, as tracking.uri is
            check_tracking_uri(env, "MLFLOW_TRACKING_URI")
            check_tracking_database(env, "MLFLOW_TRACKING_URI")
    return spec, storage or spec.storage or default_url(name), name


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
def studies(storage: StorageOpt = None) -> None:
    """List the studies in a storage."""
    import optuna

    from droptune.storage import open_storage

    for summary in optuna.get_all_study_summaries(
        open_storage(_require_storage(storage), existing=True)
    ):
        best = summary.best_trial.values if summary.best_trial else None
        typer.echo(f"{summary.study_name}\ttrials={summary.n_trials}\tbest={best}")


def _best_config_text(storage: str | None, study: str, fmt: str) -> tuple[str, str]:
    from droptune.export import best_trial
    from droptune.export import load_study
    from droptune.export import trial_config
    from droptune.study.confirm import confirmation_of

    opened = load_study(study, _study_storage(storage, study))
    chosen = best_trial(opened)
    confirmed = confirmation_of(opened)
    if confirmed is not None and confirmed.best_trial == chosen.number:
        best = confirmed.best
        note = (
            f"trial {chosen.number}: the confirmed best ({confirmed.metric} {best.mean:.5g} "
            f"mean over {len(best.values)} seeds; `droptune confirm` chose it from the top "
            f"{len(confirmed.candidates)})"
        )
    else:
        note = f"trial {chosen.number}: the best value, not confirmed"
    cfg = trial_config(opened, chosen)
    data = cfg.to_dict()
    code_dir = (opened.user_attrs.get(SPEC_ATTR) or {}).get("code_dir")
    if code_dir:  # where the study imported the user's model or DataModule from
        data = {"code_dir": code_dir, **data}
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n", note
    return (f"code_dir: {json.dumps(code_dir)}\n" if code_dir else "") + cfg.to_yaml(), note


@app.command()
def best(
    study_arg: StudyPos = None,
    storage: StorageOpt = None,
    format_: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    study_opt: StudyOpt = None,
) -> None:
    """Print the best trial's full training config (accepted by `droptune train`)."""
    study = _one_study(study_arg, study_opt)
    assert study is not None
    text, note = _best_config_text(storage, study, _check_format(format_))
    typer.echo(note, err=True)
    typer.echo(text, nl=False)


@app.command()
def confirm(
    study: StudyArg,
    storage: StorageOpt = None,
    top_k: Annotated[int, typer.Option(help="How many of the best trials to re-train.")] = 5,
    seeds: Annotated[int, typer.Option(help="Seeds per config (2 or more for a CI).")] = 5,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Re-train the study's top configs with several seeds; the best mean becomes the
    study's confirmed best (used by best, export and load_best)."""
    from droptune.exceptions import SpecError
    from droptune.export import load_study
    from droptune.study.confirm import confirm_study

    if top_k < 1 or seeds < 1:  # before anything is opened or written
        raise SpecError(
            f"--{'top-k' if top_k < 1 else 'seeds'}: must be >= 1, got "
            f"{top_k if top_k < 1 else seeds}"
        )
    url = _study_storage(storage, study)
    opened = load_study(study, url)
    tracking = None
    recorded = opened.user_attrs.get(SPEC_ATTR) or {}
    if tracking_uri or (recorded.get("tracking") or {}).get("enabled", True):
        from droptune.tracking import StudyTracking

        if tracking_uri:
            _check_tracking_uri(tracking_uri)
        tracking = StudyTracking.for_study(opened, url, tracking_uri)
        tracking.enabled = True
    _quiet_lightning()
    result = confirm_study(
        opened, top_k, seeds, tracking=tracking, device_overrides=_devices_overrides(devices)
    )
    for line in result.lines():
        typer.echo(line)


TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (default: the study's own, e.g. runs/<study>/mlflow.db).",
    ),
]
StudyArg = Annotated[
    str, typer.Argument(metavar="STUDY", help="Study name.", callback=_study_name("STUDY"))
]


@app.command()
def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    study_arg: StudyPos = None,
    storage: StorageOpt = None,
    format_: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    study_opt: StudyOpt = None,
) -> None:
    """Write the best trial's full training config to a file."""
    study = _one_study(study_arg, study_opt)
    assert study is not None
    text, note = _best_config_text(storage, study, _check_format(format_))
    _write_output(output, text, "--output")
    typer.echo(note, err=True)
    typer.echo(f"wrote {output}")


def _study_tracking(study: str, storage: str | None, tracking_uri: str | None) -> Any:
    from droptune.export import load_study
    from droptune.tracking import StudyTracking

    url = _study_storage(storage, study)
    opened = load_study(study, url)
    if tracking_uri:
        _check_tracking_uri(tracking_uri)
    tracking = StudyTracking.for_study(opened, url, tracking_uri)
    tracking.enabled = True  # asked for explicitly, even if the spec turned tracking off
    return opened, tracking


def _check_tracking_uri(uri: str) -> None:
    """A ``--tracking-uri`` of ``sync``/``report``/``ui``: usable, and its database reachable
    (these commands only talk to MLflow; its client would retry for minutes)."""
    from droptune.tracking._client import check_tracking_database
    from droptune.tracking._client import check_tracking_uri

    check_tracking_uri(uri, "--tracking-uri")
    check_tracking_database(uri, "--tracking-uri", required=True)


def _mask(text: str) -> str:
    from droptune.storage import mask_text

    return mask_text(text)


@app.command()
def sync(
    study: StudyArg,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Back-fill MLflow from the Optuna storage: one run per ended trial, none left RUNNING."""
    from droptune.tracking._sync import sync_study

    opened, tracking = _study_tracking(study, storage, tracking_uri)
    report = _tracking_call(tracking, lambda: sync_study(opened, tracking))
    _tracking_call(tracking, lambda: tracking.settle_parent(opened))
    typer.echo(f"study {study} → MLflow {_mask(tracking.uri)}")
    typer.echo(
        f"runs created {len(report.created)}, completed {len(report.completed)}, adopted "
        f"{len(report.adopted)}, duplicates removed {len(report.duplicates_removed)}"
        + (", parent run created" if report.parent_created else "")
    )


@app.command()
def report(
    study: StudyArg,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Also write the artifacts here.")
    ] = None,
) -> None:
    """Refresh the study's plots, best config and summary on its MLflow parent run."""
    from droptune.tracking._report import write_study_artifacts

    opened, tracking = _study_tracking(study, storage, tracking_uri)
    if output is not None:
        for path in write_study_artifacts(opened, _output_dir(output, "--output")):
            typer.echo(f"wrote {path}")
    names = _tracking_call(tracking, lambda: tracking.report(opened))
    _tracking_call(tracking, lambda: tracking.close_ended_runs(opened))
    _tracking_call(tracking, lambda: tracking.settle_parent(opened))
    parent = tracking.parent_run_id(opened)
    typer.echo(f"uploaded {len(names)} artifacts to run {parent}: {', '.join(names)}")


@app.command()
def ui(
    study: StudyArg,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Default: a free one.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Host headers the UI accepts (with a non-local --host).")
    ] = None,
) -> None:
    """Start the MLflow UI on the study's tracking store and print its runs page."""
    from droptune.tracking._server import start_server

    _, tracking = _study_tracking(study, storage, tracking_uri)
    experiment = _tracking_call(tracking, tracking.tracker.experiment_id)
    page = f"#/experiments/{experiment}/runs"
    if tracking.uri.startswith(("http://", "https://")):
        typer.echo(f"{_mask(tracking.uri).rstrip('/')}/{page}")
        return
    artifacts = _local_artifacts(tracking.uri)
    if allowed_hosts:  # --allowed-hosts replaces MLflow's defaults: keep local access working
        allowed_hosts = ",".join(
            dict.fromkeys([*allowed_hosts.split(","), "localhost", "127.0.0.1"])
        )
    server = start_server(
        tracking.uri, artifacts, host=host, port=port, allowed_hosts=allowed_hosts
    )
    restore = _stop_on_signals()  # before the page is printed: a signal may follow at once
    try:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        typer.echo(f"MLflow UI for study {study}: http://{shown}:{server.port}/{page}")
        typer.echo("press Ctrl-C to stop", err=True)
        sys.stdout.flush()
        code = server.process.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        server.stop()
        restore()
    if code:
        typer.echo(f"error: the MLflow server exited with code {code}; log: {server.log_path}")
        raise typer.Exit(1)


def _stop_on_signals() -> Any:
    """SIGTERM and SIGHUP (a closed terminal, a service manager) end ``ui`` the way Ctrl-C does,
    so that its server is stopped too. Returns what restores the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _local_artifacts(uri: str) -> Path:
    """Where a local tracking store keeps its artifacts (beside an SQLite file)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return Path("mlartifacts")


def _tracking_call(tracking: Any, call: Any) -> Any:
    from droptune.exceptions import TrackingError

    try:
        return call()
    except TrackingError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrackingError(f"MLflow at {_mask(tracking.uri)} failed: {_mask(text)}") from None


def _study_storage(storage: str | None, study: str) -> str:
    """``--storage``, else the study's default local SQLite file when it exists."""
    if storage:
        return _require_storage(storage)
    from droptune.storage import default_url

    url = default_url(study)
    if Path(url.removeprefix("sqlite:///")).exists():
        return url
    from droptune.exceptions import StorageError

    raise StorageError(
        f"no such storage: no study {study!r} at {url} (the default for a study run here); "
        "give --storage URL or set DROPTUNE_STORAGE"
    )


def _check_format(value: str) -> str:
    if value not in ("yaml", "json"):
        raise typer.BadParameter(f"must be yaml or json, got {value!r}", param_hint="--format")
    return value


def _require_storage(storage: str | None) -> str:
    if not storage:
        raise typer.BadParameter(
            "give --storage URL (or set DROPTUNE_STORAGE)", param_hint="--storage"
        )
    from droptune.storage import check_url

    check_url(storage, "--storage")
    return storage


def _register_stack() -> None:
    from droptune.stack import stack_app

    app.add_typer(stack_app, name="stack")


_register_stack()


def _version(value: bool) -> None:
    if value:
        import droptune

        typer.echo(f"droptune {droptune.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Full logs, and a traceback when a command fails."),
    ] = False,
) -> None:
    from droptune.storage import MaskingFilter

    global _VERBOSE
    _VERBOSE = verbose
    import os

    # no usage reports from MLflow's client (an offline host would wait for them at exit)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not verbose:  # Optuna's INFO lines ("Using an existing study ...") only with -v
        import os

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # MLflow's ("Creating initial MLflow database tables ...") too, here and in the
        # workers, which inherit the environment; a level the user set is kept
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # URL passwords never reach a log line
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())


#: Set by ``-v/--verbose``: unexpected failures then log their traceback.
_VERBOSE = False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map DroptuneError to exit 2, Ctrl-C to 130 and other failures to exit 1."""
    try:
        # Without standalone mode, click returns the code of a `typer.Exit(code)` instead of
        # raising SystemExit: it is the command's exit code.
        code = app(args=argv, standalone_mode=False)
    except DroptuneError as exc:
        typer.echo(f"error: {_mask(str(exc))}", err=True)
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        # typer vendors click; its UsageError/BadParameter carry exit_code 2 and show().
        message = getattr(exc, "format_message", None)
        if callable(message) and isinstance(getattr(exc, "exit_code", None), int):
            # click's usage errors: one line (its usage banner and hint only with -v)
            if _VERBOSE and callable(getattr(exc, "show", None)):
                exc.show()  # type: ignore[attr-defined]
            else:
                text = " ".join(str(message()).split())
                command = getattr(getattr(exc, "ctx", None), "command_path", "droptune")
                if text:  # (no text: click showed the help, e.g. a group without a command)
                    typer.echo(f"error: {text} (see {command} --help)", err=True)
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":
            # click turns Ctrl-C (KeyboardInterrupt) into Abort.
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                typer.echo("interrupted", err=True)
                return 130
            return 1
        if _VERBOSE:
            logging.getLogger("droptune").exception("droptune failed")
        first = (str(exc).splitlines() or [""])[0][:500]
        hint = "" if _VERBOSE else " (droptune -v ... shows the traceback)"
        typer.echo(f"error: {type(exc).__name__}: {_mask(first)}{hint}", err=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
