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
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
import math
import time
from typing import Literal

import torch
from torch import Tensor

from droptune.config import EarlyStoppingConfig
from droptune.config import TrainConfig
from droptune.data import TensorDataModule
from droptune.data import build_datamodule
from droptune.exceptions import ConfigError
from droptune.exceptions import PopulationUnsupported
from droptune.population._run import _device
from droptune.population._run import _Run
from droptune.population._support import population_support
from droptune.timing import timed


__all__ = [
    "EarlyStopper",
    "MemberResult",
    "OnEpoch",
    "OnEpochs",
    "PreparedPopulation",
    "prepare_population",
    "train_population",
]

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
            its best epoch when ``early_stopping.restores``, as ``fit``), on the CPU: the
            ``state_dict`` of ``build_network(config, info)`` for the built-in families, of
            the member's own module (the user's model, or the transformer's network) for
            the ``torch.func`` populations.
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


def _mixed_seed(configs: Sequence[TrainConfig]) -> int:
    """One seed for the population's dropout stream, from every member's seed."""
    seed = 0
    for config in configs:
        seed = (seed * 1_000_003 + config.train.seed) % (2**63 - 1)
    return seed


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
    prepared: PreparedPopulation | None = None,
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
        prepared: What :func:`prepare_population` built for these configs (``device``,
            ``datamodule`` and ``init`` are then its own).

    Raises:
        PopulationUnsupported: The configs, or the model they build, cannot train as one
            population (the message says why); raised before any member trains.
        ConfigError: The device is not available.
    """
    configs = list(configs)
    started = time.perf_counter()
    if prepared is None:
        prepared = prepare_population(configs, device=device, datamodule=datamodule, init=init)
    elif prepared.configs != configs:
        raise ValueError("prepared: built for other configs than those given")
    run = prepared.run
    run.compact = compact
    deterministic = any(c.train.deterministic for c in configs)
    previous = torch.are_deterministic_algorithms_enabled()
    results = [MemberResult(i, c) for i, c in enumerate(configs)]
    stoppers = [EarlyStopper(c.regularization.early_stopping) for c in configs]
    forked = [run.device] if run.device.type == "cuda" else []
    try:
        torch.use_deterministic_algorithms(deterministic or previous)
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(_mixed_seed(configs))
            _loop(run, results, stoppers, on_epoch, on_epochs, deadline, started, return_weights)
    finally:
        torch.use_deterministic_algorithms(previous)
    return results


@dataclass
class PreparedPopulation:
    """A population built and checked, not yet trained (see :func:`prepare_population`)."""

    configs: list[TrainConfig]
    run: _Run


def prepare_population(
    configs: Sequence[TrainConfig],
    *,
    device: str | torch.device | None = None,
    datamodule: TensorDataModule | None = None,
    init: Literal["exact", "fast"] = "exact",
) -> PreparedPopulation:
    """Build the population of ``configs`` (data on the device, stacks, optimizer) and, for a
    model built with ``torch.func`` (``custom``, ``transformer``), check and trial-run it;
    pass the result to :func:`train_population` as ``prepared``.

    A caller that falls back to one trial at a time does it on
    :class:`~droptune.exceptions.PopulationUnsupported` from here, before it records any start.

    Example:
        >>> try:
        ...     prepared = prepare_population(configs)
        ... except PopulationUnsupported as exc:
        ...     prepared = None  # train one at a time; str(exc) says why
        >>> results = train_population(configs, prepared=prepared) if prepared else []

    Raises:
        PopulationUnsupported: The configs cannot train as one population (the message names
            the field or module and the reason).
        ConfigError: The device is not available, or the data is not droptune's in-memory
            data.
    """
    configs = list(configs)
    reason = population_support(configs)
    if reason is not None:
        raise PopulationUnsupported(f"these configs cannot train as one population: {reason}")
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
    with timed("setup"):  # data to the device, the stacks, the optimizer
        run = _Run(configs, target, data, 1.0, init)
    return PreparedPopulation(configs, run)


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
        run.start_epoch(epoch)
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
                "lr": run.lr(config, epoch),
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
