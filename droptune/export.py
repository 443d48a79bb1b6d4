"""Best trial → training config: what ``droptune best/export`` print and users' code loads.

The exported config is the spec's fixed part with the trial's parameters laid over it and the
trial's own training seed, without any ``search`` — exactly what the trial trained, so
``droptune train best.yaml`` reproduces the trial's value on CPU.
"""

from __future__ import annotations

from typing import Any

from droptune.config import TrainConfig
from droptune.config import load_config
from droptune.exceptions import ConfigError
from droptune.exceptions import StorageError
from droptune.records import OVERRIDES_ATTR
from droptune.records import SEED_ATTR
from droptune.records import SPEC_ATTR


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


def trial_config(study: Any, trial: Any) -> TrainConfig:
    """The full TrainConfig one trial trained (spec defaults + its params + its seed)."""
    from droptune.study.spec import spec_from_dict

    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise ConfigError(
            f"study {study.study_name!r} was not created by droptune (no {SPEC_ATTR} attribute)"
        )
    base = spec_from_dict(raw, recorded=True).base
    overrides: dict[str, Any] = dict(trial.params)
    seed = trial.user_attrs.get(SEED_ATTR)
    if seed is not None:
        overrides["train.seed"] = int(seed)
    # What the trial changed itself, e.g. a halved batch size after running out of memory.
    overrides.update(trial.user_attrs.get(OVERRIDES_ATTR) or {})
    return base.with_overrides(overrides)


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
    confirmed), ready for ``build_module``/``build_trainer``. The storage defaults to
    ``$DROPTUNE_STORAGE``, else the study's local ``runs/<study>/droptune.db``.

    Example:
        >>> url = "sqlite:///runs/digits-mlp/droptune.db"
        >>> cfg = load_best("digits-mlp", url)  # doctest: +SKIP
        >>> trainer = cfg.build_trainer()  # doctest: +SKIP
    """
    if storage is None:
        import os

        from droptune.storage import default_url

        storage = os.environ.get("DROPTUNE_STORAGE") or default_url(study_name)
    study = load_study(study_name, storage)
    return trial_config(study, best_trial(study))
