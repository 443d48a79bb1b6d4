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
* a ``LightningModule`` (checked in ``_lightning``): automatic optimization; none of the
  training-loop hooks overridden (``_LOOP_HOOKS``); ``training_step`` returns the task loss of
  ``forward`` (cross-entropy or MSE, ``model.loss``) and ``validation_step`` logs ``val_loss``
  equal to it, checked on one batch with dropout off; ``configure_optimizers`` gives one Adam,
  AdamW or SGD (no nesterov, dampening or amsgrad) over every trainable parameter with one
  learning rate, and at most one learning-rate scheduler stepped once per epoch without a
  monitored metric;
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
from collections.abc import Sequence
import contextlib
import copy
from dataclasses import dataclass
import json
import logging
import math
import random
from typing import Any
import warnings

import pytorch_lightning as pl
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
from droptune.models._custom import _prediction
from droptune.population._functional import FunctionalPopulation
from droptune.population._functional import member_tensors
from droptune.population._lightning import UserOptimizer
from droptune.population._lightning import _refuse
from droptune.population._lightning import _short
from droptune.population._lightning import check_lightning


__all__ = ["FUNCTIONAL_FAMILIES", "FunctionalBuild", "UserOptimizer", "build_functional"]

log = logging.getLogger(__name__)

#: Model families whose populations are built with ``torch.func`` from the members' modules.
FUNCTIONAL_FAMILIES = ("custom", "transformer")


@dataclass
class FunctionalBuild:
    """A functional population and, for a user's ``LightningModule``, its optimizer (None:
    each member's ``train.optimizer``/``lr``/``momentum``, as the built-in families)."""

    network: FunctionalPopulation
    optimizer: UserOptimizer | None


#: Refusals that depend only on the model's structure, by :func:`_structure_key`: later rounds
#: of the same study are refused without building P members again.
_REFUSED: dict[str, str] = {}


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
                # rate-dependent (DropConnect adds a parametrization only for a rate > 0):
                # another round's members may agree, so this is not remembered
                structural=False,
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
        optimizer = check_lightning(name, configs, modules[0], data)
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
    """Vmapped training steps' forward and backward on a full batch and on the epoch's last,
    smaller one (a forward may depend on the batch's size), and member outputs in eval mode
    against the members' own modules (state restored)."""
    x, _ = data.splits["train"]
    size = max(1, min(int(getattr(data, "batch_size", 4)), len(x)))
    batch = x[:size].to(device, dtype if x.is_floating_point() else x.dtype)
    sizes = [size] + ([len(x) % size] if len(x) % size else [])
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
            for rows_in_batch in sizes:
                out = network(batch[:rows_in_batch])
                if out.dim() < 2 or out.shape[:2] != (network.size, rows_in_batch):
                    raise _refuse(name, f"its vmapped output has shape {tuple(out.shape)}")
                out.float().square().mean().backward()
            params = [p for p in network.parameters() if p.requires_grad]
            if any(p.grad is not None and not bool(p.grad.isfinite().all()) for p in params):
                raise _refuse(name, "its vmapped backward gives non-finite gradients")
    except PopulationUnsupported:
        raise
    except Exception as exc:  # whatever vmap refuses: one trial at a time
        what = "a trial run of its forward/backward under torch.func.vmap failed"
        reason = f"{what} ({_short(exc)})"
        raise _refuse(name, reason) from exc
    finally:
        with torch.no_grad():
            for key, value in network.state_dict(keep_vars=True).items():
                value.copy_(saved[key])
        for param in network.parameters():
            param.grad = None
        network.train()
    log.debug("%s: functional population of %d members ready", name, network.size)
