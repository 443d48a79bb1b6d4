"""LightningModules parameterized by regularization: mlp, cnn, rnn, transformer and custom."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

import pytorch_lightning as pl

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


def build_module(config: TrainConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The LightningModule of ``config.model`` for the data of ``datamodule``."""
    from droptune.data import describe

    info = describe(datamodule)
    if config.model.family == "custom":
        example: Any = None
        splits = getattr(datamodule, "splits", None)
        if isinstance(splits, dict) and "train" in splits:
            example = splits["train"][0][:2]
        return build_custom(config, info, example)
    return RegularizedModule(config, info)
