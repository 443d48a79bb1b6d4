"""``droptune.run_study(spec)``: a study from Python (a script, a notebook), as ``droptune run``
runs it from the command line."""

from __future__ import annotations

from collections.abc import Mapping
import os
from pathlib import Path
from typing import Any

import optuna

from droptune.exceptions import DroptuneError
from droptune.exceptions import SpecError


__all__ = ["run_study"]


def run_study(
    spec: str | Path | Mapping[str, Any] | Any,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
    population: int | None = None,
    timeout: float | None = None,
    progress: bool = False,
) -> optuna.trial.FrozenTrial | list[optuna.trial.FrozenTrial]:
    """Create or resume the study of ``spec`` and tune it with local worker processes until it
    has its trials; the best trial (a multi-objective study: its Pareto front).

    Args:
        spec: A spec file's path, the spec as a mapping (what the YAML holds), or a
            :class:`~droptune.study.spec.StudySpec`. A mapping or object is written to
            ``runs/<study>/spec.yaml`` for the workers; its user code (``model.target``,
            ``data.datamodule``) is imported from the installed environment or its
            ``code_dir``, which defaults to the working directory here.
        storage, study_name, n_trials, workers, population, timeout: As the options of
            ``droptune run`` (the spec's values by default).
        progress: Show the progress bar and one line per finished trial (on stderr).

    Raises:
        SpecError: The spec (or an option) is invalid; nothing is created.
        DroptuneError: The study did not reach its trial count (the workers failed).
        KeyboardInterrupt: Interrupted (running trials are marked FAIL; call it again to
            resume).

    Example:
        >>> best = droptune.run_study("studies/digits-mlp.yaml", n_trials=4)  # doctest: +SKIP
        >>> best.params  # doctest: +SKIP
    """
    from droptune.storage import check_url
    from droptune.storage import default_url
    from droptune.study import runner
    from droptune.study.spec import StudySpec
    from droptune.study.spec import load_spec
    from droptune.study.spec import spec_from_dict

    if isinstance(spec, str | Path):
        path = Path(spec)
    elif isinstance(spec, StudySpec | Mapping):
        data = spec.to_dict() if isinstance(spec, StudySpec) else dict(spec)
        checked = spec_from_dict(data, "spec")  # every error before anything is written
        if data.get("code_dir") is None:
            data = {**data, "code_dir": os.getcwd()}  # a notebook's own modules
        path = Path("runs") / (study_name or checked.study.name) / "spec.yaml"
        import yaml

        text = yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    else:
        raise SpecError(
            f"spec: give a spec file's path, a mapping or a StudySpec, got {type(spec).__name__}"
        )
    loaded = load_spec(path)
    if storage is not None:
        check_url(storage, "storage")
    name = study_name or loaded.study.name
    url = storage or loaded.storage or default_url(name)
    summary = runner.run_study(
        loaded,
        path,
        storage_url=url,
        study_name=name,
        n_trials=n_trials,
        timeout=timeout,
        workers=workers,
        population=population,
        progress=progress,
    )
    if summary.interrupted:
        raise KeyboardInterrupt("the study was interrupted; call run_study again to resume")
    if not summary.finished and not (timeout or loaded.timeout):
        raise DroptuneError(
            f"study {name!r} did not reach its trial count (trials: {summary.counts}); "
            "its workers failed: see the trials' droptune.fail_reason"
        )
    study = optuna.load_study(study_name=name, storage=url)
    return study.best_trials if len(study.directions) > 1 else study.best_trial
