"""One Optuna trial: suggest → config → fit with pruning → value(s), recorded on the trial."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING
from typing import Any

import optuna
import pytorch_lightning as pl
import torch

from droptune import timing
from droptune.records import BASELINE_ATTR
from droptune.records import DEVICE_ATTR
from droptune.records import DUPLICATE_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.records import HOST_ATTR
from droptune.records import OOM_ATTR
from droptune.records import OVERRIDES_ATTR
from droptune.records import PRUNED_AT_EPOCH_ATTR
from droptune.records import RSS_ATTR
from droptune.records import RUN_ID_ATTR
from droptune.records import SEED_ATTR
from droptune.records import WORKER_ATTR
from droptune.records import failure_attrs
from droptune.storage import is_enqueued
from droptune.storage import set_user_attrs
from droptune.study.outcome import GAP_METRIC
from droptune.study.outcome import Fitted
from droptune.study.outcome import TrialFailed
from droptune.study.outcome import result_attrs
from droptune.study.outcome import trial_outcome
from droptune.study.sampling import FinishedConfigs
from droptune.study.space import suggest


if TYPE_CHECKING:
    from droptune.config import TrainConfig
    from droptune.study.spec import StudySpec
    from droptune.tracking import StudyTracking
    from droptune.tracking._writer import TrackingWriter

__all__ = [
    "GAP_METRIC",
    "DuplicateConfig",
    "Objective",
    "PruningCallback",
    "TrialFailed",
    "result_attrs",
    "trial_seed",
]

log = logging.getLogger(__name__)

#: Derived objective: final ``val_loss - train_loss`` (how much the model overfits).


class DuplicateConfig(TrialFailed):
    """The trial was sampled with the params of a finished trial: it fails before training, and
    its slot runs again with a newly sampled trial."""

    def __init__(self, number: int, duplicate_of: int) -> None:
        super().__init__(
            f"trial {number} was sampled with the params of finished trial {duplicate_of}; "
            "not trained again (its slot is sampled anew)"
        )
        self.duplicate_of = duplicate_of


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The training seed of a trial, derived from the study seed and the trial number."""
    return (study_seed * 1_000_003 + trial_number * 7_919) % (2**31 - 1)


