"""A user's LightningDataModule over plain DataLoaders (separable Gaussian blobs)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset


class BlobsDataModule(pl.LightningDataModule):
    """``n`` samples in ``classes`` Gaussian blobs of ``features`` dimensions (or a regression
    target with ``regression=True``); 75 % train, 25 % validation, optional test split."""

    def __init__(
        self,
        n: int = 256,
        features: int = 8,
        classes: int = 3,
        batch_size: int = 32,
        seed: int = 0,
        regression: bool = False,
        declare_classes: bool = False,
        with_test: bool = False,
    ) -> None:
        super().__init__()
        self.n, self.features, self.classes = n, features, classes
        self.batch_size, self.seed = batch_size, seed
        self.regression = regression
        self.with_test = with_test
        if declare_classes:
            self.num_classes = classes
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        centers = 3.0 * torch.randn(self.classes, self.features, generator=gen)
        labels = torch.arange(self.n) % self.classes
        x = centers[labels] + torch.randn(self.n, self.features, generator=gen)
        y: torch.Tensor = x.sum(dim=1) if self.regression else labels
        cut = self.n * 3 // 4
        self.train_set = TensorDataset(x[:cut], y[:cut])
        self.val_set = TensorDataset(x[cut:], y[cut:])

    def train_dataloader(self) -> Any:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> Any:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> Any:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size) if self.with_test else []


class FlakyDataModule(BlobsDataModule):
    """A user DataModule whose ``setup`` raises for the first ``fail_first`` instances across
    processes (counted in the file ``counter``), then works."""

    def __init__(self, counter: str, fail_first: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counter, self.fail_first = counter, fail_first

    def setup(self, stage: str | None = None) -> None:
        from pathlib import Path

        path = Path(self.counter)
        count = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(count))
        if count <= self.fail_first:
            raise ValueError(
                f"FlakyDataModule.setup: the data share is not mounted (call {count})"
            )
        super().setup(stage)
