"""A user's ``LightningModule`` in a population: whether its steps are forward + the task loss,
which hooks it overrides, and the optimizer and learning-rate schedule it configures (see
``_build``'s docstring for the rules). Also the refusal helpers ``_build`` shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
import math
from typing import Any
from typing import Literal
import warnings

import pytorch_lightning as pl
from pytorch_lightning.utilities.model_helpers import is_overridden
import torch
from torch import Tensor

from droptune.config import TrainConfig
from droptune.data import TensorDataModule
from droptune.exceptions import PopulationUnsupported
from droptune.models import task_loss
from droptune.models._custom import _prediction


__all__ = ["UserOptimizer", "check_lightning"]

#: LightningModule hooks that change training beyond forward + loss; overriding one refuses.
_LOOP_HOOKS = (
    "setup",
    "configure_model",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_epoch_end",
    "on_before_backward",
    "backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "optimizer_step",
    "optimizer_zero_grad",
    "on_before_zero_grad",
    "lr_scheduler_step",
    "on_before_batch_transfer",
    "transfer_batch_to_device",
    "on_after_batch_transfer",
    "configure_callbacks",
)


@dataclass(frozen=True)
class UserOptimizer:
    """The optimizer a user's ``LightningModule`` configures (the same for every member).

    Attributes:
        kind: ``adam`` (Adam or AdamW: droptune owns weight decay, so they are one update) or
            ``sgd``.
        lr: The learning rate of each epoch (its scheduler stepped once per epoch).
        momentum: SGD momentum.
        betas, eps: Adam's.
    """

    kind: Literal["adam", "sgd"]
    lr: tuple[float, ...]
    momentum: float
    betas: tuple[float, float]
    eps: float


def _refuse(name: str, reason: str, structural: bool = True) -> PopulationUnsupported:
    exc = PopulationUnsupported(f"{name} cannot train as a population: {reason}")
    exc.structural = structural  # type: ignore[attr-defined]
    return exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _task(config: TrainConfig, module: pl.LightningModule) -> str:
    loss = config.model.loss
    if loss == "auto":
        info = getattr(module, "info", None)
        task = getattr(info, "task", None)
        return str(task) if task else "classification"
    return "classification" if loss == "cross_entropy" else "regression"


def _logged_call(
    module: pl.LightningModule, step: str, batch: Any
) -> tuple[Any, dict[str, float]]:
    """Call ``module.<step>(batch, 0)`` outside a Trainer, recording what it logs."""
    logged: dict[str, float] = {}

    def record(key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        logged[key] = float(value)

    def record_dict(values: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for key, value in values.items():
            record(key, value)

    module.log = record  # type: ignore[method-assign,assignment]
    module.log_dict = record_dict  # type: ignore[method-assign,assignment]
    try:
        return getattr(module, step)(batch, 0), logged
    finally:
        del module.log
        del module.log_dict


def _check_steps(
    name: str, config: TrainConfig, module: pl.LightningModule, data: TensorDataModule
) -> None:
    """``training_step`` returns the task loss of ``forward``; ``validation_step`` logs it as
    ``val_loss`` (one batch, dropout off)."""
    x, y = (t[:16] for t in data.splits["train"])
    task = _task(config, module)
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = float(task_loss(task, _prediction(module(x)), y))
            returned, _ = _logged_call(module, "training_step", (x, y))
            _, logged = _logged_call(module, "validation_step", (x, y))
    except Exception as exc:  # any failure outside a Trainer refuses
        raise _refuse(name, f"its steps do not run outside a Trainer ({_short(exc)})") from exc
    finally:
        module.train(was)
    loss = returned.get("loss") if isinstance(returned, Mapping) else returned
    loss_name = "cross-entropy" if task == "classification" else "MSE"
    if not isinstance(loss, Tensor) or not math.isclose(
        float(loss), expected, rel_tol=1e-5, abs_tol=1e-7
    ):
        raise _refuse(
            name,
            f"training_step returned {loss!r:.60}, not the {loss_name} loss of forward "
            f"({expected:.6g}); a population trains forward + the task loss (model.loss)",
        )
    if "val_loss" not in logged:
        raise _refuse(
            name, f"validation_step logs no val_loss (it logs: {', '.join(logged) or 'nothing'})"
        )
    if not math.isclose(logged["val_loss"], expected, rel_tol=1e-5, abs_tol=1e-7):
        raise _refuse(
            name,
            f"validation_step logs val_loss {logged['val_loss']:.6g}, not the {loss_name} loss "
            f"of forward ({expected:.6g})",
        )


def _unpack(result: Any) -> tuple[Any, Any]:
    """(optimizer, scheduler entry or None) of ``configure_optimizers``'s simple forms."""
    if isinstance(result, torch.optim.Optimizer):
        return result, None
    if isinstance(result, Mapping):
        return result.get("optimizer"), result.get("lr_scheduler")
    if isinstance(result, list | tuple):
        if len(result) == 1:
            return _unpack(result[0])
        if len(result) == 2 and all(isinstance(r, list | tuple) for r in result):
            optimizers, schedulers = result
            if len(optimizers) == 1 and len(schedulers) <= 1:
                return optimizers[0], schedulers[0] if schedulers else None
    return None, None


