"""Build a :class:`FunctionalPopulation` from the members' own modules, or say why not.

Families built this way (:data:`FUNCTIONAL_FAMILIES`): ``custom`` (a user's ``nn.Module``,
trained with the task loss, or a ``LightningModule`` whose steps are its forward plus the task
loss) and ``transformer``. Each member's module is built exactly as the single path builds it
(:func:`droptune.models.build_module` after seeding with ``train.seed``), so a member starts from
the weights ``droptune train`` starts from.

What qualifies (each rule is checked here, before any member trains; a rule that fails raises
:class:`~droptune.exceptions.PopulationUnsupported` naming the module and the reason):

* the members' modules have the same tensors (names and shapes) and differ in no float attribute
  but droptune dropout modules' rates (a library that reads a float rate itself, such as
  ``nn.MultiheadAttention.dropout``, can have one value per population only);
* a ``LightningModule``: automatic optimization; none of the training-loop hooks overridden
  (:data:`_LOOP_HOOKS`); ``training_step`` returns the task loss of ``forward`` (cross-entropy or
  MSE, ``model.loss``) and ``validation_step`` logs ``val_loss`` equal to it, checked on one
  batch with dropout off; ``configure_optimizers`` gives one Adam, AdamW or SGD (no nesterov,
  dampening or amsgrad) over every trainable parameter with one learning rate, and at most one
  learning-rate scheduler stepped once per epoch without a monitored metric;
* max-norm (when a member sets it): every ``Linear``/convolution weight is one tensor (no
  transposed convolutions, no split parametrizations);
* the trial run (:func:`_probe`): one vmapped forward and backward on a small batch on the
  training device gives outputs ``[P, N, ...]`` and finite gradients, and in eval mode member
  ``i``'s output equals its own module's. This catches what ``vmap`` refuses — data-dependent
  Python control flow, ``.item()``, custom ``autograd.Function``\\ s without a vmap rule, in-place
  updates of tensors that are not stacked — and modules that keep tensors outside their
  parameters and buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import copy
from dataclasses import dataclass
import json
import logging
import math
import random
from typing import Any
from typing import Literal
import warnings

import pytorch_lightning as pl
from pytorch_lightning.utilities.model_helpers import is_overridden
import torch
from torch import Tensor
from torch import nn
from torch.nn.utils import parametrize

from droptune.config import TrainConfig
from droptune.data import TensorDataModule
from droptune.exceptions import PopulationUnsupported
from droptune.layers import decay_split
from droptune.layers._base import DropoutBase
from droptune.models import PlainModuleWrapper
from droptune.models import build_module
from droptune.models import task_loss
from droptune.models._custom import _prediction
from droptune.population._functional import FunctionalPopulation
from droptune.population._functional import member_tensors


__all__ = ["FUNCTIONAL_FAMILIES", "FunctionalBuild", "UserOptimizer", "build_functional"]

#: Model families whose populations are built with ``torch.func`` from the members' modules.
FUNCTIONAL_FAMILIES = ("custom", "transformer")

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

log = logging.getLogger(__name__)


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


@dataclass
class FunctionalBuild:
    """A functional population and, for a user's ``LightningModule``, its optimizer (None:
    each member's ``train.optimizer``/``lr``/``momentum``, as the built-in families)."""

    network: FunctionalPopulation
    optimizer: UserOptimizer | None


#: Refusals that depend only on the model's structure, by :func:`_structure_key`: later rounds
#: of the same study are refused without building P members again.
_REFUSED: dict[str, str] = {}


def _refuse(name: str, reason: str, structural: bool = True) -> PopulationUnsupported:
    exc = PopulationUnsupported(f"{name} cannot train as a population: {reason}")
    exc.structural = structural  # type: ignore[attr-defined]
    return exc


def _structure_key(configs: Sequence[TrainConfig]) -> str:
    """What the structural checks depend on: model, data, dropout kind, precision, max-norm."""
    first = configs[0]
    return json.dumps(
        [
            first.model.model_dump(mode="json"),
            first.data.model_dump(mode="json"),
            first.regularization.dropout.kind,
            first.train.precision,
            any(c.regularization.max_norm is not None for c in configs),
        ],
        sort_keys=True,
    )


