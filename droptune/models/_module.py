"""The LightningModule that trains every built-in family, and the wrapper for users' models."""

from __future__ import annotations

from dataclasses import asdict
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
import torch.nn.functional as F

from droptune.config import TrainConfig
from droptune.data import DataInfo
from droptune.layers import l2_penalty
from droptune.layers import param_groups
from droptune.models._networks import build_network


__all__ = ["RegularizedModule", "make_optimizer", "task_loss"]


def task_loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for classification, MSE for regression."""
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out.reshape(y.shape), y.to(out.dtype))


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The configured optimizer over parameter groups."""
    train = cfg.train
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)


class RegularizedModule(pl.LightningModule):
    """A built-in model family trained with the configured regularization.

    Logs ``train_loss``, ``val_loss`` and the task metric (``val_acc`` or ``val_rmse``) every
    epoch, plus ``lr`` and ``epoch_time``. L2 goes through :func:`param_groups`: decoupled
    decay in the optimizer (AdamW's own; with Adam/SGD droptune's regularization callback applies
    the decoupled step), or the coupled penalty ``λ·Σw²`` added to the training loss.
    ``save_hyperparameters`` stores the config and data description, so
    ``RegularizedModule.load_from_checkpoint(path)`` rebuilds the same network.

    Args:
        config: A :class:`TrainConfig` or its dict form.
        info: The data description (input shape, task, classes) as a DataInfo or dict.
    """

    def __init__(self, config: dict[str, Any] | TrainConfig, info: dict[str, Any] | DataInfo):
        super().__init__()
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        data_info = (
            info
            if isinstance(info, DataInfo)
            else DataInfo(**{**info, "input_shape": tuple(info["input_shape"])})
        )
        self.save_hyperparameters({"config": cfg.to_dict(), "info": asdict(data_info)})
        self.cfg = cfg
        self.info = data_info
        self.net = build_network(cfg, data_info)
        self._epoch_start = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        out = self(x)
        loss = task_loss(self.info.task, out, y)
        self.log(
            f"{stage}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=stage == "val",
            batch_size=len(y),
        )
        if self.info.task == "classification":
            acc = (out.argmax(dim=-1) == y).float().mean()
            self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        elif stage != "train":
            self.log(
                f"{stage}_rmse",
                loss.detach().sqrt(),
                on_step=False,
                on_epoch=True,
                batch_size=len(y),
            )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        l2 = self.cfg.regularization.l2
        if l2.mode == "coupled" and l2.strength > 0:
            loss = loss + l2_penalty(self, l2)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.log("epoch_time", time.perf_counter() - self._epoch_start)
        optimizer = self.optimizers()
        if isinstance(optimizer, pl.core.optimizer.LightningOptimizer):
            self.log("lr", float(optimizer.optimizer.param_groups[0]["lr"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        l2 = self.cfg.regularization.l2
        native = self.cfg.train.optimizer == "adamw" and l2.mode == "decoupled"
        groups = param_groups(self, l2 if native else 0.0)
        return make_optimizer(self.cfg, groups)
