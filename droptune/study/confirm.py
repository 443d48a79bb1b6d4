"""Confirmation: re-train a study's top configs with several seeds and choose by the mean.

A trial's value is one seed's validation score; on small data the top of a study is partly that
seed's luck. :func:`confirm_study` takes the ``top_k`` COMPLETE trials, trains each of their
configs with the same ``seeds`` new seeds (shared by all candidates, so their differences are
paired), and picks the candidate with the best mean objective over seeds, with a 95% Student-t
interval. Candidates whose configs can train together train as populations (one batched
network per dropout kind); the rest one run at a time.

The result is kept on the study (user attribute :data:`CONFIRMATION_ATTR`), and with tracking
each re-training is an MLflow run under the study's run, tagged with its origin trial.
``droptune best``/``export``, :func:`droptune.load_best` and the study report use the confirmed
best when there is one.
"""

from __future__ import annotations

from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
import logging
import math
import statistics
from typing import TYPE_CHECKING
from typing import Any

from droptune.exceptions import SpecError
from droptune.records import CONFIRMATION_ATTR
from droptune.records import CONFIRMATION_OF_TAG
from droptune.records import CONFIRMED_BEST_TAG
from droptune.records import ROLE_TAG
from droptune.records import SEED_ATTR
from droptune.records import SPEC_ATTR


if TYPE_CHECKING:
    import optuna

    from droptune.config import TrainConfig
    from droptune.tracking import StudyTracking

__all__ = ["CONFIRMATION_ATTR", "Candidate", "Confirmation", "confirm_study", "confirmation_of"]

log = logging.getLogger(__name__)

#: Study user attribute holding the last confirmation (:meth:`Confirmation.to_dict`).
#: The most re-trainings trained as one population (memory grows with it).
MAX_POPULATION = 64
#: Confirmation seeds are trial seeds of numbers no trial can have (studies stop at 1e6 trials).
_SEED_BASE = 1_000_000


@dataclass
class Candidate:
    """One confirmed config: its origin trial, its value there, and the re-trainings."""

    trial: int
    trial_value: float
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def ci95(self) -> float:
        """Half-width of the 95% Student-t interval of the mean (NaN with one seed)."""
        if len(self.values) < 2:
            return math.nan
        from scipy.stats import t

        sem = statistics.stdev(self.values) / math.sqrt(len(self.values))
        return float(t.ppf(0.975, len(self.values) - 1) * sem)


@dataclass
class Confirmation:
    """What :func:`confirm_study` found."""

    metric: str
    direction: str
    seeds: list[int]
    candidates: list[Candidate]
    best_trial: int
    note: str = ""
    #: COMPLETE trials the study had when it was confirmed (a later ``run`` re-confirms only
    #: when there are more).
    complete: int = 0
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def best(self) -> Candidate:
        return next(c for c in self.candidates if c.trial == self.best_trial)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for raw, candidate in zip(out["candidates"], self.candidates, strict=True):
            raw["mean"] = candidate.mean
            raw["ci95"] = None if math.isnan(candidate.ci95) else candidate.ci95
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Confirmation:
        candidates = [
            Candidate(c["trial"], c["trial_value"], list(c["values"]), list(c.get("run_ids", [])))
            for c in raw["candidates"]
        ]
        return cls(
            raw["metric"],
            raw["direction"],
            list(raw["seeds"]),
            candidates,
            int(raw["best_trial"]),
            raw.get("note", ""),
            int(raw.get("complete", 0)),
            raw.get("at", ""),
        )

    def lines(self) -> list[str]:
        """One line per candidate, the confirmed best marked."""
        out = [
            f"confirmation: top {len(self.candidates)} trials x {len(self.seeds)} seeds, "
            f"{self.metric} ({self.direction}), mean ± 95% CI"
        ]
        for c in self.candidates:
            ci = "" if math.isnan(c.ci95) else f" ± {c.ci95:.4g}"
            mark = "  <- confirmed best" if c.trial == self.best_trial else ""
            out.append(
                f"  trial {c.trial}: {c.mean:.5g}{ci} (trial value {c.trial_value:.5g}){mark}"
            )
        if self.note:
            out.append(f"  note: {self.note}")
        return out


