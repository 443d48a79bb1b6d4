"""Users' models for the functional population tests: some batch under ``torch.func.vmap``, some
cannot (and must fall back to one trial at a time with a message saying why)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F


class BatchNormMLP(nn.Module):
    """Batch norm with running statistics: each member keeps its own."""

    def __init__(self, in_features: int = 64, hidden: int = 16, out: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.Tanh(),
            nn.Dropout(0.0),
            nn.Linear(hidden, out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ControlFlowNet(nn.Module):
    """Python control flow on a tensor's value: vmap cannot batch it."""

    def __init__(self, in_features: int = 64, out: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(self.drop(x.flatten(1)))
        if h.mean() > 0:
            return h
        return -h


class _Twice(torch.autograd.Function):
    """A custom autograd Function without a vmap rule."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * 2


class AutogradFunctionNet(nn.Module):
    def __init__(self, in_features: int = 64, out: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out)

    def forward(self, x: Tensor) -> Tensor:
        return _Twice.apply(self.fc(x.flatten(1)))


class AttentionNet(nn.Module):
    """``nn.MultiheadAttention`` reads its float ``dropout`` itself: one value per population."""

    def __init__(self, in_features: int = 64, out: int = 10) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(in_features, out)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.flatten(1).view(x.shape[0], -1, 8)
        out, _ = self.attention(seq, seq, seq, need_weights=False)
        return self.head(out.flatten(1))


class _Lightning(pl.LightningModule):
    def __init__(self, in_features: int = 64, out: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(in_features, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class SmoothedLoss(_Lightning):
    """training_step is not forward + cross-entropy (label smoothing)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.1)


class EpochHook(_Lightning):
    """Overrides a training-loop hook a population does not run."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_epoch_end(self) -> None:
        self.log("epoch_end", 1.0)


class Plateau(_Lightning):
    """A scheduler that needs a monitored metric."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


class TrainerSchedule(_Lightning):
    """Its scheduler reads ``self.trainer`` (a common pattern): no Trainer exists while a
    population is built, so it runs one trial at a time."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


class BatchSizeBranch(nn.Module):
    """Takes a data-dependent path only on batches larger than 8 rows (vmap refuses ``.item()``
    there): a trial run on a few rows would pass, a real batch would not."""

    def __init__(self, in_features: int = 64, out: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(self.drop(x.flatten(1)))
        if x.shape[0] > 8:
            h = h / max(1.0, h.abs().max().item())
        return h
