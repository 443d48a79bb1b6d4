"""LightningModules parameterized by regularization: mlp, cnn, rnn, transformer and custom."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

import pytorch_lightning as pl
import torch

from droptune.models._custom import PlainModuleWrapper
from droptune.models._custom import build_custom
from droptune.models._module import RegularizedModule
from droptune.models._module import task_loss
from droptune.models._networks import build_network


if TYPE_CHECKING:
    from droptune.config import TrainConfig

__all__ = [
    "PlainModuleWrapper",
    "RegularizedModule",
    "build_custom",
    "build_module",
    "build_network",
    "task_loss",
]


def _example_input(datamodule: pl.LightningDataModule) -> Any:
    """Two training inputs for :func:`droptune.apply`'s trace: from droptune's own splits, else
    from the first batch of a user's DataModule (None when that has no tensor inputs; apply
    then decides sites from registration order)."""
    splits = getattr(datamodule, "splits", None)
    if isinstance(splits, dict) and "train" in splits:
        return splits["train"][0][:2]
    try:
        batch = next(iter(datamodule.train_dataloader()))
    except Exception:  # an odd DataModule: the trace is an aid, not a requirement
        return None
    first = batch[0] if isinstance(batch, list | tuple) and batch else None
    return first[:2] if isinstance(first, torch.Tensor) else None


def build_module(config: TrainConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The LightningModule of ``config.model`` for the data of ``datamodule``."""
    from droptune.data import describe

    info = describe(datamodule)
    if config.model.family == "custom":
        return build_custom(config, info, _example_input(datamodule))
    return RegularizedModule(config, info)
