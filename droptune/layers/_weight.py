"""DropConnect / weight drop for ``nn.Linear`` and the hidden-to-hidden weights of RNNs.

References:
    Wan et al. 2013, "Regularization of Neural Networks using DropConnect", ICML.
    Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models" (AWD-LSTM weight drop
    on ``weight_hh``).

Built on :func:`torch.nn.utils.parametrize.register_parametrization` rather than AWD-LSTM's
delete-the-Parameter-and-setattr recipe: that recipe re-registers the raw Parameter in eval and
then raises ``TypeError: cannot assign 'torch.FloatTensor' as parameter`` on the next training
forward (salesforce/awd-lstm-lm#79). A parametrization recomputes the dropped weight at every
access, follows ``.train()``/``.eval()`` and ``.to(device)`` with its module, and keeps the raw
weight as the only parameter (``parametrizations.<name>.original`` in ``state_dict``;
:func:`remove_weight_dropout` restores the plain key).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch import nn
from torch.nn.utils import parametrize

from droptune.exceptions import ConfigError
from droptune.layers._base import DropoutBase
from droptune.layers._base import Rate


__all__ = ["DropConnect", "add_weight_dropout", "remove_weight_dropout"]


class DropConnect(DropoutBase):
    """Parametrization that drops weight entries (or whole rows) with probability p.

    Args:
        p: Drop rate of each weight entry.
        rows: Drop whole rows (all incoming weights of one output unit / gate unit) instead of
            single entries — AWD-LSTM's ``variational`` weight drop.
    """

    kind = "dropconnect"

    def __init__(self, p: Rate = 0.5, rows: bool = False) -> None:
        super().__init__(p)
        self.rows = rows
        # The owner's parameter names in their original order, recorded by
        # add_weight_dropout so that remove_weight_dropout can restore the plain module's
        # state_dict order (parametrize re-registers a removed weight at the end).
        self._param_order: list[str] = []

    def forward(self, weight: Tensor) -> Tensor:
        if self.skip:
            return weight
        lead = (2 if self.population is not None else 1) if self.rows else weight.dim()
        shape = tuple(weight.shape[:lead]) + (1,) * (weight.dim() - lead)
        return weight * self.scaled_mask(weight, shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Identity: assigning to the parametrized weight sets the raw weight."""
        return weight

    def extra_repr(self) -> str:
        return super().extra_repr() + (", rows=True" if self.rows else "")


def _default_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        suffixes = ["", "_reverse"] if module.bidirectional else [""]
        return [f"weight_hh_l{k}{s}" for k in range(module.num_layers) for s in suffixes]
    if isinstance(module, nn.Linear):
        return ["weight"]
    raise ConfigError(
        f"weight dropout: default weights are known for nn.Linear and nn.LSTM/GRU/RNN only, got "
        f"{type(module).__name__}; pass names=[...] explicitly"
    )


def add_weight_dropout(
    module: nn.Module, p: Rate, names: list[str] | None = None, rows: bool = False
) -> nn.Module:
    """Apply DropConnect to ``module``'s weights in place and return the module.

    By default: ``weight`` of an ``nn.Linear``; every ``weight_hh_l*`` of an ``nn.LSTM``,
    ``nn.GRU`` or ``nn.RNN`` (the recurrent weights, as in AWD-LSTM). Calling it again on the
    same weight updates the rate instead of stacking a second mask.

    Example:
        >>> lstm = add_weight_dropout(nn.LSTM(8, 16), p=0.5)
        >>> list(lstm.state_dict())[1]
        'bias_ih_l0'
    """
    for name in names if names is not None else _default_names(module):
        if not isinstance(getattr(module, name, None), Tensor):
            raise ConfigError(
                f"weight dropout: {type(module).__name__} has no weight named {name!r}"
            )
        existing = _find(module, name)
        if existing is not None:
            existing.set_rate(p)
            existing.rows = rows
            continue
        drop = DropConnect(p, rows=rows)
        drop._param_order = list(module._parameters)
        parametrize.register_parametrization(module, name, drop)
    return module


def _find(module: nn.Module, name: str) -> DropConnect | None:
    if not parametrize.is_parametrized(module, name):
        return None
    plist: Any = module.parametrizations[name]  # type: ignore[index]
    for param in plist:
        if isinstance(param, DropConnect):
            return param
    return None


def remove_weight_dropout(model: nn.Module) -> int:
    """Remove every DropConnect parametrization under ``model``, keeping the raw weights.

    Returns:
        How many weights were restored to plain parameters.
    """
    removed = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        order: list[str] = []
        for name in list(module.parametrizations.keys()):  # type: ignore[union-attr, operator]
            found = _find(module, name)
            if found is not None:
                # The first weight registered saw the most names; keep the longest record.
                if len(found._param_order) > len(order):
                    order = found._param_order
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                removed += 1
        if order:
            _reorder_parameters(module, order)
    return removed


def _reorder_parameters(module: nn.Module, order: list[str]) -> None:
    """Put ``module``'s parameters back in ``order`` (names not in it keep their place after)."""
    params = module._parameters
    ordered = {name: params[name] for name in order if name in params}
    ordered.update((name, value) for name, value in params.items() if name not in ordered)
    params.clear()
    params.update(ordered)
