"""Stacked layers of population networks: P copies of one layer as ``[P, ...]`` tensors.

Each layer computes, member by member, the single network's layer with that member's weights:
dense layers are batched matrix products (``baddbmm``) over ``[P, N, F]`` activations;
convolutions are grouped convolutions over ``[N, P·C, ...]`` (P folded into the channels, so
batch norm per member is ``F.batch_norm`` over ``P·C`` channels and ``GroupNorm(1, C)`` per member
is ``group_norm`` with P groups); recurrent layers are Gal & Ghahramani GRU/LSTM cells stepped
over time with one ``baddbmm`` per step for all members. :class:`PopulationNetwork` (in
``_networks``) assembles them into a family's network.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import math
import re
from typing import Any
from typing import Literal

import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.config import TrainConfig
from droptune.exceptions import ConfigError
from droptune.layers import DropConnect
from droptune.layers import make_dropout


__all__: list[str] = []  # private to droptune.population

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "selu": F.selu,
    "elu": F.elu,
}

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_EPS = 1e-5  # the default eps of BatchNorm, LayerNorm and GroupNorm
_BN_MOMENTUM = 0.1


def _key(qualname: str, local: str) -> str:
    """The single network's ``state_dict`` key of ``<qualname>.<local>`` without DropConnect
    (with it, a weight's key is ``<qualname>.parametrizations.<local>.original``)."""
    return f"{qualname}.{local}" if qualname else local


_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _plain(key: str) -> str:
    """``a.parametrizations.weight.original`` → ``a.weight``."""
    return _PARAMETRIZED.sub(r"\1\2", key)


def _parametrized(key: str) -> str:
    """``a.weight`` → ``a.parametrizations.weight.original``."""
    owner, _, local = key.rpartition(".")
    return (
        f"{owner}.parametrizations.{local}.original"
        if owner
        else f"parametrizations.{local}.original"
    )


def _site_dropout(
    configs: Sequence[TrainConfig],
    site: str,
    rate_field: str | None = None,
    max_block: int | None = None,
) -> nn.Module | None:
    """The population dropout of ``site`` with each member's rate; None when all rates are 0.

    Sequences are laid out time-major per member (``[P, T, N, F]``), hence
    ``batch_first=False`` for variational dropout.
    """
    rates: list[float] = []
    kind, options = "none", dict[str, Any]()
    for config in configs:
        drop = config.regularization.dropout
        kind, rate, options = drop.for_site(site)
        rates.append(drop.rate(rate_field) if rate_field is not None else rate)
    if kind == "none" or not any(rates):
        return None
    if kind == "variational":
        options["batch_first"] = False
    if kind == "dropblock" and max_block is not None:
        options["block_size"] = min(options["block_size"], max_block)
    return make_dropout(kind, torch.tensor(rates), **options)


def _weight_drop(configs: Sequence[TrainConfig], field: str) -> DropConnect | None:
    rates = [c.regularization.dropout.rate(field) for c in configs]
    return DropConnect(torch.tensor(rates)) if any(rates) else None


def _uniform_(tensor: Tensor, bound: float, generators: Sequence[torch.Generator]) -> None:
    for row, generator in zip(tensor, generators, strict=True):
        row.uniform_(-bound, bound, generator=generator)


def _dense_init_(
    weight: Tensor, bias: Tensor, generators: Sequence[torch.Generator], selu: bool
) -> None:
    """torch's ``nn.Linear``/``nn.ConvNd`` init — U(±1/√fan_in) for weight and bias — or
    droptune's LeCun-normal one for SELU networks (``_init_selu``), per member."""
    fan_in = weight[0, 0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    if selu:
        for row, generator in zip(weight, generators, strict=True):
            row.normal_(0.0, bound, generator=generator)
        bias.zero_()
        return
    _uniform_(weight, bound, generators)
    _uniform_(bias, bound, generators)


class _Stacked(nn.Module):
    """A layer of P members. ``sources`` maps each local tensor name to its single-network
    ``state_dict`` key (without DropConnect); ``weight_drops`` the locals that carry a
    DropConnect mask (a member with a non-zero rate has the parametrized key); ``decayed``
    names the parameters that L2 decays (weights, not biases or norm parameters);
    ``max_norm`` the weights that max-norm projects."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, str] = {}
        self.weight_drops: dict[str, DropConnect] = {}
        self.decayed: set[str] = set()
        self.max_norm: set[str] = set()

    def reset_(self, generators: Sequence[torch.Generator], selu: bool) -> None:
        """Draw fresh initial values, member ``i`` from ``generators[i]``."""


class _Linear(_Stacked):
    """P ``nn.Linear`` layers: weight ``[P, out, in]``, bias ``[P, out]``; optional DropConnect."""

    def __init__(
        self, size: int, template: nn.Linear, qualname: str, weight_drop: DropConnect | None
    ) -> None:
        super().__init__()
        out_f, in_f = template.out_features, template.in_features
        self.weight = nn.Parameter(torch.zeros(size, out_f, in_f))
        self.bias = nn.Parameter(torch.zeros(size, out_f))
        self.weight_drop = weight_drop
        self.sources = {n: _key(qualname, n) for n in ("weight", "bias")}
        if weight_drop is not None:
            self.weight_drops["weight"] = weight_drop
        self.decayed = {"weight"}
        self.max_norm = {"weight"}

    def reset_(self, generators: Sequence[torch.Generator], selu: bool) -> None:
        _dense_init_(self.weight.data, self.bias.data, generators, selu)

    def _weight(self) -> Tensor:
        return self.weight if self.weight_drop is None else self.weight_drop(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``[P, N, in] → [P, N, out]``."""
        return torch.baddbmm(self.bias.unsqueeze(1), x, self._weight().transpose(1, 2))

    def shared(self, x: Tensor) -> Tensor:
        """The same input ``[N, in]`` for every member → ``[P, N, out]``, one GEMM."""
        weight = self._weight()
        size, out_f, in_f = weight.shape
        flat = torch.mm(x, weight.reshape(size * out_f, in_f).t())
        return flat.view(x.shape[0], size, out_f).transpose(0, 1) + self.bias.unsqueeze(1)


class _Norm(_Stacked):
    """Per-member batch norm or layer norm (``GroupNorm(1, C)`` for convolutions).

    Dense activations are ``[P, N, W]``; convolutional ones ``[N, P·C, ...]``. Batch norm keeps
    one set of running statistics per member; a member whose ``active`` weight is 0 (frozen)
    keeps its statistics unchanged.
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, size: int, template: nn.Module, qualname: str, conv: bool) -> None:
        super().__init__()
        if isinstance(template, nn.modules.batchnorm._BatchNorm):
            self.kind: Literal["batch", "layer"] = "batch"
            width = template.num_features
        elif isinstance(template, nn.LayerNorm | nn.GroupNorm):
            self.kind = "layer"
            width = (
                template.num_channels
                if isinstance(template, nn.GroupNorm)
                else template.normalized_shape[0]
            )
        else:
            raise ConfigError(f"population networks have no {type(template).__name__}")
        self.conv = conv
        self.weight = nn.Parameter(torch.ones(size, width))
        self.bias = nn.Parameter(torch.zeros(size, width))
        names = ["weight", "bias"]
        if self.kind == "batch":
            self.register_buffer("running_mean", torch.zeros(size, width))
            self.register_buffer("running_var", torch.ones(size, width))
            self.register_buffer("num_batches_tracked", torch.zeros(size, dtype=torch.long))
            names += ["running_mean", "running_var", "num_batches_tracked"]
        self.sources = {n: _key(qualname, n) for n in names}

    def reset_(self, generators: Sequence[torch.Generator], selu: bool) -> None:
        self.weight.data.fill_(1.0)
        self.bias.data.zero_()
        if self.kind == "batch":
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, active: Tensor, all_active: bool) -> Tensor:
        if self.conv:
            return self._conv(x, active, all_active)
        if self.kind == "layer":
            y = F.layer_norm(x, x.shape[-1:], eps=_EPS)
        elif self.training:
            mean = x.mean(1, keepdim=True)
            var = x.var(1, unbiased=False, keepdim=True)
            self._track(mean.squeeze(1), var.squeeze(1), x.shape[1], active)
            y = (x - mean) * torch.rsqrt(var + _EPS)
        else:
            mean, var = self.running_mean.unsqueeze(1), self.running_var.unsqueeze(1)
            y = (x - mean) * torch.rsqrt(var + _EPS)
        return torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1))

    @torch.no_grad()
    def _track(self, mean: Tensor, var: Tensor, n: int, active: Tensor) -> None:
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n}")
        weight = (_BN_MOMENTUM * active).to(mean.dtype).unsqueeze(1)
        self.running_mean.lerp_(mean.detach(), weight)
        self.running_var.lerp_(var.detach() * (n / (n - 1)), weight)
        self.num_batches_tracked.add_(active.to(torch.long))

    def _conv(self, x: Tensor, active: Tensor, all_active: bool) -> Tensor:
        size = self.weight.shape[0]
        weight, bias = self.weight.reshape(-1), self.bias.reshape(-1)
        if self.kind == "layer":
            return F.group_norm(x, size, weight, bias, _EPS)
        if not self.training or all_active:
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(
                x,
                self.running_mean.view(-1),
                self.running_var.view(-1),
                weight,
                bias,
                self.training,
                _BN_MOMENTUM,
                _EPS,
            )
        mean, var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(x, mean.view(-1), var.view(-1), weight, bias, True, _BN_MOMENTUM, _EPS)
        with torch.no_grad():
            keep = active.to(mean.dtype).unsqueeze(1)
            self.running_mean.lerp_(mean, keep)
            self.running_var.lerp_(var, keep)
            self.num_batches_tracked.add_(active.to(torch.long))
        return y


class _Conv(_Stacked):
    """P ``nn.Conv1d/2d`` layers as one grouped convolution over ``[N, P·C, ...]``."""

    def __init__(self, size: int, template: nn.modules.conv._ConvNd, qualname: str) -> None:
        super().__init__()
        self.dims = len(template.kernel_size)
        self.padding = template.padding
        self.weight = nn.Parameter(torch.zeros(size, *template.weight.shape))
        self.bias = nn.Parameter(torch.zeros(size, template.out_channels))
        self.sources = {n: _key(qualname, n) for n in ("weight", "bias")}
        self.decayed = {"weight"}
        self.max_norm = {"weight"}

    def reset_(self, generators: Sequence[torch.Generator], selu: bool) -> None:
        _dense_init_(self.weight.data, self.bias.data, generators, selu)

    def forward(self, x: Tensor, shared: bool = False) -> Tensor:
        """``[N, P·C_in, ...]`` (or the shared ``[N, C_in, ...]``) → ``[N, P·C_out, ...]``."""
        size = self.weight.shape[0]
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        conv = F.conv1d if self.dims == 1 else F.conv2d
        groups = 1 if shared else size
        return conv(x, weight, self.bias.reshape(-1), 1, self.padding, 1, groups)


class _Recurrent(_Stacked):
    """One single-layer (possibly bidirectional) variational GRU or LSTM for P members.

    Per direction, like :class:`droptune.layers.VariationalGRU`: the input projection of all
    steps at once, then one ``baddbmm`` per step on the (masked) hidden state. The recurrent
    mask (``recurrent_rate``) and the DropConnect mask on ``weight_hh`` are drawn once per
    forward call per direction and reused at every step.
    """

    recurrent_rate: Tensor

    def __init__(
        self,
        size: int,
        template: nn.RNNBase,
        qualname: str,
        recurrent_rates: Tensor,
        weight_drop: DropConnect | None,
    ) -> None:
        super().__init__()
        self.cell = "lstm" if isinstance(template, nn.LSTM) else "gru"
        self.hidden_size = template.hidden_size
        self.directions = 2 if template.bidirectional else 1
        self.weight_drop = weight_drop
        self.register_buffer("recurrent_rate", recurrent_rates.clone(), persistent=False)
        self.has_mask = bool((recurrent_rates > 0).any())
        for direction in range(self.directions):
            suffix = "_reverse" if direction else ""
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                local = f"{name}_l0{suffix}"
                shape = getattr(template, local).shape
                self.register_parameter(local, nn.Parameter(torch.zeros(size, *shape)))
                self.sources[local] = _key(qualname, local)
                if name.startswith("weight"):
                    self.decayed.add(local)
                if name == "weight_hh" and weight_drop is not None:
                    self.weight_drops[local] = weight_drop

    def reset_(self, generators: Sequence[torch.Generator], selu: bool) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.RNNBase.reset_parameters
        for param in self._parameters.values():
            assert param is not None
            _uniform_(param.data, bound, generators)

    def recurrent_mask(self, h: Tensor) -> Tensor:
        """One Gal & Ghahramani mask per sequence for the state ``h`` ``[P, N, H]``: member
        ``i`` keeps each unit with probability ``1 - recurrent_rate[i]``, scaled by its
        inverse."""
        keep = (1.0 - self.recurrent_rate).to(h.dtype).view(-1, 1, 1)
        return (torch.rand_like(h) < keep).to(h.dtype).div_(keep)

    def _param(self, name: str) -> Tensor:
        value = getattr(self, name)
        assert isinstance(value, Tensor)
        return value

    def forward(self, x: Tensor, shared: bool = False) -> tuple[Tensor, Tensor]:
        """``[P, T, N, F]`` (or shared ``[T, N, F]``) → outputs ``[P, T, N, D·H]`` and the
        final hidden states ``[P, N, D·H]`` (forward direction first)."""
        outputs: list[Tensor] = []
        finals: list[Tensor] = []
        for direction in range(self.directions):
            suffix = "_reverse" if direction else ""
            out, last = self._direction(x, shared, suffix, reverse=bool(direction))
            outputs.append(out)
            finals.append(last)
        return torch.cat(outputs, dim=-1), torch.cat(finals, dim=-1)

    def _direction(
        self, x: Tensor, shared: bool, suffix: str, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        w_ih, b_ih = self._param(f"weight_ih_l0{suffix}"), self._param(f"bias_ih_l0{suffix}")
        w_hh, b_hh = self._param(f"weight_hh_l0{suffix}"), self._param(f"bias_hh_l0{suffix}")
        if self.weight_drop is not None:
            w_hh = self.weight_drop(w_hh)  # one mask for the whole sequence
        size, gates = w_ih.shape[0], w_ih.shape[1]
        if shared:  # [T, N, F] @ every member's W_ih in one GEMM
            steps, batch, features = x.shape
            flat = torch.mm(x.reshape(steps * batch, features), w_ih.reshape(-1, features).t())
            gates_in = flat.view(steps, batch, size, gates).permute(2, 0, 1, 3)
            gates_in = gates_in + b_ih[:, None, None, :]
        else:
            _, steps, batch, features = x.shape
            gates_in = torch.baddbmm(
                b_ih.unsqueeze(1), x.reshape(size, steps * batch, features), w_ih.transpose(1, 2)
            ).view(size, steps, batch, gates)
        h = gates_in.new_zeros(size, batch, self.hidden_size)
        c = torch.zeros_like(h) if self.cell == "lstm" else h
        mask = self.recurrent_mask(h) if self.training and self.has_mask else None
        w_hh_t, b_hh = w_hh.transpose(1, 2), b_hh.unsqueeze(1)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        out: list[Tensor] = [h] * steps
        for t in order:
            gh = torch.baddbmm(b_hh, h if mask is None else h * mask, w_hh_t)
            gi = gates_in[:, t]
            if self.cell == "lstm":
                i, f, g, o = (gi + gh).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                r_i, z_i, n_i = gi.chunk(3, dim=-1)
                r_h, z_h, n_h = gh.chunk(3, dim=-1)
                r = torch.sigmoid(r_i + r_h)
                z = torch.sigmoid(z_i + z_h)
                n = torch.tanh(n_i + r * n_h)
                h = (1.0 - z) * n + z * h
            out[t] = h
        return torch.stack(out, dim=1), h


def _member_major(x: Tensor, size: int) -> Tensor:
    """``[N, P·C, ...]`` → a ``[P, N, C, ...]`` view."""
    return x.view(x.shape[0], size, -1, *x.shape[2:]).movedim(1, 0)


def _channel_major(x: Tensor) -> Tensor:
    """``[P, N, C, ...]`` → ``[N, P·C, ...]``."""
    moved = x.movedim(0, 1)
    return moved.reshape(moved.shape[0], -1, *moved.shape[3:])
