"""The networks of the built-in model families, each built from a TrainConfig and DataInfo.

Dropout modules come from ``make_dropout`` with the (kind, rate) of their site
(:meth:`droptune.config.DropoutConfig.for_site`), so every family honours the same config.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch import nn

from droptune.exceptions import ConfigError
from droptune.layers import DropoutEmbedding
from droptune.layers import SelfAttention
from droptune.layers import VariationalGRU
from droptune.layers import VariationalLSTM
from droptune.layers import add_weight_dropout
from droptune.layers import make_dropout


if TYPE_CHECKING:
    from droptune.config import DropoutConfig
    from droptune.config import TrainConfig
    from droptune.data import DataInfo

__all__ = ["build_network"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "selu": nn.SELU,
    "elu": nn.ELU,
}


def _dropout(
    drop: DropoutConfig, site: str, rate_field: str | None = None, max_block: int | None = None
) -> nn.Module:
    """The dropout module of ``site``; sequences are batch-first, blocks fit the feature map."""
    kind, rate, options = drop.for_site(site)
    if rate_field is not None:
        rate = drop.rate(rate_field)
    if kind == "variational":
        options["batch_first"] = True
    if kind == "dropblock" and max_block is not None:
        options["block_size"] = min(options["block_size"], max_block)
    return make_dropout(kind, rate, **options)


def _init_selu(module: nn.Module) -> None:
    """LeCun-normal init, which SELU (and alpha dropout) assume."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _norm(kind: str, width: int, dims: int) -> nn.Module:
    if kind == "batch":
        return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](width)
    if kind == "layer":
        return nn.LayerNorm(width) if dims == 0 else nn.GroupNorm(1, width)
    return nn.Identity()


def _dense_stack(in_features: int, hidden: list[int], cfg: TrainConfig) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [
            nn.Linear(in_features, width),
            _norm(cfg.model.norm, width, 0),
            _ACTIVATIONS[cfg.model.activation](),
            _dropout(cfg.regularization.dropout, "hidden"),
        ]
        in_features = width
    return nn.Sequential(*layers), in_features


def build_mlp(cfg: TrainConfig, info: DataInfo, out: int) -> nn.Module:
    """Flatten → input dropout → [Linear → norm → activation → hidden dropout]* → Linear."""
    drop = cfg.regularization.dropout
    stack, width = _dense_stack(math.prod(info.input_shape), cfg.model.hidden, cfg)
    return nn.Sequential(nn.Flatten(), _dropout(drop, "input"), stack, nn.Linear(width, out))


