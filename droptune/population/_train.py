"""``train_population``: P TrainConfigs trained as one batched network, in plain PyTorch.

The loop mirrors ``droptune.training.fit`` for each member: the same data split and batch order
(``TensorLoader``'s per-epoch shuffle of ``data.seed``), the same initial weights
(:func:`build_population`), the same loss, L2, max-norm, gradient clipping and optimizer
update, validation after every epoch with Lightning's epoch means, early stopping with
Lightning's ``EarlyStopping`` rules and the best value of the monitored metric like ``fit``'s
tracker. What differs is the dropout masks (one random stream for the population).

Nothing syncs with the device inside an epoch: per-member sums accumulate on the device and
come to the host once per epoch, after validation.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
from dataclasses import dataclass
from dataclasses import field
import math
import time
from typing import Any
from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

from droptune.config import EarlyStoppingConfig
from droptune.config import TrainConfig
from droptune.data import TensorDataModule
from droptune.data import build_datamodule
from droptune.exceptions import ConfigError
from droptune.population._networks import PopulationNetwork
from droptune.population._networks import build_population
from droptune.population._optim import StackedOptimizer
from droptune.population._optim import stacked_max_norm_
from droptune.population._support import population_support
from droptune.timing import timed


__all__ = ["EarlyStopper", "MemberResult", "OnEpoch", "OnEpochs", "train_population"]

#: ``on_epoch(member_index, epoch, metrics) -> prune?``
OnEpoch = Callable[[int, int, dict[str, float]], bool]
#: ``on_epochs(epoch, {member_index: metrics}) -> member indices to prune``
OnEpochs = Callable[[int, dict[int, dict[str, float]]], Collection[int]]


@dataclass
class MemberResult:
    """What one member of a population produced (the population form of ``FitResult``).

    Attributes:
        index: Position of the member's config in the list given to :func:`train_population`.
        config: That config.
        history: One row per trained epoch: ``epoch``, ``train_loss``, ``train_acc``
            (classification), ``val_loss``, ``val_acc`` or ``val_rmse``, ``lr`` and
            ``epoch_time`` (wall time of the whole population's epoch, validation included).
        best: Best value of ``regularization.early_stopping.monitor`` over finite epochs
            (None if no epoch finished).
        metrics: The last row's values (``epoch`` left out) plus ``best_<monitor>``.
        epochs: Epochs trained, the pruned or stopping epoch included.
        stopped_early: Early stopping ended the member (patience used up or a non-finite
            monitored metric, as Lightning's ``EarlyStopping(check_finite=True)``).
        pruned: ``on_epoch`` returned True for the member's last epoch (or ``on_epochs``
            named it).
        diverged: The monitored metric became non-finite (the member stopped then, with or
            without early stopping configured).
        timed_out: The deadline passed while the member was still training.
        seconds: Wall time from the start of :func:`train_population` to the member's end.
        state_dict: With ``return_weights``, the member's weights when it finished (those of
            its best epoch when ``early_stopping.restores``, as ``fit``), as the
            ``state_dict`` of ``build_network(config, info)`` (on the CPU).
    """

    index: int
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    stopped_early: bool = False
    pruned: bool = False
    diverged: bool = False
    timed_out: bool = False
    seconds: float = 0.0
    state_dict: dict[str, Tensor] | None = None


class EarlyStopper:
    """Lightning's ``EarlyStopping`` decision for one member (``check_finite=True``).

    An epoch improves when ``value < best - min_delta`` (mode min) or ``value > best +
    min_delta`` (mode max), computed in float32 like Lightning (whose metrics are float32
    tensors: ``0.84 + 0.06 < 0.9`` holds in float64 but not there); otherwise the wait grows,
    and the member stops when it reaches ``patience``. A non-finite value stops at once.
    ``patience: null`` never stops.
    """

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.patience = config.patience
        self.maximize = config.resolved_mode == "max"
        self.min_delta = config.min_delta if self.maximize else -config.min_delta
        self.best_score = torch.tensor(-math.inf if self.maximize else math.inf)
        self.wait = 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; True when the member must stop now."""
        if self.patience is None:
            return False
        current = torch.tensor(value, dtype=torch.float32)
        if not bool(torch.isfinite(current)):
            return True
        shifted = current - self.min_delta
        if bool(shifted > self.best_score if self.maximize else shifted < self.best_score):
            self.best_score, self.wait = current, 0
            return False
        self.wait += 1
        return self.wait >= self.patience


