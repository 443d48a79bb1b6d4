"""``model.family: custom``: tune the regularization of the user's own model, unedited.

The user's ``LightningModule`` (or plain ``nn.Module``, trained with the task loss) is imported
from ``package.module:Class`` and built with ``model.kwargs``; :func:`droptune.apply` swaps its
dropout modules for the configured kind and rates. Its own ``configure_optimizers`` is wrapped so
that droptune owns weight decay (set to 0 in every group; the regularization callback applies the
configured L2 to weights only — never biases or normalization parameters — without changing the
groups that the user's schedulers were built on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch import nn

from droptune.config import TrainConfig
from droptune.data import DataInfo
from droptune.data._build import build_object
from droptune.exceptions import ConfigError
from droptune.layers import apply
from droptune.layers import param_groups
from droptune.models._module import make_optimizer
from droptune.models._module import task_loss


__all__ = ["PlainModuleWrapper", "build_custom"]


class PlainModuleWrapper(pl.LightningModule):
    """Trains a plain ``nn.Module`` with the task loss, logging like the built-in families."""

    def __init__(self, net: nn.Module, cfg: TrainConfig, info: DataInfo) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.info = info

    def forward(self, x: Tensor) -> Tensor:
        return _prediction(self.net(x))

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        out = self(x)
        task = (
            self.info.task
            if self.cfg.model.loss == "auto"
            else ("classification" if self.cfg.model.loss == "cross_entropy" else "regression")
        )
        loss = task_loss(task, out, y)
        self.log(f"{stage}_loss", loss, on_epoch=True, on_step=False, batch_size=len(y))
        if task == "classification":
            self.log(
                f"{stage}_acc",
                (out.argmax(-1) == y).float().mean(),
                on_step=False,
                on_epoch=True,
                batch_size=len(y),
            )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.cfg, param_groups(self, 0.0))


def _prediction(out: Any) -> Tensor:
    """The tensor the loss is computed on: the output itself, or the ``logits`` of a mapping
    (a Hugging Face ``ModelOutput`` is an ordered dict), so a library model returns as it
    comes."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"model.target: a plain nn.Module must return a tensor or a mapping with 'logits' "
            f"(a Hugging Face ModelOutput), got {type(out).__name__}"
        )
    return out


def _zero_weight_decay(result: Any) -> Any:
    """Set weight_decay=0 in every optimizer group found in configure_optimizers' result."""
    stack = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.optim.Optimizer):
            for group in item.param_groups:
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return result


def build_custom(cfg: TrainConfig, info: DataInfo, example: Any = None) -> pl.LightningModule:
    """Import, build and regularize the user's model (see the module docstring)."""
    assert cfg.model.target is not None
    model = build_object(
        cfg.model.target,
        cfg.model.kwargs,
        "model.target",
        "model.kwargs",
        nn.Module,
        "an nn.Module or LightningModule",
    )
    apply(model, cfg.regularization, example_input=example)
    if not isinstance(model, pl.LightningModule):
        return PlainModuleWrapper(model, cfg, info)
    original = model.configure_optimizers

    def configure_optimizers() -> Any:
        return _zero_weight_decay(original())

    model.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    model._droptune_owns_l2 = True  # type: ignore[assignment]
    return model
