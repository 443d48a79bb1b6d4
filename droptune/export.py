"""Best trial → training config: what ``droptune best/export`` print and users' code loads.

The exported config is the spec's fixed part with the trial's parameters laid over it and the
trial's own training seed, without any ``search`` — exactly what the trial trained, so
``droptune train best.yaml`` reproduces the trial's value on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from droptune.config import MLFLOW_SCHEMES
from droptune.config import TrainConfig
from droptune.config import load_config as _load_local
from droptune.exceptions import ConfigError
from droptune.exceptions import StorageError
from droptune.study.spec import trial_config


__all__ = ["best_trial", "load_best", "load_config", "load_study", "trial_config"]


def load_study(study_name: str, storage: str) -> Any:
    """Open an existing study; StorageError naming the known studies if it does not exist."""
    import optuna

    from droptune.storage import mask_url
    from droptune.storage import open_storage

    rdb = open_storage(storage, existing=True)
    try:
        return optuna.load_study(study_name=study_name, storage=rdb)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(rdb)]
        raise StorageError(
            f"no study {study_name!r} in {mask_url(storage)!r}; studies there: "
            f"{', '.join(names) or 'none'}"
        ) from None


def best_trial(study: Any) -> Any:
    """The best COMPLETE trial: the confirmed best when the study was confirmed (its top
    configs re-trained with several seeds, :mod:`droptune.study.confirm`), else the trial
    with the best value (for multi-objective studies, the first of the Pareto front)."""
    from droptune.study.confirm import confirmation_of

    confirmed = confirmation_of(study)
    if confirmed is not None:
        for trial in study.get_trials(deepcopy=False):
            if trial.number == confirmed.best_trial and trial.state.name == "COMPLETE":
                return trial
    try:
        if len(study.directions) > 1:
            front = study.best_trials
            if not front:
                raise ValueError
            return front[0]
        return study.best_trial
    except ValueError:
        raise StorageError(f"study {study.study_name!r} has no completed trial yet") from None


def load_best(study_name: str, storage: str | None = None) -> TrainConfig:
    """The best trial's full training config (the confirmed best when the study was
    confirmed), ready for ``droptune.build_module``/``build_trainer``. The storage defaults to
    ``$DROPTUNE_STORAGE``, else the study's local ``runs/<study>/droptune.db``.

    Example:
        >>> url = "sqlite:///runs/digits-mlp/droptune.db"
        >>> cfg = load_best("digits-mlp", url)  # doctest: +SKIP
        >>> trainer = droptune.build_trainer(cfg)  # doctest: +SKIP
    """
    if storage is None:
        import os

        from droptune.storage import default_url

        storage = os.environ.get("DROPTUNE_STORAGE") or default_url(study_name)
    study = load_study(study_name, storage)
    return trial_config(study, best_trial(study))


def load_config(source: str | Path | dict[str, Any]) -> TrainConfig:
    """Load a :class:`TrainConfig` from a YAML file path, a dict, or an MLflow artifact such as
    ``runs:/<run_id>/best_config.yaml`` (the study's parent run holds the best config; the
    tracking server is ``$MLFLOW_TRACKING_URI``).

    Example:
        >>> load_config({"model": {"family": "mlp", "hidden": [32]}}).model.hidden
        [32]
    """
    if isinstance(source, str) and source.startswith(MLFLOW_SCHEMES):
        return TrainConfig.from_yaml(_mlflow_artifact_text(source))
    return _load_local(source)


def _mlflow_artifact_text(uri: str) -> str:
    import tempfile

    import mlflow

    from droptune.storage import mask_text

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"config {uri!r} could not be fetched from MLflow at "
                f"{mask_text(mlflow.get_tracking_uri())!r}: {mask_text(reason)[:300]}"
            ) from None
        if local.is_dir():
            raise ConfigError(f"config {uri!r} is a folder of artifacts; name the YAML file")
        return local.read_text()
