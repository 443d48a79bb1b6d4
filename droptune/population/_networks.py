"""Population networks: P networks of one built-in family as stacked parameters ``[P, ...]``.

Member ``i`` computes the same function as ``build_network(config_i, info)`` with the same
weights: dense layers are batched matrix products (``baddbmm``) over ``[P, N, F]`` activations;
convolutions are grouped convolutions over ``[N, P·C, ...]`` (P folded into the channels, so
batch norm per member is ``F.batch_norm`` over ``P·C`` channels and ``GroupNorm(1, C)`` per member
is ``group_norm`` with P groups); recurrent layers are Gal & Ghahramani GRU/LSTM cells stepped
over time with one ``baddbmm`` per step for all members (the stacked layers are in
``_stacked``). Dropout uses droptune's layers with a ``[P]`` rate tensor (one rate per member);
a site whose rate is 0 for every member is skipped.

A layer that reads the shared input (no input dropout) does it with one GEMM against all members'
weights (``[N, F] @ [F, P·H]``) instead of P copies of the input.

Every stacked tensor maps to one key of the single network's ``state_dict``
(:meth:`PopulationNetwork.member_state_dict`), so a member's weights load into
``build_network(config, info)`` and vice versa (:meth:`PopulationNetwork.load_members`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.config import TrainConfig
from droptune.data import DataInfo
from droptune.exceptions import ConfigError
from droptune.layers import DropConnect
from droptune.models import build_network
from droptune.population._stacked import _ACTIVATIONS
from droptune.population._stacked import _NORMS
from droptune.population._stacked import _channel_major
from droptune.population._stacked import _Conv
from droptune.population._stacked import _Linear
from droptune.population._stacked import _member_major
from droptune.population._stacked import _Norm
from droptune.population._stacked import _parametrized
from droptune.population._stacked import _plain
from droptune.population._stacked import _Recurrent
from droptune.population._stacked import _site_dropout
from droptune.population._stacked import _Stacked
from droptune.population._stacked import _weight_drop
from droptune.population._support import population_support


__all__ = ["PopulationNetwork", "build_population"]


class PopulationNetwork(nn.Module):
    """P networks of the family of ``configs`` (one config per member) as one module.

    ``forward(x)`` takes one batch ``[N, *input_shape]`` shared by all members and returns
    ``[P, N, out]``. Train/eval mode switches dropout and batch norm like the single network.
    ``active`` (a ``[P]`` float buffer of 0/1, set with :meth:`set_active`) freezes members'
    batch-norm statistics; the trainer also masks their updates.

    Args:
        configs: One TrainConfig per member; they must pass :func:`population_support`.
        info: The data description (input shape, task, classes).
        template: ``build_network(configs[0], info)`` if already built (its weights are not
            used; it defines the structure and the ``state_dict`` keys).
    """

    active: Tensor

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        info: DataInfo,
        template: nn.Module | None = None,
    ) -> None:
        super().__init__()
        reason = population_support(configs)
        if reason is not None:
            raise ConfigError(f"these configs cannot train as one population: {reason}")
        if template is None:
            with torch.random.fork_rng(devices=[]):
                template = build_network(configs[0], info)
        self.family = configs[0].model.family
        self.activation = _ACTIVATIONS[configs[0].model.activation]
        self.register_buffer("active", torch.ones(len(configs)), persistent=False)
        self.all_active = True
        names = {id(m): name for name, m in template.named_modules()}
        linears = [m for m in template.modules() if isinstance(m, nn.Linear)]
        norms = [m for m in template.modules() if isinstance(m, _NORMS)]
        size = len(configs)
        self.input_drop: nn.Module | None = None
        self.conv_drop: nn.Module | None = None
        self.convs = nn.ModuleList()
        self.conv_norms = nn.ModuleList()
        self.pool = False
        self.pools: list[bool] = []
        self.recurrent = nn.ModuleList()
        self.between_drop: nn.Module | None = None
        if self.family == "cnn":
            convs = [m for m in template.modules() if isinstance(m, nn.modules.conv._ConvNd)]
            spatial = list(info.input_shape[1:])
            self.input_drop = _site_dropout(configs, "input")
            self.conv_drop = _site_dropout(configs, "conv", max_block=min(spatial))
            for conv in convs:
                self.convs.append(_Conv(size, conv, names[id(conv)]))
                self.pools.append(min(spatial) >= 2)
                if self.pools[-1]:
                    spatial = [s // 2 for s in spatial]
            conv_norms, norms = norms[: len(convs)], norms[len(convs) :]
            for norm in conv_norms:
                self.conv_norms.append(_Norm(size, norm, names[id(norm)], conv=True))
        elif self.family == "rnn":
            self.input_drop = _site_dropout(configs, "sequence", "input_rate")
            self.between_drop = _site_dropout(configs, "sequence")
            recurrent_rates = torch.tensor(
                [c.regularization.dropout.rate("recurrent_rate") for c in configs]
            )
            layers = template.layers
            assert isinstance(layers, nn.ModuleList)
            for layer in layers:
                assert isinstance(layer, nn.RNNBase)
                self.recurrent.append(
                    _Recurrent(
                        size,
                        layer,
                        names[id(layer)],
                        recurrent_rates,
                        _weight_drop(configs, "recurrent_weight_rate"),
                    )
                )
        else:
            self.input_drop = _site_dropout(configs, "input")
        self.hidden_drop = _site_dropout(configs, "hidden")
        self.linears = nn.ModuleList(
            _Linear(size, m, names[id(m)], _weight_drop(configs, "weight_rate")) for m in linears
        )
        self.norms = nn.ModuleList(_Norm(size, m, names[id(m)], conv=False) for m in norms)
        self._sources = self._collect_sources()

    # ----------------------------------------------------------------------------------------
    # structure

    @property
    def size(self) -> int:
        """The number of members P (rows of every stacked tensor)."""
        return int(self.active.shape[0])

    def _collect_sources(self) -> list[tuple[str, str, DropConnect | None]]:
        """(stacked tensor name, plain single-network key, DropConnect of that tensor)."""
        out = []
        for name, module in self.named_modules():
            if isinstance(module, _Stacked):
                prefix = f"{name}." if name else ""
                out += [
                    (prefix + local, key, module.weight_drops.get(local))
                    for local, key in module.sources.items()
                ]
        return out

    def _tensors(self) -> dict[str, Tensor]:
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def _flagged(self, attribute: str) -> list[Tensor]:
        out = []
        for module in self.modules():
            if isinstance(module, _Stacked):
                out += [getattr(module, n) for n in sorted(getattr(module, attribute))]
        return out

    def decayed_parameters(self) -> list[Tensor]:
        """The parameters L2 acts on: weights of linear, conv and recurrent layers (biases and
        norm parameters are never decayed, as in :func:`droptune.layers.decay_split`)."""
        return self._flagged("decayed")

    def max_norm_weights(self) -> list[Tensor]:
        """The weights max-norm projects: every Linear and Conv weight (not recurrent ones, as
        in :func:`droptune.layers.max_norm_`)."""
        return self._flagged("max_norm")

    # ----------------------------------------------------------------------------------------
    # members

    @torch.no_grad()
    def load_members(self, states: Sequence[dict[str, Tensor]]) -> None:
        """Copy one single-network ``state_dict`` per member into the stacked tensors."""
        if len(states) != self.size:
            raise ValueError(f"expected {self.size} state dicts, got {len(states)}")
        tensors = self._tensors()
        plain = [{_plain(key): value for key, value in state.items()} for state in states]
        for name, key, _ in self._sources:
            tensors[name].copy_(torch.stack([state[key] for state in plain]))

    @torch.no_grad()
    def member_state_dict(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s weights as the ``state_dict`` of ``build_network(config, info)``."""
        tensors = self._tensors()
        out = {}
        for name, key, drop in self._sources:
            if drop is not None and isinstance(drop.p, Tensor) and float(drop.p[index]) > 0:
                key = _parametrized(key)
            out[key] = tensors[name][index].detach().clone()
        return out

    @torch.no_grad()
    def set_active(self, mask: Tensor) -> None:
        """Mark members active (True) or frozen (False); frozen batch-norm statistics stay."""
        self.active.copy_(mask.to(self.active))
        self.all_active = bool(mask.all())

    @torch.no_grad()
    def keep(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (in that order): every stacked parameter, buffer
        and per-member rate is indexed along its leading axis. Parameters become new tensors:
        optimizers over the old ones must be rebuilt or re-pointed."""
        index = index.to(self.active.device)
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    fresh = nn.Parameter(param.detach().index_select(0, index).clone())
                    fresh.requires_grad_(param.requires_grad)
                    module._parameters[name] = fresh
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.index_select(0, index.to(buffer.device))
        self.all_active = bool(self.active.bool().all())

    # ----------------------------------------------------------------------------------------
    # forward

    def forward(self, x: Tensor) -> Tensor:
        """One shared batch ``[N, *input_shape]`` → every member's output ``[P, N, out]``."""
        if self.family == "cnn":
            return self._dense(self._features(x), shared=False)
        if self.family == "rnn":
            return self._dense(self._sequence(x), shared=False)
        flat = x.flatten(1)
        if self.input_drop is None:
            return self._dense(flat, shared=True)
        return self._dense(self.input_drop(flat.expand(self.size, *flat.shape)), shared=False)

    def _dense(self, h: Tensor, shared: bool) -> Tensor:
        """Hidden dropout (conv/recurrent features) → [Linear → norm → act → dropout]* → head."""
        if not shared and self.family != "mlp" and self.hidden_drop is not None:
            h = self.hidden_drop(h)
        last = len(self.linears) - 1
        for index, linear in enumerate(self.linears):
            assert isinstance(linear, _Linear)
            h = linear.shared(h) if shared else linear(h)
            shared = False
            if index == last:
                break
            if self.norms:
                norm = self.norms[index]
                assert isinstance(norm, _Norm)
                h = norm(h, self.active, self.all_active)
            h = self.activation(h)
            if self.hidden_drop is not None:
                h = self.hidden_drop(h)
        return h

    def _features(self, x: Tensor) -> Tensor:
        """Convolution blocks → flattened features ``[P, N, F]``."""
        size = self.size
        shared = self.input_drop is None
        h = x
        if self.input_drop is not None:
            h = _channel_major(self.input_drop(x.expand(size, *x.shape)))
        pool = F.max_pool1d if x.dim() == 3 else F.max_pool2d
        for index, conv in enumerate(self.convs):
            assert isinstance(conv, _Conv)
            h = conv(h, shared=shared)
            shared = False
            if self.conv_norms:
                norm = self.conv_norms[index]
                assert isinstance(norm, _Norm)
                h = norm(h, self.active, self.all_active)
            h = self.activation(h)
            if self.conv_drop is not None:
                h = _channel_major(self.conv_drop(_member_major(h, size)))
            if self.pools[index]:
                h = pool(h, 2)
        if shared:  # no convolution and no input dropout: every member sees the input
            flat = x.flatten(1)
            return flat.expand(size, *flat.shape)
        return h.reshape(h.shape[0], size, -1).transpose(0, 1)

    def _sequence(self, x: Tensor) -> Tensor:
        """``[N, T, F]`` → the last layer's final hidden states ``[P, N, D·H]``."""
        h = x.transpose(0, 1)  # time-major [T, N, F]
        shared = self.input_drop is None
        if self.input_drop is not None:
            h = self.input_drop(h.expand(self.size, *h.shape))
        last = h
        for index, layer in enumerate(self.recurrent):
            assert isinstance(layer, _Recurrent)
            h, last = layer(h, shared=shared)
            shared = False
            if index < len(self.recurrent) - 1 and self.between_drop is not None:
                h = self.between_drop(h)
        return last


def build_population(
    configs: Sequence[TrainConfig],
    info: DataInfo,
    *,
    init: Literal["exact", "fast"] = "exact",
    device: str | torch.device | None = None,
) -> PopulationNetwork:
    """A :class:`PopulationNetwork` on ``device`` (default CPU) with each member initialised
    from its own ``train.seed``.

    ``init="exact"``: member ``i`` starts from exactly the weights the single-model path
    initialises for ``configs[i]`` (``build_network`` right after seeding torch with
    ``train.seed``, what :meth:`TrainConfig.build_module` does). Costs one single-network
    initialisation per member on the CPU, dominated by the random draws (~10 ms per 1.8 M
    parameters on one core).

    ``init="fast"``: the same distributions (torch's defaults, LeCun-normal for SELU), drawn on
    ``device`` from a generator seeded with each member's ``train.seed``: reproducible per
    seed, but not promised to be the single path's numbers (on CUDA they are not; on the CPU
    they often are, except for SELU and DropConnect models, whose single path draws more).

    The caller's random state is left untouched.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    if init == "fast":
        population = PopulationNetwork(configs, info).to(target)
        first = configs[0].model
        selu = first.activation == "selu" and first.family in ("mlp", "cnn")
        generators = [torch.Generator(device=target).manual_seed(c.train.seed) for c in configs]
        with torch.no_grad():
            for module in population.modules():
                if isinstance(module, _Stacked):
                    module.reset_(generators, selu)
        return population
    if init != "exact":
        raise ConfigError(f"init: must be one of exact, fast, got {init!r}")
    states: list[dict[str, Tensor]] = []
    template: nn.Module | None = None
    with torch.random.fork_rng(devices=[]):
        for config in configs:
            # the CPU generator build_network draws from (torch.manual_seed would also seed
            # every accelerator's generator, which fork_rng(devices=[]) does not restore, and
            # costs ~0.7 ms a call in recording the lazy CUDA seeding's stack)
            torch.default_generator.manual_seed(config.train.seed)
            with torch.device("cpu"):  # not a caller's default device (another generator)
                net = build_network(config, info)
            template = template or net
            states.append(net.state_dict())
    population = PopulationNetwork(configs, info, template)
    population.load_members(states)
    return population.to(target)
