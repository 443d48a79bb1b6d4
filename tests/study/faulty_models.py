"""User models for the fault tests, imported by worker processes as
``tests.study.faulty_models:<Class>`` (the repository root is on their ``PYTHONPATH``)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F


class AlwaysRaises(pl.LightningModule):
    """A LightningModule whose training step always raises (a user's bug)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(0.0), nn.Linear(in_features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        raise RuntimeError("boom: AlwaysRaises.training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


#: Weak references to every OomAbove built in this process (to prove a failed trial's model
#: and tensors are released).
BUILT: list[Any] = []


class OomAbove(pl.LightningModule):
    """Raises ``torch.cuda.OutOfMemoryError`` (what a GPU raises; injected here on the CPU) in
    every training step whose batch is larger than ``limit``."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, limit: int = 32) -> None:
        super().__init__()
        import weakref

        self.limit = limit
        self.net = nn.Sequential(nn.Dropout(0.1), nn.Linear(in_features, num_classes))
        BUILT.append(weakref.ref(self))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {len(x)})"
            )
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)