def confirmation_of(study: optuna.Study) -> Confirmation | None:
    """The confirmation recorded on ``study``, if any."""
    raw = study.user_attrs.get(CONFIRMATION_ATTR)
    return Confirmation.from_dict(raw) if isinstance(raw, dict) else None


def confirm_study(
    study: optuna.Study,
    top_k: int,
    seeds: int,
    *,
    tracking: StudyTracking | None = None,
    device_overrides: dict[str, Any] | None = None,
) -> Confirmation:
    """Re-train the ``top_k`` best COMPLETE trials of ``study`` with ``seeds`` seeds each and
    record which config is best by its mean over seeds.

    Args:
        study: A single-objective droptune study.
        top_k: How many of the best trials to confirm (fewer if fewer have completed: said in
            the result's ``note`` and logged).
        seeds: Re-trainings per config (>= 1; a 95% interval needs 2 or more).
        tracking: Where to log one MLflow run per re-training (under the study's run).
        device_overrides: Config overrides for the re-trainings (e.g. ``train.accelerator``).

    Raises:
        SpecError: ``top_k`` or ``seeds`` < 1, a multi-objective study, or no COMPLETE trial.

    Example:
        >>> result = confirm_study(study, top_k=3, seeds=5)  # doctest: +SKIP
        >>> result.best_trial, result.best.mean, result.best.ci95  # doctest: +SKIP
    """
    from optuna.trial import TrialState

    from droptune.study.objective import trial_seed
    from droptune.study.spec import spec_from_dict
    from droptune.study.spec import trial_config

    if top_k < 1:
        raise SpecError(f"--top-k: must be >= 1, got {top_k}")
    if seeds < 1:
        raise SpecError(f"--seeds: must be >= 1, got {seeds}")
    if len(study.directions) != 1:
        raise SpecError(
            f"study {study.study_name!r} has {len(study.directions)} objectives; confirmation "
            "ranks configs by one objective"
        )
    spec = spec_from_dict(study.user_attrs[SPEC_ATTR], source=study.study_name, recorded=True)
    from droptune.study.spec import _check_user_code

    _check_user_code(spec)  # from the installed environment or the spec's recorded code_dir
    metric = spec.study.objectives[0]
    direction = study.directions[0].name.lower()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE trial to confirm")
    ranked = sorted(complete, key=lambda t: float(t.value or 0.0), reverse=direction == "maximize")
    chosen = ranked[:top_k]
    note = ""
    if len(chosen) < top_k:
        note = f"only {len(chosen)} COMPLETE trials; confirmed those instead of {top_k}"
        log.warning("study %s: %s", study.study_name, note)
    seed_list = [trial_seed(spec.study.seed, _SEED_BASE + i) for i in range(seeds)]
    candidates = [Candidate(t.number, float(t.value or 0.0)) for t in chosen]
    jobs: list[tuple[Candidate, int, TrainConfig]] = []
    for trial, candidate in zip(chosen, candidates, strict=True):
        config = trial_config(study, trial).with_overrides(device_overrides or {})
        for seed in seed_list:
            jobs.append((candidate, seed, config.with_overrides({"train.seed": seed})))
    histories = _train([cfg for _, _, cfg in jobs])
    parent = None
    for (candidate, seed, cfg), rows in zip(jobs, histories, strict=True):
        candidate.values.append(_objective(metric, direction, rows))
        if tracking is not None and tracking.enabled:
            parent = parent or tracking.parent_run_id(study)
            run_id = _log_run(tracking, parent, candidate, seed, cfg, rows, metric)
            if run_id:
                candidate.run_ids.append(run_id)
    best = pick_best(candidates, direction)
    diverged = [c.trial for c in candidates if not math.isfinite(c.mean)]
    if diverged:
        said = f"re-trainings of trial(s) {', '.join(map(str, diverged))} diverged; ranked last"
        note = f"{note}; {said}" if note else said
        log.warning("study %s: %s", study.study_name, said)
    result = Confirmation(
        metric, direction, seed_list, candidates, best.trial, note, len(complete)
    )
    study.set_user_attr(CONFIRMATION_ATTR, result.to_dict())
    if tracking is not None and tracking.enabled and parent is not None:
        _log_best(tracking, parent, result)
    return result


