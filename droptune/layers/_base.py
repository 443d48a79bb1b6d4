"""Shared machinery of droptune's dropout modules: rate validation and population rates.

A rate is either a float ``p`` (one model) or a 1-D tensor of shape ``[P]`` (a *population* of P
models trained as one batched network, whose activations have a leading ``[P, ...]`` axis). The
mask arithmetic is written once here so that every kind treats both cases the same way.

Inside ``torch.func.vmap`` over a population (``droptune.population``'s functional networks:
the ``[P]`` rate buffer is passed, stacked, to ``functional_call``), a module sees one member: its
rate is a 0-d tensor and its input has no ``P`` axis. That case is the single model's layout with
a tensor rate: :attr:`DropoutBase.population` is ``None`` and :meth:`DropoutBase.keep_view` is
a 0-d keep probability that broadcasts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch import nn

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError


__all__ = ["DropoutBase", "Rate", "check_rate"]

Rate = float | Tensor


def check_rate(kind: str, p: object) -> Rate:
    """Validate a dropout rate and return it as a float or a detached float tensor.

    Args:
        kind: The dropout kind, used in the error message.
        p: A number in ``[0, 1)`` or a 1-D tensor of such numbers (one per population member).

    Raises:
        ConfigError: If ``p`` is not a number or 1-D tensor, or any rate lies outside ``[0, 1)``.

    Example:
        >>> check_rate("standard", 0.5)
        0.5
    """
    if isinstance(p, Tensor):
        if p.dim() != 1 or p.numel() == 0:
            raise ConfigError(
                f"{kind} dropout: a rate tensor must be 1-D with one rate per population member "
                f"(shape [P]), got shape {tuple(p.shape)}"
            )
        rates = p.detach().to(torch.float32)
        bad = ~((rates >= 0) & (rates < 1))
        if bool(bad.any()):
            raise ConfigError(
                f"{kind} dropout: every rate must satisfy 0 <= p < 1, got {rates.tolist()}"
            )
        return rates.clone()
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise ConfigError(
            f"{kind} dropout: rate p must be a float in [0, 1) or a 1-D tensor of such floats, "
            f"got {type(p).__name__} {p!r}"
        )
    value = float(p)
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ConfigError(f"{kind} dropout: rate p must satisfy 0 <= p < 1, got p={value}")
    return value


class DropoutBase(nn.Module):
    """Base class of droptune's activation dropout modules.

    Subclasses set :attr:`kind` and implement ``forward``; they start with
    ``if self.skip: return x`` so that eval mode and a zero rate cost nothing.

    The rate lives in :attr:`p`: a float, or a non-persistent buffer of shape ``[P]`` that moves
    with ``.to(device)`` and never enters ``state_dict`` (so a checkpoint does not depend on
    whether the model was trained alone or in a population). Change it with :meth:`set_rate`.
    """

    kind: ClassVar[str] = "base"
    p: Rate

    def __init__(self, p: Rate = 0.5) -> None:
        super().__init__()
        self.set_rate(p)

    def set_rate(self, p: Rate) -> None:
        """Replace the rate (float or ``[P]`` tensor), validating it first."""
        rate = check_rate(self.kind, p)
        old = self._buffers.pop("p", None)
        self.__dict__.pop("p", None)
        if isinstance(rate, Tensor):
            device = old.device if old is not None else rate.device
            self.register_buffer("p", rate.to(device), persistent=False)
        else:
            self.p = rate

    @property
    def population(self) -> int | None:
        """The population size P when the rate is a ``[P]`` tensor, else ``None`` (a float, or
        one member's 0-d rate inside ``vmap``: the input has no population axis then)."""
        if isinstance(self.p, Tensor) and self.p.dim() == 1:
            return int(self.p.shape[0])
        return None

    @property
    def skip(self) -> bool:
        """True when forward must return its input unchanged (eval mode or a zero float rate)."""
        return not self.training or (not isinstance(self.p, Tensor) and self.p == 0.0)

    def keep_view(self, x: Tensor, ndim: int) -> Tensor:
        """The keep probabilities ``1 - p`` shaped ``[P, 1, ..., 1]`` (``ndim`` dims) for ``x``
        (a 0-d tensor for a 0-d rate, see the module docstring).

        Raises:
            InputShapeError: If ``x``'s leading axis is not the population size.
        """
        assert isinstance(self.p, Tensor)
        if self.p.dim() == 0:  # one member's rate inside vmap: a scalar keep probability
            return (1.0 - self.p).to(device=x.device, dtype=x.dtype)
        if x.dim() == 0 or x.shape[0] != self.p.numel():
            raise InputShapeError(
                f"{self.kind} dropout with {self.p.numel()} population rates expects an input "
                f"whose leading axis has size {self.p.numel()} ([P, N, ...]), got shape "
                f"{tuple(x.shape)}"
            )
        keep = (1.0 - self.p).to(device=x.device, dtype=x.dtype)
        return keep.view(-1, *([1] * (ndim - 1)))

    def scaled_mask(self, x: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """A Bernoulli keep-mask of ``shape`` (broadcastable to ``x``) divided by the keep rate.

        Kept entries equal ``1 / (1 - p)`` and dropped ones 0, so ``x * mask`` preserves the
        expectation (inverted dropout). With population rates each member ``i`` along the
        leading axis uses its own ``p[i]``.
        """
        if isinstance(self.p, Tensor):
            keep = self.keep_view(x, len(shape))
            rand = torch.rand(shape, device=x.device, dtype=x.dtype)
            return (rand < keep).to(x.dtype).div_(keep)
        keep_f = 1.0 - self.p
        return x.new_empty(shape).bernoulli_(keep_f).div_(keep_f)

    def extra_repr(self) -> str:
        if isinstance(self.p, Tensor):
            return f"p=[population of {self.p.numel()}: {_short(self.p)}]"
        return f"p={self.p}"


def _short(p: Tensor, shown: int = 4) -> str:
    values = [f"{v:.3g}" for v in p[:shown].tolist()]
    return ", ".join(values) + (", ..." if p.numel() > shown else "")