def _better(value: float, best: float | None, maximize: bool) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value > best if maximize else value < best)


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


def _mixed_seed(configs: Sequence[TrainConfig]) -> int:
    """One seed for the population's dropout stream, from every member's seed."""
    seed = 0
    for config in configs:
        seed = (seed * 1_000_003 + config.train.seed) % (2**63 - 1)
    return seed


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
        self.net: PopulationNetwork = build_population(
            configs, self.info, init=init, device=device
        ).to(device, self.dtype)
        self.rows = list(range(len(configs)))  # member index of each stack row
        self.active = [True] * len(configs)  # per stack row
        self.lr_values = [c.train.lr for c in configs]
        clips = [c.train.gradient_clip for c in configs]
        self.optimizer = StackedOptimizer(
            list(self.net.parameters()),
            self._decayed_flags(),
            kind="sgd" if first.train.optimizer == "sgd" else "adam",
            lr=_hyper(configs, lambda c: c.train.lr, device),
            momentum=_hyper(configs, lambda c: c.train.momentum, device),
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


def train_population(
    configs: Sequence[TrainConfig],
    *,
    device: str | torch.device | None = None,
    on_epoch: OnEpoch | None = None,
    on_epochs: OnEpochs | None = None,
    deadline: float | None = None,
    datamodule: TensorDataModule | None = None,
    compact: float = 1.0,
    return_weights: bool = False,
    init: Literal["exact", "fast"] = "exact",
) -> list[MemberResult]:
    """Train ``configs`` as one population; one :class:`MemberResult` per config, in order.

    Each member trains as ``droptune.training.fit(config)`` would (same data order, initial
    weights, loss, regularization and optimizer; only the dropout masks differ), until its
    early stopping fires, ``on_epoch`` prunes it or it reaches its ``train.max_epochs``. A
    finished member is frozen; the run ends when every member finished or the deadline passed.

    Args:
        configs: The members' configs; they must pass :func:`population_support`.
        device: Where to train; default from ``train.accelerator``/``train.devices`` of the
            first config (``auto``: CUDA when available).
        on_epoch: ``on_epoch(member_index, epoch, metrics) -> bool``, called after validation
            once per member that trained in that epoch (also when early stopping just ended
            it), with the epoch's history row; True prunes the member. Metrics may be NaN for a
            member that diverged (it stops at that epoch).
        on_epochs: ``on_epochs(epoch, {member_index: metrics}) -> members to prune``, called
            once per epoch, after ``on_epoch``, with the rows of every member that trained in
            it: one call where a caller wants to record or judge a whole epoch at once (one
            database transaction for the whole population instead of one per member).
        deadline: A ``time.time()`` value; once passed, training stops (checked before every
            step; a partial epoch is dropped) and the members still training are
            ``timed_out``.
        datamodule: The shared data, if already built (``build_datamodule(configs[0])``); its
            splits may already sit on ``device``.
        compact: Remove finished members from the stacks when at most this fraction of the
            current rows is still training (1.0: as soon as one finishes; 0: never, finished
            members stay in place, frozen).
        return_weights: Fill :attr:`MemberResult.state_dict` with each member's final weights.
        init: ``exact`` starts every member from the single path's weights for its seed (one
            CPU initialisation per member); ``fast`` draws the same distributions on the
            device (see :func:`build_population`).

    Raises:
        ConfigError: The configs cannot train as one population (the message says why), or
            the device is not available.
    """
    configs = list(configs)
    reason = population_support(configs)
    if reason is not None:
        raise ConfigError(f"these configs cannot train as one population: {reason}")
    started = time.perf_counter()
    first = configs[0]
    if first.train.num_threads:
        torch.set_num_threads(first.train.num_threads)
    if first.train.matmul_precision is not None:
        torch.set_float32_matmul_precision(first.train.matmul_precision)
    target = _device(first, device)
    data = datamodule if datamodule is not None else build_datamodule(first)
    if not isinstance(data, TensorDataModule):
        raise ConfigError(
            f"data: a population needs droptune's in-memory data, got {type(data).__name__}"
        )
    deterministic = any(c.train.deterministic for c in configs)
    previous = torch.are_deterministic_algorithms_enabled()
    results = [MemberResult(i, c) for i, c in enumerate(configs)]
    stoppers = [EarlyStopper(c.regularization.early_stopping) for c in configs]
    forked = [target] if target.type == "cuda" else []
    try:
        torch.use_deterministic_algorithms(deterministic or previous)
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(_mixed_seed(configs))
            with timed("setup"):  # data to the device, the stacks, the optimizer
                run = _Run(configs, target, data, compact, init)
            _loop(run, results, stoppers, on_epoch, on_epochs, deadline, started, return_weights)
    finally:
        torch.use_deterministic_algorithms(previous)
    return results


def _loop(
    run: _Run,
    results: list[MemberResult],
    stoppers: list[EarlyStopper],
    on_epoch: OnEpoch | None,
    on_epochs: OnEpochs | None,
    deadline: float | None,
    started: float,
    return_weights: bool,
) -> None:
    val_key = "val_acc" if run.classification else "val_rmse"
    n_train, n_val = len(run.x), len(run.vx)
    epoch = 0
    while any(run.active):
        epoch_start = time.perf_counter()
        trained = run.train_epoch(epoch, deadline)
        if trained is None:
            break
        val_loss, val_metric = run.validate()
        train_loss, train_correct = trained
        # the one host sync of the epoch
        table = torch.stack([train_loss, train_correct, val_loss, val_metric]).cpu().tolist()
        epoch_time = time.perf_counter() - epoch_start
        trained_rows: dict[int, int] = {}  # member -> row
        rows: dict[int, dict[str, float]] = {}
        for row, member in enumerate(run.rows):
            if not run.active[row]:
                continue
            result = results[member]
            config = result.config
            metrics = {
                "epoch": float(epoch),
                "train_loss": table[0][row] / n_train,
                **({"train_acc": table[1][row] / n_train} if run.classification else {}),
                "val_loss": table[2][row] / n_val,
                val_key: table[3][row] / n_val,
                "lr": float(config.train.lr),
                "epoch_time": epoch_time,
            }
            result.history.append(metrics)
            result.epochs = epoch + 1
            stopping = config.regularization.early_stopping
            value = metrics[stopping.monitor]
            if _better(value, result.best, stopping.resolved_mode == "max"):
                result.best = value
                if return_weights and stopping.restores:  # as fit: the best epoch's weights
                    state = run.net.member_state_dict(row)
                    result.state_dict = {key: v.detach().cpu().clone() for key, v in state.items()}
            result.stopped_early = stoppers[member].update(value)
            result.diverged = not math.isfinite(value)
            trained_rows[member] = row
            rows[member] = metrics
        for member, metrics in rows.items():
            if on_epoch is not None and on_epoch(member, epoch, dict(metrics)):
                results[member].pruned = True
        if on_epochs is not None and rows:
            pruned = on_epochs(epoch, {member: dict(metrics) for member, metrics in rows.items()})
            for member in pruned:
                if member not in rows:
                    raise ValueError(
                        f"on_epochs returned member {member}, which did not train in epoch "
                        f"{epoch} (it may prune only members {sorted(rows)})"
                    )
                results[member].pruned = True
        for member, row in trained_rows.items():
            result = results[member]
            if (
                result.stopped_early
                or result.pruned
                or result.diverged
                or result.epochs >= result.config.train.max_epochs
            ):
                run.active[row] = False
                _finish(run, row, result, started, return_weights)
        run.freeze()
        run.shrink()
        epoch += 1
    for row, member in enumerate(run.rows):
        if run.active[row]:
            result = results[member]
            result.timed_out = True
            _finish(run, row, result, started, return_weights)


def _finish(
    run: _Run, row: int, result: MemberResult, started: float, return_weights: bool
) -> None:
    """Close a member's result (its row is still in the stacks)."""
    result.seconds = time.perf_counter() - started
    stopping = result.config.regularization.early_stopping
    if return_weights and not (stopping.restores and result.state_dict is not None):
        state = run.net.member_state_dict(row)
        result.state_dict = {key: value.cpu() for key, value in state.items()}
    monitor = result.config.regularization.early_stopping.monitor
    if result.history:
        result.metrics = {k: v for k, v in result.history[-1].items() if k != "epoch"}
    if result.best is not None:
        result.metrics[f"best_{monitor}"] = result.best