def build_cnn(cfg: TrainConfig, info: DataInfo, out: int) -> nn.Module:
    """[Conv → norm → activation → conv dropout → max-pool]* → flatten → dense head."""
    if len(info.input_shape) not in (2, 3):
        raise ConfigError(
            f"model.family cnn needs (C, L) or (C, H, W) inputs, got {info.input_shape}; set "
            "data.layout to signal or image"
        )
    dims = len(info.input_shape) - 1
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
    drop = cfg.regularization.dropout
    channels, spatial = info.input_shape[0], list(info.input_shape[1:])
    layers: list[nn.Module] = [_dropout(drop, "input")]
    k = cfg.model.kernel_size
    for width in cfg.model.channels:
        layers += [
            conv(channels, width, k, padding=k // 2),
            _norm(cfg.model.norm, width, dims),
            _ACTIVATIONS[cfg.model.activation](),
            _dropout(drop, "conv", max_block=min(spatial)),
        ]
        if min(spatial) >= 2:
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        channels = width
    layers += [nn.Flatten(), _dropout(drop, "hidden")]
    stack, width = _dense_stack(channels * math.prod(spatial), cfg.model.hidden, cfg)
    return nn.Sequential(*layers, stack, nn.Linear(width, out))


def _sequence_input(
    cfg: TrainConfig, info: DataInfo, family: str, width: int | None
) -> tuple[nn.Module, int]:
    """Token ids → a word-type-dropout embedding, or (T, F) features → ``width`` (identity when
    ``width`` is None). Returns the module and its output width."""
    m, drop = cfg.model, cfg.regularization.dropout
    vocab = m.vocab_size or info.vocab_size
    if vocab:
        dim = width or m.embedding_dim
        return DropoutEmbedding(vocab, dim, p=drop.rate("embedding_rate")), dim
    if len(info.input_shape) != 2:
        raise ConfigError(
            f"model.family {family} needs (T, F) sequences, got {info.input_shape}; set "
            "data.layout to sequence"
        )
    features = info.input_shape[-1]
    if width is None:
        return nn.Identity(), features
    return nn.Linear(features, width), width


class RecurrentNet(nn.Module):
    """Gal & Ghahramani recurrent classifier: one locked mask per sequence at the input, between
    layers and on the recurrent state; optional embedding (word-type) dropout and DropConnect on
    ``weight_hh``; reads out the final hidden state(s)."""

    def __init__(self, cfg: TrainConfig, info: DataInfo, out: int) -> None:
        super().__init__()
        m, drop = cfg.model, cfg.regularization.dropout
        self.embed, features = _sequence_input(cfg, info, "rnn", None)
        cell = VariationalLSTM if m.cell == "lstm" else VariationalGRU
        directions = 2 if m.bidirectional else 1
        self.input_drop = _dropout(drop, "sequence", "input_rate")
        self.layers = nn.ModuleList()
        self.between = nn.ModuleList()
        for layer in range(m.num_layers):
            rnn = cell(
                features if layer == 0 else m.hidden_size * directions,
                m.hidden_size,
                batch_first=True,
                bidirectional=m.bidirectional,
                recurrent_dropout=drop.rate("recurrent_rate"),
            )
            if drop.rate("recurrent_weight_rate") > 0:
                add_weight_dropout(rnn, drop.rate("recurrent_weight_rate"))
            self.layers.append(rnn)
            if layer < m.num_layers - 1:
                self.between.append(_dropout(drop, "sequence"))
        self.output_drop = _dropout(drop, "hidden")
        self.head = nn.Linear(m.hidden_size * directions, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.input_drop(self.embed(x))
        state: Tensor | tuple[Tensor, Tensor] | None = None
        for index, rnn in enumerate(self.layers):
            h, state = rnn(h)
            if index < len(self.between):
                h = self.between[index](h)
        assert state is not None
        last = state[0] if isinstance(state, tuple) else state  # (directions, N, H)
        return self.head(self.output_drop(torch.cat(list(last), dim=-1)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + droppath(attn(LN x)); x + droppath(FFN(LN x))."""

    def __init__(
        self, dim: int, heads: int, ffn_mult: int, drop: DropoutConfig, path_rate: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attn_dropout=drop.for_site("attention")[1])
        self.attn.proj_drop = _dropout(drop, "hidden")  # type: ignore[assignment]
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim * ffn_mult),
            nn.GELU(),
            _dropout(drop, "hidden"),
            nn.Linear(dim * ffn_mult, dim),
            _dropout(drop, "hidden"),
        )
        self.drop_path = make_dropout("droppath", path_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class TransformerNet(nn.Module):
    """Encoder over a sequence: projection (or embedding) + learned positions → blocks →
    mean pool → linear. Drop-path rates grow linearly with depth up to ``droppath_rate``."""

    def __init__(self, cfg: TrainConfig, info: DataInfo, out: int) -> None:
        super().__init__()
        m, drop = cfg.model, cfg.regularization.dropout
        self.embed, _ = _sequence_input(cfg, info, "transformer", m.d_model)
        length = info.input_shape[0]
        self.pos = nn.Parameter(torch.zeros(1, length, m.d_model))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.input_drop = _dropout(drop, "input")
        top = drop.rate("droppath_rate")
        rates = [top * i / max(m.depth - 1, 1) for i in range(m.depth)]
        self.blocks = nn.Sequential(
            *[TransformerBlock(m.d_model, m.heads, m.ffn_mult, drop, r) for r in rates]
        )
        self.norm = nn.LayerNorm(m.d_model)
        self.head = nn.Linear(m.d_model, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.input_drop(self.embed(x) + self.pos[:, : x.shape[1]])
        return self.head(self.norm(self.blocks(h)).mean(dim=1))


def build_network(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    """The nn.Module of a built-in family, with DropConnect on Linear weights if configured."""
    out = info.num_classes if info.task == "classification" and info.num_classes else 1
    family = cfg.model.family
    if family == "mlp":
        net = build_mlp(cfg, info, out)
    elif family == "cnn":
        net = build_cnn(cfg, info, out)
    elif family == "rnn":
        net = RecurrentNet(cfg, info, out)
    elif family == "transformer":
        net = TransformerNet(cfg, info, out)
    else:
        raise ConfigError(f"model.family: {family!r} is not a built-in network")
    if cfg.model.activation == "selu" and family in ("mlp", "cnn"):
        _init_selu(net)
    weight_rate = cfg.regularization.dropout.rate("weight_rate")
    if weight_rate > 0:
        attention = {
            id(m) for a in net.modules() if isinstance(a, SelfAttention) for m in a.modules()
        }
        for module in net.modules():
            if isinstance(module, nn.Linear) and id(module) not in attention:
                add_weight_dropout(module, weight_rate)
    return net