class PruningCallback(pl.Callback):
    """Report the monitored metric to Optuna after each validation epoch; prune if asked.

    droptune's own (optuna-integration's ``PyTorchLightningPruningCallback`` imports the
    ``lightning`` namespace, which must not be mixed with ``pytorch_lightning`` in one Trainer).
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor
        # The baseline reports like any trial but is never pruned: it is the reference the
        # study's result is compared with, so it must train to the end.
        self.exempt = bool(trial.user_attrs.get(BASELINE_ATTR))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        number = float(value)
        if not math.isfinite(number):
            return  # the NaN check fails the trial with a reason; don't feed NaN to the pruner
        epoch = trainer.current_epoch
        self.trial.report(number, step=epoch)
        if not self.exempt and self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT_EPOCH_ATTR, epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.monitor}={number:.6g})")


def _rss_mb() -> float | None:
    """Resident set size of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _oom_reason(exc: BaseException, batch_size: int) -> str:
    first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
    return f"out of memory at batch size {batch_size}: {first[:300]}"


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _History(pl.Callback):
    """One row per epoch: the epoch, its validation metrics, its training metrics, the learning
    rate and the epoch's wall time. A pruned epoch keeps its validation row.

    Training metrics reduced over the epoch reach ``callback_metrics`` after the callbacks'
    ``on_train_epoch_end``, so they are read when the next epoch starts or training ends.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        #: Called with each completed row (its epoch and the row).
        self.on_row: Callable[[int, dict[str, float]], None] | None = None
        self._by_epoch: dict[int, dict[str, float]] = {}
        self._started = 0.0
        self._open: int | None = None

    def reset(self) -> None:
        self._by_epoch.clear()
        self._open = None

    def _row(self, epoch: int) -> dict[str, float]:
        if epoch not in self._by_epoch:
            row: dict[str, float] = {"epoch": float(epoch)}
            self._by_epoch[epoch] = row
            self.rows.append(row)
        return self._by_epoch[epoch]

    def _close(self, trainer: pl.Trainer) -> None:
        if self._open is None:
            return
        row = self._row(self._open)
        for key, value in trainer.callback_metrics.items():
            if not key.startswith(("val_", "test_")) and key not in row:
                row[key] = float(value)
        if self.on_row is not None:
            self.on_row(self._open, row)
        self._open = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer)
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = self._row(trainer.current_epoch)
        row["epoch_time"] = time.perf_counter() - self._started
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._open = trainer.current_epoch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        timing.phase("train")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer)
        timing.phase("other")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = self._row(trainer.current_epoch)
        row.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        )
        if "epoch_time" not in row:  # pruned or stopped here: the time so far
            row["epoch_time"] = time.perf_counter() - self._started


class Objective:
    """Callable objective for ``study.optimize``: trains the trial's config and returns the
    best value of the study metric over validation epochs (single objective), or each metric's
    final value (multi-objective; ``val_train_gap`` is derived)."""

    def __init__(
        self,
        spec: StudySpec,
        device_overrides: dict[str, Any] | None = None,
        worker: str = "",
        extra_callbacks: list[Any] | None = None,
        tracking: StudyTracking | None = None,
    ) -> None:
        self.spec = spec
        self.tracking = tracking
        self.base: TrainConfig = spec.base
        self.device_overrides = device_overrides or {}
        self.worker = worker
        self.extra_callbacks = extra_callbacks or []
        self.on_trial_start: list[Any] = []
        #: Population rounds: (data config key, datamodule) built once per worker.
        self.population_data: tuple[str, Any] | None = None
        self._writer: TrackingWriter | None = None
        self.finished = FinishedConfigs()

    def tracking_writer(self) -> TrackingWriter | None:
        """The worker's background MLflow writer (population rounds), None without tracking."""
        if self.tracking is None or not self.tracking.enabled:
            return None
        if self._writer is None:
            from droptune.tracking._writer import TrackingWriter

            self._writer = TrackingWriter()
        return self._writer

    def close(self) -> None:
        """Write what the background writer still holds, then stop it."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def config_for(self, trial: optuna.Trial) -> tuple[TrainConfig, dict[str, Any]]:
        """The trial's sampled params laid over the spec's config, with its seed.

        Raises:
            DuplicateConfig: The sampler proposed exactly the params of a finished trial of
                the study (as of the last ``self.finished.refresh``) or of a trial asked
                since (enqueued trials are never refused).
        """
        params = suggest(trial, self.spec, self.base)
        # Enqueued params (the baseline, the user's own) are what someone asked for; only
        # what the sampler proposed is refused as a duplicate. (A retry of a failed trial
        # carries that trial's params, which no finished trial has.)
        twin = None if is_enqueued(trial) else self.finished.duplicate_of(trial.number, params)
        if twin is not None:
            trial.set_user_attr(DUPLICATE_ATTR, twin)
            raise DuplicateConfig(trial.number, twin)
        seed = trial_seed(self.spec.study.seed, trial.number)
        cfg = self.base.with_overrides({**params, **self.device_overrides, "train.seed": seed})
        return cfg, params

    def __call__(
        self, trial: optuna.Trial, spent: dict[str, float] | None = None
    ) -> float | list[float]:
        """Train the trial's config and return its objective value(s); ``spent`` is time the
        trial already took before this call (a population round's asking, by category), added
        to what it records as ``droptune.timing``."""
        self._clock = timing.snapshot()
        self._spent = spent or {}
        timing.phase("setup")
        self._history = _History()
        self._config: TrainConfig | None = None
        state, values = "FAIL", None
        try:
            result = self._run(trial)
            state, values = "COMPLETE", result
            return result
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except DuplicateConfig as exc:
            # Not a failure of the config: nothing trained, no traceback, no MLflow run.
            trial.set_user_attr(FAIL_REASON_ATTR, f"DuplicateConfig: {exc}"[:1000])
            state = "DUPLICATE"
            raise
        except BaseException as exc:
            # Kept on the trial so that `droptune status` and MLflow can say what happened.
            set_user_attrs(trial, failure_attrs(exc))
            raise
        finally:
            self._record(trial, state, values)

    def _record(self, trial: optuna.Trial, state: str, values: Any) -> None:
        timing.phase("other")  # training may have ended in an exception (no on_train_end)
        try:
            if state == "DUPLICATE":
                return
            self.record_end(trial, state, values, self._history.rows, self._config)
        finally:
            # where the trial's time went, its MLflow run included (best effort)
            spent = timing.add(self._spent, timing.since(self._clock))
            with contextlib.suppress(Exception):
                set_user_attrs(trial, {timing.TIMING_ATTR: spent})

    def record_end(
        self,
        trial: optuna.Trial,
        state: str,
        values: Any,
        history: list[dict[str, float]],
        config: TrainConfig | None,
        attrs: dict[str, Any] | None = None,
        track: bool = True,
    ) -> None:
        """Per-epoch history and the worker's memory on the trial, with ``attrs`` (the trial's
        results) in the same transaction; the trial's MLflow run completed with its state while
        the trial is still RUNNING (Optuna refuses attributes on finished trials).

        History and memory are best effort; a failure to write ``attrs`` raises. With
        ``track=False`` the MLflow run is left to the caller (a population round writes it in
        the background once the trial is told)."""
        if self._writer is not None and track:
            self._writer.drain()  # the epochs logged while it trained are on the run
        record = self.end_attrs(history)
        if attrs:
            set_user_attrs(trial, {**attrs, **record})
        else:
            with contextlib.suppress(Exception):
                set_user_attrs(trial, record)
        if self.tracking is not None and track:
            self.tracking.trial_ended(
                trial, state, values, None if config is None else config.to_dict()
            )

    @staticmethod
    def end_attrs(history: list[dict[str, float]]) -> dict[str, Any]:
        """What every ended trial records besides its results: the per-epoch history and the
        worker's memory (leaks show up there)."""
        from droptune.records import HISTORY_ATTR

        record: dict[str, Any] = {
            HISTORY_ATTR: [{k: round(v, 7) for k, v in row.items()} for row in history]
        }
        rss = _rss_mb()
        if rss is not None:
            record[RSS_ATTR] = rss
        return record

    def start_attrs(self, cfg: TrainConfig) -> dict[str, Any]:
        """Seed, worker, host and device: what a trial records when it starts."""
        return {
            SEED_ATTR: cfg.train.seed,
            WORKER_ATTR: self.worker,
            HOST_ATTR: socket.gethostname(),
            DEVICE_ATTR: os.environ.get("CUDA_VISIBLE_DEVICES", "cpu")
            if cfg.train.accelerator != "cpu"
            else "cpu",
        }

    def record_start(self, trial: optuna.Trial, cfg: TrainConfig) -> None:
        """Seed, worker, host and device on the trial; its MLflow run started."""
        set_user_attrs(trial, self.start_attrs(cfg))
        if self.tracking is not None:
            self.tracking.trial_started(trial.study, trial)

    def _run(self, trial: optuna.Trial) -> float | list[float]:
        for hook in self.on_trial_start:
            hook(trial)
        self.finished.refresh(trial.study)
        cfg, _ = self.config_for(trial)
        self._config = cfg
        self.record_start(trial, cfg)
        self._live_metrics(trial)
        objectives = self.spec.study.objectives
        directions = self.spec.study.study_directions
        history = self._history
        callbacks: list[Any] = [history, *self.extra_callbacks]
        if len(objectives) == 1 and self.spec.pruner.name != "none":
            callbacks.append(PruningCallback(trial, objectives[0]))
        result = self._fit_oom_safe(trial, cfg, callbacks)
        fitted = Fitted(result.epochs, result.stopped_early, result.metrics, history.rows)
        outcome = trial_outcome(fitted, objectives, directions)
        set_user_attrs(trial, outcome.attrs)
        if outcome.error is not None:  # __call__ records it again, with the traceback
            raise outcome.error
        assert outcome.values is not None
        return outcome.values

    def _live_metrics(self, trial: optuna.Trial) -> None:
        """Each epoch's row on the trial's MLflow run while it trains (in the background)."""
        writer = self.tracking_writer()
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if self.tracking is None or writer is None or not run_id or not self.spec.tracking.live:
            return
        from droptune.tracking._live import LiveMetrics

        live = LiveMetrics(self.tracking, writer)
        number = trial.number
        self._history.on_row = lambda epoch, row: live.add(number, lambda: run_id, epoch, row)

    def _fit_oom_safe(self, trial: optuna.Trial, cfg: TrainConfig, callbacks: list[Any]) -> Any:
        """``fit``, turning an out-of-memory error into a failed trial with its reason, after
        releasing the memory; with ``execution.oom_retry`` the trial is first tried once more
        at half the batch size (recorded in ``droptune.overrides``, which export applies)."""
        from droptune.training import fit

        batch_size = cfg.data.batch_size
        try:
            return fit(cfg, test=False, callbacks=callbacks)
        except torch.cuda.OutOfMemoryError as exc:
            reason = _oom_reason(exc, batch_size)
        _release_memory()  # the traceback (and the tensors its frames held) is gone by now
        if not self.spec.execution.oom_retry or batch_size < 2:
            raise TrialFailed(reason)
        smaller = batch_size // 2
        log.warning("trial %d: %s; retrying once at batch size %d", trial.number, reason, smaller)
        trial.set_user_attr(OOM_ATTR, reason)
        trial.set_user_attr(OVERRIDES_ATTR, {"data.batch_size": smaller})
        cfg = cfg.with_overrides({"data.batch_size": smaller})
        self._config = cfg
        self._history.rows.clear()
        self._history.reset()
        if self.tracking is not None:
            # the retry's epochs are logged in full at its end (its run keeps the first
            # attempt's live epochs too: MLflow cannot delete metric points)
            if self._writer is not None:
                self._writer.drain()
            self.tracking.forget_live(trial.number)
        try:
            return fit(cfg, test=False, callbacks=callbacks)
        except torch.cuda.OutOfMemoryError as exc:
            reason = _oom_reason(exc, smaller) + f" (after a retry from batch size {batch_size})"
        _release_memory()
        raise TrialFailed(reason)