def _user_optimizer(name: str, module: pl.LightningModule, epochs: int) -> UserOptimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer, entry = _unpack(module.configure_optimizers())
    kinds: dict[type, Literal["adam", "sgd"]] = {
        torch.optim.Adam: "adam",
        torch.optim.AdamW: "adam",
        torch.optim.SGD: "sgd",
    }
    kind = kinds.get(type(optimizer))
    if kind is None:
        raise _refuse(
            name,
            f"configure_optimizers gives {type(optimizer).__name__}; a population trains one "
            "Adam, AdamW or SGD (one optimizer, plus at most one scheduler)",
        )
    groups = optimizer.param_groups
    for key in ("lr", "betas", "eps", "momentum", "amsgrad", "nesterov", "dampening", "maximize"):
        values = {repr(g.get(key)) for g in groups}
        if len(values) > 1:
            raise _refuse(name, f"its optimizer's parameter groups differ in {key}: {values}")
    group = groups[0]
    if (
        group.get("amsgrad")
        or group.get("nesterov")
        or group.get("dampening")
        or group["maximize"]
    ):
        raise _refuse(name, "its optimizer uses amsgrad, nesterov, dampening or maximize")
    covered = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    if covered != trainable:
        raise _refuse(name, "configure_optimizers leaves trainable parameters out")
    return UserOptimizer(
        kind,
        _schedule(name, optimizer, entry, epochs),
        float(group.get("momentum", 0.0) or 0.0),
        tuple(group.get("betas", (0.9, 0.999))),
        float(group.get("eps", 1e-8)),
    )


def _schedule(name: str, optimizer: Any, entry: Any, epochs: int) -> tuple[float, ...]:
    """The learning rate of each epoch: Lightning steps an epoch scheduler after each epoch."""
    scheduler = entry.get("scheduler") if isinstance(entry, Mapping) else entry
    if scheduler is None:
        return (float(optimizer.param_groups[0]["lr"]),) * epochs
    settings = entry if isinstance(entry, Mapping) else {}
    if (
        isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        or settings.get("interval", "epoch") != "epoch"
        or settings.get("frequency", 1) != 1
        or settings.get("monitor") is not None
    ):
        raise _refuse(
            name,
            f"its scheduler ({type(scheduler).__name__}) is not stepped once per epoch "
            "without a metric",
        )
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(epochs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            scheduler.step()
    return tuple(lrs)


def check_lightning(
    name: str, configs: Sequence[TrainConfig], module: pl.LightningModule, data: TensorDataModule
) -> UserOptimizer:
    if not module.automatic_optimization:
        raise _refuse(name, "it uses manual optimization (automatic_optimization = False)")
    hooks = [h for h in _LOOP_HOOKS if is_overridden(h, module, parent=pl.LightningModule)]
    if hooks:
        raise _refuse(
            name,
            f"it overrides {', '.join(hooks)}, which a population does not run (a population "
            "runs forward, the task loss and droptune's optimizer step)",
        )
    _check_steps(name, configs[0], module, data)
    return _user_optimizer(name, module, max(c.train.max_epochs for c in configs))