def model_name(config: TrainConfig) -> str:
    """The module as messages name it: ``model.target <path>`` or ``model.family <family>``."""
    if config.model.family == "custom":
        return f"model.target {config.model.target}"
    return f"model.family {config.model.family}"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """What ``pl.seed_everything(seed)`` seeds for building a module (torch's CPU generator,
    ``random``, NumPy), restored afterwards; accelerators' generators are left alone."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _members(configs: Sequence[TrainConfig], data: TensorDataModule) -> list[pl.LightningModule]:
    """Each member's module as ``droptune train`` builds it (apply's notes logged once)."""
    modules = []
    quiet = logging.getLogger("droptune.layers")
    level = quiet.level
    for index, config in enumerate(configs):
        with _seeded(config.train.seed), warnings.catch_warnings():
            if index:
                warnings.simplefilter("ignore")
                quiet.setLevel(logging.ERROR)
            try:
                with torch.device("cpu"):
                    modules.append(build_module(config, data))
            finally:
                quiet.setLevel(level)
    return modules


def _network(module: pl.LightningModule) -> tuple[nn.Module, bool]:
    """(the module whose forward the population calls, whether it is a user LightningModule)."""
    if isinstance(module, PlainModuleWrapper):
        return module.net, False
    net = getattr(module, "net", None)
    if type(module).__module__.startswith("droptune.") and isinstance(net, nn.Module):
        return net, False  # RegularizedModule: forward is net(x), loss the task loss
    return module, True


def _same_structure(name: str, nets: Sequence[nn.Module]) -> None:
    first = {k: tuple(t.shape) for k, t in member_tensors(nets[0]).items()}
    for index, net in enumerate(nets[1:], start=1):
        other = {k: tuple(t.shape) for k, t in member_tensors(net).items()}
        if other != first:
            diff = sorted(set(first.items()) ^ set(other.items()))[:2]
            raise _refuse(
                name,
                f"member {index}'s module has other tensors than member 0's ({diff}); the "
                "members of a population must have one structure",
            )


def _float_attributes(net: nn.Module) -> dict[str, float]:
    out = {}
    for path, module in net.named_modules():
        if isinstance(module, DropoutBase):
            continue  # rates of droptune's dropout become [P] buffers
        for attr, value in vars(module).items():
            if isinstance(value, float) and not attr.startswith("__"):
                out[f"{path}.{attr}" if path else attr] = value
    return out


def _same_floats(name: str, nets: Sequence[nn.Module]) -> None:
    first = _float_attributes(nets[0])
    for net in nets[1:]:
        other = _float_attributes(net)
        for key, value in first.items():
            theirs = other.get(key)
            same = theirs == value or (
                theirs is not None and math.isnan(theirs) and math.isnan(value)
            )
            if not same:
                reason = (
                    f"{key} is a float the module reads itself (a dropout rate a library "
                    f"passes to F.dropout or attention), and it differs between members: "
                    f"{value}, {theirs}; one population holds one value of it (group the "
                    "trials by it, or give the model a dropout module there)"
                )
                raise _refuse(name, reason, structural=False)


def _rates(name: str, nets: Sequence[nn.Module]) -> dict[str, Tensor]:
    """``[P]`` rate buffers set on the template's dropout modules (all-zero sites stay 0.0)."""
    template = nets[0]
    rates: dict[str, Tensor] = {}
    for path, module in template.named_modules():
        if not isinstance(module, DropoutBase):
            continue
        values = []
        for net in nets:
            other = net.get_submodule(path)
            assert isinstance(other, DropoutBase)
            p = other.p
            if isinstance(p, Tensor):
                raise _refuse(name, f"{path} already holds population rates {tuple(p.shape)}")
            values.append(float(p))
        if any(values):
            module.set_rate(torch.tensor(values))
            assert isinstance(module.p, Tensor)
            rates[f"{path}.p" if path else "p"] = module.p
    return rates


def _max_norm_keys(name: str, net: nn.Module, needed: bool) -> set[str]:
    """Keys of the weights ``max_norm_`` projects (as ``droptune.layers.max_norm_``)."""
    ids = {id(t): k for k, t in member_tensors(net).items()}
    keys: set[str] = set()
    for path, sub in net.named_modules():
        if not isinstance(sub, nn.Linear | nn.modules.conv._ConvNd):
            continue
        if isinstance(sub, nn.modules.conv._ConvTransposeNd):
            if needed:
                raise _refuse(name, f"{path}: max_norm of a transposed convolution")
            continue
        if parametrize.is_parametrized(sub, "weight"):
            plist: Any = sub.parametrizations["weight"]  # type: ignore[index]
            if not plist.is_tensor:
                if needed:
                    raise _refuse(name, f"{path}: max_norm of a weight split by a parametrization")
                continue
            weight = plist.original
        else:
            weight = sub.weight
        if isinstance(weight, Tensor) and id(weight) in ids:
            keys.add(ids[id(weight)])
    return keys


