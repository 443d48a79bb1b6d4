"""Helpers shared by the data, model, training and CLI tests."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch import nn

from droptune.config import TrainConfig


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: Small, CPU-only, single-threaded, no dropout and no early stopping unless a test asks.
BASE: dict[str, Any] = {
    "data": {"name": "digits", "batch_size": 64},
    "model": {"family": "mlp", "hidden": [32]},
    "train": {
        "max_epochs": 2,
        "lr": 3e-3,
        "accelerator": "cpu",
        "devices": 1,
        "num_threads": 1,
    },
    "regularization": {"dropout": {"kind": "none"}, "early_stopping": {"patience": None}},
}


def config(**sections: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig: :data:`BASE` with the given sections merged over it; a model
    section that names a ``family`` replaces BASE's model section instead."""
    base = BASE
    if "family" in sections.get("model", {}):
        base = {**BASE, "model": {}}
    return TrainConfig.from_dict(merge(base, sections))


class Recorder(pl.Callback):
    """Records ``trainer.callback_metrics`` after every training epoch (validation included)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def series(self, key: str) -> list[float]:
        return [epoch[key] for epoch in self.epochs]


class ScriptedModule(pl.LightningModule):
    """A LightningModule double whose validation logs ``script[epoch]`` as ``monitor``."""

    def __init__(self, script: list[float], monitor: str = "val_loss") -> None:
        super().__init__()
        self.script = script
        self.monitor = monitor
        self.weight = nn.Parameter(torch.zeros(1))
        self.validated: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return (self.weight * batch[0].sum()).sum() * 0.0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append(self.current_epoch)
        self.log(self.monitor, float(self.script[self.current_epoch]), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def linear_and_conv_weights(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The effective weight of every Linear / Conv layer, in eval mode."""
    was_training = module.training
    module.eval()
    try:
        return [
            (name, m.weight.detach().clone())
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
        ]
    finally:
        module.train(was_training)
