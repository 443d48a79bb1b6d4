"""Functional populations: P copies of any ``nn.Module`` as one batched program (``torch.func``).

The member modules are built one by one (each from its own seed, as the single path builds
them); their parameters and buffers are stacked ``[P, ...]`` and the *template*, one member's
module, is called with them through ``torch.func.functional_call`` inside
``torch.func.vmap(..., randomness="different")``: one forward and one backward for all members,
each with its own weights, batch-norm statistics and dropout masks. The shared batch is not
copied (``in_dims=None``).

Each droptune dropout module of the template holds a ``[P]`` rate buffer, stacked with the
rest: inside ``vmap`` a member sees its own 0-d rate (see :mod:`droptune.layers._base`). A site
whose rate is 0 for every member keeps a float 0 and costs nothing.

:class:`FunctionalPopulation` has the interface of :class:`PopulationNetwork` that the trainer
uses (``forward(x) -> [P, N, out]``, ``decayed_parameters``, ``max_norm_weights``, ``keep``,
``set_active``, ``member_state_dict``), so ``_train``'s loop, optimizer and early stopping serve
both.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch import nn
from torch.func import functional_call
from torch.func import vmap


__all__ = ["FunctionalPopulation", "member_tensors"]


def member_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` by name (a tied tensor once, under its first
    name), the tensors ``functional_call`` replaces."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _attr(index: int, key: str) -> str:
    """An attribute name for the stacked tensor of ``key`` (``.`` is not allowed in names)."""
    return f"m{index}_{key.replace('.', '_')}"


class FunctionalPopulation(nn.Module):
    """P members of one module structure, trained as one vmapped program.

    Args:
        template: One member's module (called with the stacked tensors; its own tensors are not
            trained). Not registered as a submodule: ``.to()`` moves it along, but
            ``parameters()`` are the stacks only.
        states: One :func:`member_tensors` dict per member, all with the template's keys and
            shapes.
        rates: ``{"<dropout module path>.p": [P] rates}`` for the template's dropout modules
            whose rate is a buffer (set with ``set_rate`` on the template).
        decayed: Keys of the parameters L2 acts on.
        max_norm: Keys of the weights max-norm projects (Linear and convolution weights).
        head: Turns the module's output into the tensor the loss reads (e.g. ``logits`` of a
            mapping).
        name: The module's name for messages (``package.module:Class``).
    """

    active: Tensor

    def __init__(
        self,
        template: nn.Module,
        states: Sequence[dict[str, Tensor]],
        rates: dict[str, Tensor],
        *,
        decayed: set[str],
        max_norm: set[str],
        head: Callable[[Any], Tensor],
        name: str,
    ) -> None:
        super().__init__()
        self.__dict__["template"] = template  # bypasses nn.Module registration on purpose
        self.head = head
        self.name = name
        self.all_active = True
        self._keys: list[tuple[str, str]] = []  # (attribute, template key)
        self._param_keys: dict[str, str] = {}
        self._state_buffers: list[str] = []  # attributes of stacked persistent/state buffers
        params = dict(template.named_parameters())
        for index, (key, tensor) in enumerate(member_tensors(template).items()):
            if key in rates:
                continue
            attr = _attr(index, key)
            stacked = torch.stack([state[key].detach() for state in states])
            if key in params:
                self.register_parameter(
                    attr, nn.Parameter(stacked, requires_grad=tensor.requires_grad)
                )
                self._param_keys[key] = attr
            else:
                self.register_buffer(attr, stacked)
                self._state_buffers.append(attr)
            self._keys.append((attr, key))
        for index, (key, rate) in enumerate(rates.items(), start=len(self._keys)):
            attr = _attr(index, key)
            self.register_buffer(attr, rate.clone(), persistent=False)
            self._keys.append((attr, key))
        self.register_buffer("active", torch.ones(len(states)), persistent=False)
        self._decayed = [self._param_keys[k] for k in sorted(decayed) if k in self._param_keys]
        self._max_norm = [self._param_keys[k] for k in sorted(max_norm) if k in self._param_keys]
        # state_dict keys of the single module: persistent entries only, a tied tensor under
        # each of its names
        ids = {id(t): key for key, t in member_tensors(template).items()}
        attrs = dict((key, attr) for attr, key in self._keys)
        self._state_keys = [
            (name, attrs[ids[id(tensor)]])
            for name, tensor in template.state_dict(keep_vars=True).items()
            if id(tensor) in ids and ids[id(tensor)] in attrs
        ]

    @property
    def template(self) -> nn.Module:
        module = self.__dict__["template"]
        assert isinstance(module, nn.Module)
        return module

    @property
    def size(self) -> int:
        """The number of members P (rows of every stacked tensor)."""
        return int(self.active.shape[0])

    def _apply(self, fn: Any, recurse: bool = True) -> FunctionalPopulation:
        super()._apply(fn, recurse)
        self.template._apply(fn, recurse)  # tensors it keeps outside parameters and buffers
        return self

    def train(self, mode: bool = True) -> FunctionalPopulation:
        super().train(mode)
        self.template.train(mode)
        return self

    def _stacked(self, attr: str) -> Tensor:
        value = getattr(self, attr)
        assert isinstance(value, Tensor)
        return value

    def decayed_parameters(self) -> list[Tensor]:
        """The parameters L2 acts on (as :func:`droptune.layers.decay_split` of one member)."""
        return [self._stacked(a) for a in self._decayed]

    def max_norm_weights(self) -> list[Tensor]:
        """The weights max-norm projects (as :func:`droptune.layers.max_norm_` of one member)."""
        return [self._stacked(a) for a in self._max_norm]

    # ----------------------------------------------------------------------------------------
    # forward

    def _member(self, state: dict[str, Tensor], x: Any) -> Tensor:
        return self.head(functional_call(self.template, state, (x,)))

    def forward(self, x: Any) -> Tensor:
        """One shared batch → every member's output ``[P, N, ...]``."""
        state = {key: self._stacked(attr) for attr, key in self._keys}
        frozen = self.training and not self.all_active and bool(self._state_buffers)
        saved = [self._stacked(a).clone() for a in self._state_buffers] if frozen else []
        out = vmap(self._member, in_dims=(0, None), randomness="different")(state, x)
        if frozen:  # frozen members keep their batch-norm statistics
            with torch.no_grad():
                for attr, before in zip(self._state_buffers, saved, strict=True):
                    buffer = self._stacked(attr)
                    keep = self.active.bool().view(-1, *([1] * (buffer.dim() - 1)))
                    buffer.copy_(torch.where(keep, buffer, before))
        return out

    # ----------------------------------------------------------------------------------------
    # members

    @torch.no_grad()
    def member_state_dict(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s weights as the ``state_dict`` of its own module."""
        return {key: self._stacked(a)[index].detach().clone() for key, a in self._state_keys}

    @torch.no_grad()
    def load_members(self, states: Sequence[dict[str, Tensor]]) -> None:
        """Copy one ``state_dict`` of the member module per member into the stacks."""
        if len(states) != self.size:
            raise ValueError(f"expected {self.size} state dicts, got {len(states)}")
        for key, attr in self._state_keys:
            self._stacked(attr).copy_(torch.stack([state[key] for state in states]))

    @torch.no_grad()
    def set_active(self, mask: Tensor) -> None:
        """Mark members active (True) or frozen (False); frozen batch-norm statistics stay."""
        self.active.copy_(mask.to(self.active))
        self.all_active = bool(mask.all())

    @torch.no_grad()
    def keep(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (in that order) in every stack and rate."""
        index = index.to(self.active.device)
        for name, param in list(self._parameters.items()):
            if param is not None:
                fresh = nn.Parameter(param.detach().index_select(0, index).clone())
                fresh.requires_grad_(param.requires_grad)
                self._parameters[name] = fresh
        for name, buffer in list(self._buffers.items()):
            if buffer is not None:
                self._buffers[name] = buffer.index_select(0, index.to(buffer.device))
        self.all_active = bool(self.active.bool().all())
