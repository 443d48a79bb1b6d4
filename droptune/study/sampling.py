"""Samplers whose random stream is a function of the trial number, not of the process.

Optuna's seeded samplers draw from one random state per sampler *instance*. A worker that is
started again (a resumed study, a restarted or requeued worker, a second worker started by hand
with the same seed) builds a new instance and replays the same sequence: its first trials repeat
the configs of the study's first trials (seen: trials 4–7 of a resumed study had exactly the
params of trials 0–3). Offsetting the seed by a worker index only moves the problem.

:class:`TrialSeededSampler` gives every trial its own sampler instance, seeded from
``(seed, trial number)``. Trial numbers are unique within a study, so no two trials share a
random stream however many processes ask, and the same spec and seed still give the same
sequence (the sampler's model of the finished trials is read from the study, as always).
QMC keeps one seed for the whole study (its sequence position is stored in the study) and
seeds only its independent sampler per trial.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from droptune.records import DUPLICATE_ATTR


__all__ = ["DUPLICATE_ATTR", "FinishedConfigs", "TrialSeededSampler", "seed_for_trial"]

#: How many trials' samplers are kept for trials that never reached ``after_trial`` (a worker
#: interrupted mid-round); older ones are dropped.
_KEEP = 4096


def seed_for_trial(seed: int, number: int) -> int:
    """The 32-bit seed of trial ``number``'s sampler (SeedSequence mixes both words, so
    neighbouring seeds and numbers give unrelated streams)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """Delegates each trial to ``factory(seed_for_trial(seed, trial.number))``.

    Args:
        factory: Builds the sampler for one trial from its seed (``None`` when ``seed`` is
            ``None``: a fresh, unseeded sampler per trial).
        seed: The study's sampler seed.
        name: What ``repr`` shows (the wrapped sampler).

    Example:
        >>> sampler = TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), 0)
    """

    def __init__(
        self, factory: Callable[[int | None], BaseSampler], seed: int | None, name: str = ""
    ) -> None:
        self._factory = factory
        self._seed = seed
        self._name = name
        self._by_trial: OrderedDict[int, BaseSampler] = OrderedDict()

    def __repr__(self) -> str:
        return f"TrialSeededSampler({self._name!r}, seed={self._seed})"

    def for_trial(self, number: int) -> BaseSampler:
        """The sampler of trial ``number`` (built on first use)."""
        sampler = self._by_trial.get(number)
        if sampler is None:
            seed = None if self._seed is None else seed_for_trial(self._seed, number)
            sampler = self._factory(seed)
            self._by_trial[number] = sampler
            while len(self._by_trial) > _KEEP:
                self._by_trial.popitem(last=False)
        return sampler

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.for_trial(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.for_trial(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.for_trial(trial.number).sample_independent(
            study, trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.for_trial(trial.number).before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        try:
            self.for_trial(trial.number).after_trial(study, trial, state, values)
        finally:
            self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing to reseed: every trial's stream is fixed by its number."""


def _key(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, repr(value)) for name, value in params.items()))


class FinishedConfigs:
    """The params of a study's finished (COMPLETE or PRUNED) trials, and of the trials asked
    since the last :meth:`refresh` (a population round's members), to refuse a trial that
    would train one of them again.

    :meth:`refresh` reads the study once: before each trial, or once per population round
    (Optuna's storage cache keeps finished trials, so a read costs the unfinished ones only).
    A trial that another worker finishes after the read can slip through: trials are seeded
    per number (:class:`TrialSeededSampler`), so that takes two samplers proposing the same
    point of a discrete space at the same moment.
    """

    def __init__(self) -> None:
        self._numbers: set[int] = set()
        self._finished: dict[tuple[tuple[str, str], ...], int] = {}
        self._asked: dict[tuple[tuple[str, str], ...], int] = {}

    def refresh(self, study: optuna.Study) -> None:
        """Read the trials finished since the last call; forget the asked ones."""
        self._asked.clear()
        for trial in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
        ):
            if trial.number not in self._numbers:
                self._numbers.add(trial.number)
                self._finished.setdefault(_key(trial.params), trial.number)

    def duplicate_of(self, number: int, params: dict[str, Any]) -> int | None:
        """The number of a finished or asked trial with exactly ``params`` (None if there is
        none, and trial ``number`` is then recorded as asked)."""
        key = _key(params)
        twin = self._finished.get(key, self._asked.get(key))
        if twin is None or twin == number:  # (a trial running with its params is itself)
            self._asked[key] = number
            return None
        return twin
