"""What the command modules share: the options that name a study, its storage and its
tracking URI, their checks, and the output-path helpers."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated
from typing import Any

import typer


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
