"""Trainer assembly and one-shot training: what ``droptune train`` and every trial run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.utilities.model_helpers import is_overridden
import torch
from torch import nn

from droptune.config import TrainConfig
from droptune.data import build_datamodule
from droptune.layers import decay_split
from droptune.layers import max_norm_
from droptune.models import build_module as _build_module


__all__ = [
    "FitResult",
    "RegularizationCallback",
    "build_datamodule",
    "build_module",
    "build_trainer",
    "fit",
    "load_checkpoint",
]

log = logging.getLogger(__name__)


class RegularizationCallback(pl.Callback):
    """Max-norm after every optimizer step, and L2 where the optimizer does not carry it.

    * ``max_norm``: :func:`max_norm_` on the whole module after each training batch.
    * Decoupled L2 with an optimizer that has no decoupled decay (Adam, SGD, or any optimizer of
      a user's module): ``w ← w·(1 − lr·λ)`` on decayed weights just before the step, which is
      AdamW's rule.
    * Coupled L2 on a user's module: ``grad += 2λw`` on decayed weights before the step, the
      gradient of ``λ·Σw²``. (droptune's own modules add the penalty to the loss instead.)

    Gradients are unscaled when ``on_before_optimizer_step`` runs, so mixed precision is safe.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.reg = config.regularization
        self.optimizer_name = config.train.optimizer
        self._decay: set[int] = set()

    def _l2_here(self, module: nn.Module) -> str | None:
        l2 = self.reg.l2
        if l2.strength == 0:
            return None
        from droptune.models import PlainModuleWrapper

        user = isinstance(module, PlainModuleWrapper) or bool(
            getattr(module, "_droptune_owns_l2", False)
        )
        if l2.mode == "coupled":
            return "coupled" if user else None
        native = not user and self.optimizer_name == "adamw"
        return None if native else "decoupled"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._decay = {id(p) for p in decay_split(pl_module)[0]}

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        mode = self._l2_here(pl_module)
        if mode is None:
            return
        strength = self.reg.l2.strength
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in self._decay:
                    continue
                if mode == "decoupled":
                    param.mul_(1.0 - group["lr"] * strength)
                elif param.grad is not None:
                    param.grad.add_(param, alpha=2.0 * strength)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.reg.max_norm is not None:
            max_norm_(pl_module, self.reg.max_norm)


def build_module(config: TrainConfig, datamodule: Any = None) -> pl.LightningModule:
    """The LightningModule of ``config.model`` with ``config.regularization`` applied, its
    weights initialised from ``train.seed`` (the data is built when not given)."""
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    return _build_module(
        config, datamodule if datamodule is not None else build_datamodule(config)
    )


def build_trainer(config: TrainConfig, **overrides: Any) -> pl.Trainer:
    """A Trainer for ``config``: early stopping with the configured patience, the
    regularization callback, and quiet defaults (no logger, checkpoints or progress bar unless
    overridden). ``callbacks=[...]`` in ``overrides`` are added to droptune's own."""
    reg = config.regularization
    callbacks: list[pl.Callback] = [RegularizationCallback(config)]
    stop = reg.early_stopping
    if stop.patience is not None:
        callbacks.append(
            EarlyStopping(
                monitor=stop.monitor,
                patience=stop.patience,
                min_delta=stop.min_delta,
                mode=stop.resolved_mode,
                check_finite=True,
            )
        )
    callbacks += list(overrides.pop("callbacks", []))
    train = config.train
    accelerator = "gpu" if train.accelerator == "cuda" else train.accelerator
    kwargs: dict[str, Any] = {
        "max_epochs": train.max_epochs,
        "accelerator": accelerator,
        "devices": train.devices,
        "precision": train.precision,
        "gradient_clip_val": train.gradient_clip,
        "deterministic": train.deterministic,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


@dataclass
class FitResult:
    """What one training run produced."""

    config: TrainConfig
    module: pl.LightningModule
    trainer: pl.Trainer
    metrics: dict[str, float]
    epochs: int
    stopped_early: bool


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
        out[key] = number
    return out


def fit(
    config: TrainConfig,
    *,
    test: bool = True,
    checkpoint: Path | None = None,
    **trainer_overrides: Any,
) -> FitResult:
    """Seed, build data + module + trainer from ``config``, fit, and evaluate.

    ``metrics`` holds the final epoch's ``train_*``/``val_*`` values, ``best_<monitor>`` over all
    epochs and, with ``test``, the ``test_*`` metrics of the final weights (when the data has a
    test split and the module a ``test_step``: a user's module may have none).
    """
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    if config.train.matmul_precision is not None:
        torch.set_float32_matmul_precision(config.train.matmul_precision)
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config)
    module = build_module(config, datamodule)
    monitor = config.regularization.early_stopping.monitor
    stopping = config.regularization.early_stopping
    tracker = _BestTracker(monitor, stopping.resolved_mode, keep=stopping.restores)
    trainer = build_trainer(
        config, callbacks=[tracker, *trainer_overrides.pop("callbacks", [])], **trainer_overrides
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = _scalars(trainer.callback_metrics)
    if tracker.best_state is not None:  # test and save the best epoch's weights
        module.load_state_dict(tracker.best_state)
        tracker.best_state = None
    if tracker.best is not None:
        metrics[f"best_{monitor}"] = tracker.best
    if test and is_overridden("test_step", module) and _has_test_data(datamodule):
        tested = trainer.test(module, datamodule=datamodule, verbose=False)
        if tested:
            metrics.update(_scalars(tested[0]))
    if checkpoint is not None:
        trainer.save_checkpoint(str(checkpoint))
    return FitResult(
        config, module, trainer, metrics, trainer.current_epoch, _stopped_early(trainer)
    )


def _stopped_early(trainer: pl.Trainer) -> bool:
    """Whether early stopping ended the run, including at the first epoch (a non-finite metric
    there leaves ``stopped_epoch`` at 0, indistinguishable from "never stopped")."""
    stopper = trainer.early_stopping_callback
    if stopper is None:
        return False
    reason = getattr(stopper, "stopping_reason", None)  # Lightning >= 2.5
    if reason is not None:
        return bool(reason.name != "NOT_STOPPED")
    return stopper.stopped_epoch > 0 or bool(trainer.should_stop)


def _has_test_data(datamodule: pl.LightningDataModule) -> bool:
    if type(datamodule).test_dataloader is pl.LightningDataModule.test_dataloader:
        return False  # a user DataModule without a test split
    try:
        loader = datamodule.test_dataloader()
    except Exception:
        return False
    try:
        return len(loader) > 0
    except TypeError:
        return True


class _BestTracker(pl.Callback):
    """Remembers the best value of the monitored metric across validation epochs, and with
    ``keep`` a copy of the module's weights at that epoch (restored when training ends)."""

    def __init__(self, monitor: str, mode: str, keep: bool = False) -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.history: list[float] = []
        self.keep = keep
        self.best_state: dict[str, Any] | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        number = float(value)
        self.history.append(number)
        if math.isfinite(number) and (
            self.best is None or (number < self.best if self.mode == "min" else number > self.best)
        ):
            self.best = number
            if self.keep:
                self.best_state = {
                    k: v.detach().clone() for k, v in pl_module.state_dict().items()
                }


def load_checkpoint(path: str | Path, map_location: Any = None, module_class: Any = None) -> Any:
    """Load a checkpoint written by ``droptune train`` (or any Lightning checkpoint of
    ``module_class``, default :class:`~droptune.models.RegularizedModule`) without unpickling
    arbitrary objects: ``weights_only=True``, so a tampered file cannot run code.

    Raises:
        ConfigError: The file does not exist, or it holds something other than tensors and
            plain values (a checkpoint that would need arbitrary unpickling).
    """
    import pickle

    from droptune.exceptions import ConfigError
    from droptune.models import RegularizedModule

    cls = module_class or RegularizedModule
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} does not exist")
    try:
        return cls.load_from_checkpoint(checkpoint, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} holds objects other than tensors and plain values "
            f"and was not loaded (weights_only=True): {first[:300]}"
        ) from None
