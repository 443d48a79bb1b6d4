"""The state of one population run: data on the device, the network, the stacked optimizer, and
one training epoch / validation pass over all members (the loop is in ``_train``)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import math
import time
from typing import Any
from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

from droptune.config import TrainConfig
from droptune.data import TensorDataModule
from droptune.exceptions import ConfigError
from droptune.population._build import FUNCTIONAL_FAMILIES
from droptune.population._build import UserOptimizer
from droptune.population._build import build_functional
from droptune.population._functional import FunctionalPopulation
from droptune.population._networks import PopulationNetwork
from droptune.population._networks import build_population
from droptune.population._optim import StackedOptimizer
from droptune.population._optim import stacked_max_norm_


__all__: list[str] = []  # private to droptune.population


def _device(config: TrainConfig, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    accelerator = config.train.accelerator
    if accelerator == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if accelerator in ("gpu", "cuda"):
            raise ConfigError(
                f"train.accelerator {accelerator!r}: CUDA is not available here; allowed "
                "without a GPU: cpu, auto"
            )
        return torch.device("cpu")
    devices = config.train.devices
    if isinstance(devices, list):
        return torch.device("cuda", int(devices[0]))
    return torch.device("cuda")


def _hyper(
    configs: Sequence[TrainConfig], values: Callable[[TrainConfig], float], device: torch.device
) -> Tensor:
    """A ``[P]`` float64 tensor of one hyperparameter (float64 so that e.g. AdamW's factor
    ``1 - lr·λ`` rounds once to the parameter dtype, as torch's scalar arithmetic does)."""
    return torch.tensor([float(values(c)) for c in configs], dtype=torch.float64, device=device)


class _Run:
    """State of one population run: the stacks, optimizer and per-member bookkeeping."""

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        device: torch.device,
        datamodule: TensorDataModule,
        compact: float,
        init: Literal["exact", "fast"] = "exact",
    ) -> None:
        first = configs[0]
        self.configs = list(configs)
        self.device = device
        self.compact = compact
        self.dtype = torch.float64 if first.train.precision == "64-true" else torch.float32
        self.autocast = first.train.precision == "bf16-mixed"
        self.info = datamodule.info
        self.classification = self.info.task == "classification"
        self.batch_size = first.data.batch_size
        self.data_seed = datamodule.seed
        x, y = datamodule.splits["train"]
        self.x = x.to(device, self.dtype)
        self.y = y.to(device) if self.classification else y.to(device, self.dtype)
        vx, vy = datamodule.splits["val"]
        self.vx = vx.to(device, self.dtype)
        self.vy = vy.to(device) if self.classification else vy.to(device, self.dtype)
        self.net: PopulationNetwork | FunctionalPopulation
        self.user_optimizer: UserOptimizer | None = None
        if first.model.family in FUNCTIONAL_FAMILIES:
            built = build_functional(configs, datamodule, device, self.dtype)
            self.net, self.user_optimizer = built.network, built.optimizer
        else:
            self.net = build_population(configs, self.info, init=init, device=device).to(
                device, self.dtype
            )
        self.rows = list(range(len(configs)))  # member index of each stack row
        self.active = [True] * len(configs)  # per stack row
        clips = [c.train.gradient_clip for c in configs]
        user = self.user_optimizer
        self.optimizer = StackedOptimizer(
            list(self.net.parameters()),
            self._decayed_flags(),
            kind=user.kind if user else "sgd" if first.train.optimizer == "sgd" else "adam",
            lr=_hyper(configs, lambda c: user.lr[0] if user else c.train.lr, device),
            momentum=_hyper(
                configs, lambda c: user.momentum if user else c.train.momentum, device
            ),
            decoupled=_hyper(
                configs,
                lambda c: c.regularization.l2.strength * (c.regularization.l2.mode == "decoupled"),
                device,
            ),
            coupled=_hyper(
                configs,
                lambda c: c.regularization.l2.strength * (c.regularization.l2.mode == "coupled"),
                device,
            ),
            clip=None
            if all(c is None for c in clips)
            else _hyper(configs, lambda c: c.train.gradient_clip or math.inf, device),
            betas=user.betas if user else (0.9, 0.999),
            eps=user.eps if user else 1e-8,
        )
        self.max_norm_weights = self.net.max_norm_weights()
        norms = [c.regularization.max_norm for c in configs]
        self.max_norm: Tensor | None = None
        if any(n is not None for n in norms):
            self.max_norm = torch.tensor(
                [math.inf if n is None else n for n in norms], device=device
            )

    def _decayed_flags(self) -> list[bool]:
        decayed = {id(p) for p in self.net.decayed_parameters()}
        return [id(p) in decayed for p in self.net.parameters()]

    # ----------------------------------------------------------------------------------------

    def lr(self, config: TrainConfig, epoch: int) -> float:
        """The learning rate ``config``'s member trains with in ``epoch``."""
        if self.user_optimizer is None:
            return float(config.train.lr)
        schedule = self.user_optimizer.lr
        return schedule[min(epoch, len(schedule) - 1)]

    def start_epoch(self, epoch: int) -> None:
        """A user's scheduler: every member's learning rate for ``epoch``."""
        if self.user_optimizer is not None:
            lr = self.lr(self.configs[0], epoch)
            if lr != self.optimizer._lr_host[0]:
                self.optimizer.set_lr(lr)

    def _mask(self) -> Tensor:
        return torch.tensor(self.active, device=self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _losses(self, out: Tensor, y: Tensor, reduce: bool = True) -> Tensor:
        """Per-member loss ``[P]`` (mean over the batch) or ``[P, N]``."""
        size, n = out.shape[0], out.shape[1]
        if out.dtype not in (torch.float32, torch.float64):
            out = out.float()  # bf16 autocast: the loss in fp32, as Lightning's plugin does
        if self.classification:
            flat = F.cross_entropy(
                out.reshape(size * n, -1), y.repeat(size), reduction="none"
            ).view(size, n)
        else:
            target = y.to(out.dtype).expand(size, n)
            flat = F.mse_loss(out.reshape(size, n), target, reduction="none")
        return flat.mean(1) if reduce else flat

    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``TensorLoader``'s epoch order: ``randperm`` of the data seed and the epoch."""
        n = len(self.x)
        generator = torch.Generator().manual_seed(self.data_seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        if self.device.type == "cuda":  # no stream sync: pinned memory, asynchronous copy
            order = order.pin_memory().to(self.device, non_blocking=True)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x.index_select(0, index), self.y.index_select(0, index)

    def train_epoch(self, epoch: int, deadline: float | None) -> tuple[Tensor, Tensor] | None:
        """One epoch over the training data; per-row (loss sum, correct count) on the device,
        or None when the deadline passed mid-epoch."""
        net, optimizer = self.net, self.optimizer
        net.train()
        weight = net.active
        loss_sum = torch.zeros(net.size, device=self.device, dtype=self.dtype)
        correct = torch.zeros(net.size, device=self.device, dtype=self.dtype)
        for xb, yb in self._batches(epoch):
            if deadline is not None and time.time() > deadline:
                return None
            with self._autocast():
                out = net(xb)
                losses = self._losses(out, yb)
            (losses * weight).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            if self.max_norm is not None:
                stacked_max_norm_(self.max_norm_weights, self.max_norm, weight)
            n = xb.shape[0]
            loss_sum += losses.detach() * n
            if self.classification:
                correct += (out.detach().argmax(-1) == yb).sum(1)
        return loss_sum, correct

    @torch.no_grad()
    def validate(self) -> tuple[Tensor, Tensor]:
        """Per-row (val loss sum, val acc count or Σ batch-RMSE·n), Lightning's epoch means
        over batches of ``data.batch_size``."""
        net = self.net
        net.eval()
        loss_sum = torch.zeros(net.size, device=self.device, dtype=self.dtype)
        metric = torch.zeros(net.size, device=self.device, dtype=self.dtype)
        for start in range(0, len(self.vx), self.batch_size):
            xb = self.vx[start : start + self.batch_size]
            yb = self.vy[start : start + self.batch_size]
            with self._autocast():
                out = net(xb)
            losses = self._losses(out, yb)
            n = xb.shape[0]
            loss_sum += losses * n
            if self.classification:
                metric += (out.argmax(-1) == yb).sum(1)
            else:
                metric += losses.sqrt() * n
        return loss_sum, metric

    def shrink(self) -> None:
        """Drop the frozen rows from every stack when few enough members remain active."""
        alive = [row for row, on in enumerate(self.active) if on]
        size = len(self.active)
        if not alive or len(alive) == size or len(alive) > self.compact * size:
            return
        index = torch.tensor(alive, device=self.device)
        self.net.keep(index)
        self.optimizer.keep(index, list(self.net.parameters()))
        self.max_norm_weights = self.net.max_norm_weights()
        self.rows = [self.rows[row] for row in alive]
        self.active = [True] * len(alive)
        if self.max_norm is not None:
            self.max_norm = self.max_norm.index_select(0, index)

    def freeze(self) -> None:
        self.net.set_active(self._mask())
        self.optimizer.set_active(self.active)
