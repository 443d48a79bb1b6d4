"""Spec sections → Optuna samplers and pruners."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any
import warnings

import optuna


if TYPE_CHECKING:
    from droptune.study.spec import StudySpec

__all__ = ["make_pruner", "make_sampler"]


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The sampler named in ``spec.sampler``, seeded per trial: trial *n* samples from the
    stream ``(sampler.seed, n)`` whichever process asks it (:mod:`droptune.study.sampling`),
    so a resumed study or another worker never replays the configs of earlier trials."""
    from droptune.study.sampling import TrialSeededSampler

    cfg = spec.sampler
    if cfg.seed is None:  # every process draws its own entropy: nothing to replay
        return _sampler(spec, None)
    if cfg.name == "qmc":
        # QMC's sequence position lives in the study: one scrambling seed for all trials,
        # only the independent sampler (conditional parameters) seeded per trial.
        qmc_seed = cfg.seed
        return TrialSeededSampler(
            lambda s: _quiet(
                lambda: optuna.samplers.QMCSampler(
                    seed=qmc_seed, independent_sampler=optuna.samplers.RandomSampler(seed=s)
                )
            ),
            cfg.seed,
            "qmc",
        )
    return TrialSeededSampler(lambda s: _sampler(spec, s), cfg.seed, cfg.name)


def _quiet(build: Callable[[], optuna.samplers.BaseSampler]) -> optuna.samplers.BaseSampler:
    """``build()`` without Optuna's ExperimentalWarning (GP and QMC samplers warn on every
    construction, once per trial here); the process's warning filters are left as they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return build()


def _sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    return _quiet(lambda: _build_sampler(spec, seed))


def _build_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    cfg = spec.sampler
    startup: dict[str, Any] = (
        {} if cfg.n_startup_trials is None else {"n_startup_trials": cfg.n_startup_trials}
    )
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **startup)
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    if cfg.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    if cfg.name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if cfg.name == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    grid = {}
    for path, dist in spec.search.items():
        if dist.choices is not None:
            grid[path] = list(dist.choices)
        elif dist.type == "int":
            assert dist.low is not None and dist.high is not None
            grid[path] = list(range(int(dist.low), int(dist.high) + 1, int(dist.step or 1)))
        else:
            assert dist.low is not None and dist.high is not None and dist.step is not None
            count = round((dist.high - dist.low) / dist.step) + 1
            grid[path] = [dist.low + i * dist.step for i in range(count)]
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner named in ``spec.pruner``."""
    cfg = spec.pruner
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
    if cfg.name in ("asha", "successive_halving"):
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource,
            max_resource=spec.base.train.max_epochs,
            reduction_factor=cfg.reduction_factor,
        )
    return optuna.pruners.NopPruner()