def pick_best(candidates: list[Candidate], direction: str) -> Candidate:
    """The candidate with the best mean; one with a diverged re-training (a non-finite mean)
    ranks last, whatever the direction (min/max would keep a NaN they meet first)."""
    worst = math.inf if direction == "minimize" else -math.inf
    pick = min if direction == "minimize" else max
    return pick(candidates, key=lambda c: c.mean if math.isfinite(c.mean) else worst)


def _objective(metric: str, direction: str, rows: list[dict[str, float]]) -> float:
    """The value a trial of this config would have had: the best ``metric`` over epochs (NaN
    when it diverged or was never logged)."""
    values = [row[metric] for row in rows if metric in row]
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan
    return min(values) if direction == "minimize" else max(values)


def _train(configs: list[TrainConfig]) -> list[list[dict[str, float]]]:
    """Each config's per-epoch history: configs that can train together as populations (one
    per dropout kind), the others one at a time."""
    from droptune.population import population_support

    histories: list[list[dict[str, float]] | None] = [None] * len(configs)
    by_kind: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        by_kind.setdefault(config.regularization.dropout.kind, []).append(index)
    chunks = [
        indices[start : start + MAX_POPULATION]
        for indices in by_kind.values()
        for start in range(0, len(indices), MAX_POPULATION)
    ]
    for indices in chunks:
        group = [configs[i] for i in indices]
        prepared = None
        if len(group) > 1 and population_support(group) is None:
            from droptune.exceptions import PopulationUnsupported
            from droptune.population import prepare_population
            from droptune.population import train_population

            try:  # a user's model may still not batch: then one at a time
                prepared = prepare_population(group)
            except PopulationUnsupported as exc:
                log.warning("confirmation: %s; re-training one at a time", exc)
            except Exception as exc:  # never a failed confirmation because of batching
                log.warning(
                    "confirmation: the population could not be built (%s: %s); re-training "
                    "one at a time",
                    type(exc).__name__,
                    exc,
                )
        if prepared is not None:
            log.info("confirmation: %d re-trainings as one population", len(group))
            for i, member in zip(indices, train_population(group, prepared=prepared), strict=True):
                histories[i] = [dict(row) for row in member.history]
        else:
            for i in indices:
                histories[i] = _fit(configs[i])
    return [h or [] for h in histories]


def _fit(config: TrainConfig) -> list[dict[str, float]]:
    from droptune.study.objective import _History
    from droptune.training import fit

    history = _History()
    fit(config, test=False, callbacks=[history])
    return history.rows


def _log_run(
    tracking: StudyTracking,
    parent: str,
    candidate: Candidate,
    seed: int,
    config: TrainConfig,
    rows: list[dict[str, float]],
    metric: str,
) -> str | None:
    """One MLflow run per re-training, under the study's run, tagged with its origin trial."""
    try:
        tracker = tracking.tracker
        run_id = tracker.start_child_run(
            parent,
            f"confirm-trial-{candidate.trial}-seed-{seed}",
            {
                ROLE_TAG: "confirmation",
                CONFIRMATION_OF_TAG: str(candidate.trial),
                SEED_ATTR: str(seed),
            },
        )
        value = candidate.values[-1]
        tracker.finish_trial_run(
            run_id,
            state="COMPLETE",
            params={"train.seed": seed},
            history=[*rows, {"objective": value}] if math.isfinite(value) else rows,
            tags={},
        )
        return run_id
    except Exception as exc:  # MLflow down: the result is on the study all the same
        log.warning("confirmation: could not log the MLflow run: %s", exc)
        return None


def _log_best(tracking: StudyTracking, parent: str, result: Confirmation) -> None:
    try:
        client = tracking.tracker.client
        best = result.best
        client.set_tag(parent, CONFIRMED_BEST_TAG, str(best.trial))
        client.log_metric(parent, "confirmed_best_mean", best.mean)
        if not math.isnan(best.ci95):
            client.log_metric(parent, "confirmed_best_ci95", best.ci95)
    except Exception as exc:
        log.warning("confirmation: could not tag the study run: %s", exc)