# ----------------------------------------------------------------------------------------------
# a user's LightningModule


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


def _check_lightning(
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


# ----------------------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def build_functional(
    configs: Sequence[TrainConfig],
    data: TensorDataModule,
    device: torch.device,
    dtype: torch.dtype,
) -> FunctionalBuild:
    """The functional population of ``configs`` on ``device``, checked and trial-run.

    Raises:
        PopulationUnsupported: The model does not qualify (see the module docstring); the
            message names it and the reason.
    """
    key = _structure_key(configs)
    if key in _REFUSED:
        raise PopulationUnsupported(_REFUSED[key])
    try:
        return _build(configs, data, device, dtype)
    except PopulationUnsupported as exc:
        if getattr(exc, "structural", False):
            _REFUSED[key] = str(exc)
        raise


def _build(
    configs: Sequence[TrainConfig],
    data: TensorDataModule,
    device: torch.device,
    dtype: torch.dtype,
) -> FunctionalBuild:
    name = model_name(configs[0])
    try:
        modules = _members(configs, data)
    except Exception as exc:  # the single path reports its own error
        reason = f"building its members failed ({_short(exc)})"
        raise _refuse(name, reason, structural=False) from exc
    pairs = [_network(m) for m in modules]
    nets = [net for net, _ in pairs]
    name = f"{name} ({type(nets[0]).__name__})"
    _same_structure(name, nets)
    _same_floats(name, nets)
    optimizer = None
    if pairs[0][1]:
        optimizer = _check_lightning(name, configs, modules[0], data)
    needs_max_norm = any(c.regularization.max_norm is not None for c in configs)
    max_norm = _max_norm_keys(name, nets[0], needs_max_norm)
    ids = {id(t): k for k, t in member_tensors(nets[0]).items()}
    decayed = {ids[id(p)] for p in decay_split(nets[0])[0] if id(p) in ids}
    states = [member_tensors(net) for net in nets]
    template = copy.deepcopy(nets[0])
    rates = _rates(name, [template, *nets[1:]])
    network = FunctionalPopulation(
        template,
        states,
        rates,
        decayed=decayed,
        max_norm=max_norm,
        head=_prediction,
        name=name,
    ).to(device, dtype)
    _probe(name, network, nets, data, device, dtype)
    return FunctionalBuild(network, optimizer)


def _probe(
    name: str,
    network: FunctionalPopulation,
    nets: Sequence[nn.Module],
    data: TensorDataModule,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """One vmapped training step's forward and backward on a small batch (state restored), and
    member outputs in eval mode against the members' own modules."""
    x, _ = data.splits["train"]
    batch = x[:4].to(device, dtype if x.is_floating_point() else x.dtype)
    saved = {k: v.detach().clone() for k, v in network.state_dict(keep_vars=True).items()}
    rows = sorted({0, network.size - 1})
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            network.eval()  # first: the training step below moves batch-norm statistics
            with torch.no_grad():
                got = network(batch)
                for row in rows:
                    own = copy.deepcopy(nets[row]).to(device, dtype).eval()
                    expected = _prediction(own(batch))
                    if not torch.allclose(got[row], expected, rtol=1e-4, atol=1e-5):
                        raise _refuse(
                            name,
                            f"member {row}'s vmapped output differs from its own module's "
                            "(it keeps tensors outside its parameters and buffers, or its "
                            "forward depends on state vmap does not see)",
                        )
            network.train()
            out = network(batch)
            if out.dim() < 2 or out.shape[:2] != (network.size, len(batch)):
                raise _refuse(name, f"its vmapped output has shape {tuple(out.shape)}")
            out.float().square().mean().backward()
            params = [p for p in network.parameters() if p.requires_grad]
            if any(p.grad is not None and not bool(p.grad.isfinite().all()) for p in params):
                raise _refuse(name, "its vmapped backward gives non-finite gradients")
    except PopulationUnsupported:
        raise
    except Exception as exc:  # whatever vmap refuses: one trial at a time
        raise _refuse(
            name, f"its forward/backward does not run under torch.func.vmap ({_short(exc)})"
        ) from exc
    finally:
        with torch.no_grad():
            for key, value in network.state_dict(keep_vars=True).items():
                value.copy_(saved[key])
        for param in network.parameters():
            param.grad = None
        network.train()
    log.debug("%s: functional population of %d members ready", name, network.size)
