"""In-memory datasets as tensors, batched by shuffled indices instead of per-sample collation.

A ``DataLoader`` over a ``TensorDataset`` indexes and collates every sample in Python; on small
models that dominates a trial (and on a GPU it also copies every batch host→device). Here the
whole split lives as tensors — on the training device once the Trainer is attached — and a batch
is one ``index_select``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor


__all__ = ["DataInfo", "TensorDataModule", "TensorLoader"]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data."""

    input_shape: tuple[int, ...]
    task: str  # "classification" or "regression"
    num_classes: int | None
    vocab_size: int | None = None


class TensorLoader:
    """Iterate ``(x, y)`` batches over tensors, reshuffled every epoch from a fixed seed.

    Args:
        x, y: Inputs and targets with the same first dimension.
        batch_size: Batch size; the last batch may be smaller.
        shuffle: Shuffle at every epoch (the order of epoch k depends only on ``seed`` and k).
        seed: Seed of the shuffling generator; the global RNG is never touched.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen).to(self.x.device)
            self.epoch += 1
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)
        else:
            for start in range(0, n, self.batch_size):
                yield (
                    self.x[start : start + self.batch_size],
                    self.y[start : start + self.batch_size],
                )


class TensorDataModule(pl.LightningDataModule):
    """A LightningDataModule over in-memory train/val/test tensors.

    With ``on_device`` the tensors move to the Trainer's device in ``setup``, so batches never
    cross the host-device boundary.
    """

    def __init__(
        self,
        splits: dict[str, tuple[Tensor, Tensor]],
        info: DataInfo,
        batch_size: int,
        seed: int = 0,
        on_device: bool = True,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.info = info
        self.batch_size = batch_size
        self.seed = seed
        self.on_device = on_device
        self._loaders: dict[str, TensorLoader] = {}

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if self.on_device and trainer is not None:
            device = trainer.strategy.root_device
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}
            self._loaders.clear()

    def _loader(self, split: str) -> TensorLoader:
        if split not in self._loaders:
            x, y = self.splits[split]
            self._loaders[split] = TensorLoader(
                x, y, self.batch_size, shuffle=split == "train", seed=self.seed
            )
        return self._loaders[split]

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val")

    def test_dataloader(self) -> Any:
        if "test" not in self.splits:
            return []
        return self._loader("test")

    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {k: len(x) for k, (x, _) in self.splits.items()}
