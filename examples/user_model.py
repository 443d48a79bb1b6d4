"""A user's own LightningModule, unedited by droptune: it has its own dropout layers and its own
``configure_optimizers``. ``studies/custom-user-model.yaml`` tunes its regularization with
``model.family: custom`` and ``model.target: examples.user_model:UserNet``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
import torch.nn.functional as F


class UserNet(pl.LightningModule):
    """A small MLP classifier written the way users write them."""

    def __init__(
        self, in_features: int = 64, hidden: int = 128, classes: int = 10, lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True)
        self.log(
            f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
