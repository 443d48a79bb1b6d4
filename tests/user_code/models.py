"""A user's LightningModule and plain nn.Module, written without droptune in mind."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F


class UserClassifier(pl.LightningModule):
    """An MLP classifier with dropout placeholders and its own optimizer + StepLR schedule.

    ``frozen=True`` multiplies the logits by 0, so the data loss has zero gradient with respect
    to every parameter: only L2 (applied by droptune) can then move the weights.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 32,
        num_classes: int = 10,
        lr: float = 1e-2,
        weight_decay: float = 0.1,
        optimizer: str = "adamw",
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.0),
            nn.Linear(in_features, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, num_classes),
        )
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.frozen = frozen

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out * 0.0 if self.frozen else out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out, y), on_epoch=True)
        self.log("val_acc", (out.argmax(-1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.0, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class UserMLP(nn.Module):
    """A plain nn.Module; droptune trains it with the task loss."""

    def __init__(
        self, in_features: int = 64, hidden: int = 32, out: int = 10, frozen: bool = False
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, out),
        )
        self.frozen = frozen

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out * 0.0 if self.frozen else out


class NotAModule:
    """Importable, but not an nn.Module."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class DictOutputNet(nn.Module):
    """A plain nn.Module that returns what Hugging Face models return: a mapping with
    ``logits`` (and other entries)."""

    def __init__(self, in_features: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, classes)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.drop(x.flatten(1))), "features": x}
