"""Structured dropout kinds: whole channels, whole sequences, blocks, residual paths, token rows.

References:
    Tompson et al. 2015, "Efficient Object Localization Using Convolutional Networks",
    arXiv 1411.4280 (spatial / channel dropout).
    Gal & Ghahramani 2016, "A Theoretically Grounded Application of Dropout in Recurrent Neural
    Networks", arXiv 1512.05287 (one mask per sequence; dropping word types).
    Ghiasi et al. 2018, "DropBlock: A regularization method for convolutional networks",
    arXiv 1810.12890.
    Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv 1603.09382 (drop path).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers._base import DropoutBase
from droptune.layers._base import Rate


__all__ = [
    "DropBlock",
    "DropPath",
    "DropoutEmbedding",
    "EmbeddingDropout",
    "LockedDropout",
    "SpatialDropout",
]

_CHANNEL_DROPOUT = {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _spatial_dims(layer: DropoutBase, x: Tensor, allowed: tuple[int, ...], what: str) -> int:
    """Number of spatial dims of ``x`` laid out as ``[P,] N, C, *spatial``; checks the rank."""
    lead = 3 if layer.population is not None else 2
    dims = x.dim() - lead
    if dims not in allowed:
        shapes = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
        expected = " or ".join(shapes[d] for d in allowed)
        if layer.population is not None:
            expected += ", each with a leading population axis P"
        raise InputShapeError(
            f"{layer.kind} dropout expects {what} input of shape {expected}; got a "
            f"{x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    return dims


class SpatialDropout(DropoutBase):
    """Channel-wise dropout: every channel of every sample is kept whole or zeroed whole.

    Picks 1-D, 2-D or 3-D behaviour from the input rank — ``(N, C, L)``, ``(N, C, H, W)`` or
    ``(N, C, D, H, W)`` — and always calls the matching ``F.dropout{1,2,3}d``, never torch's
    deprecated path that reads a 3-D input to ``dropout2d`` as 1-D.
    """

    kind = "spatial"

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        dims = _spatial_dims(self, x, (1, 2, 3), "convolutional")
        if not isinstance(self.p, Tensor):
            return _CHANNEL_DROPOUT[dims](x, self.p, training=True)
        shape = tuple(x.shape[: x.dim() - dims]) + (1,) * dims  # [P,] N, C, 1, ...
        return x * self.scaled_mask(x, shape)


class LockedDropout(DropoutBase):
    """Variational (locked) dropout over time: one mask per sequence, reused at every step.

    Args:
        p: Drop rate.
        batch_first: Input is ``(N, T, H)`` when True, ``(T, N, H)`` when False (the axis that
            gets the shared mask depends on it; getting it wrong silently gives per-step
            dropout).
    """

    kind = "variational"

    def __init__(self, p: Rate = 0.5, batch_first: bool = True) -> None:
        super().__init__(p)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        lead = int(self.population is not None)
        time_axis = (1 if self.batch_first else 0) + lead
        # Both layouts need the three axes (N, T, H): a 2-D (T, N) input must not slip through
        # with batch_first=False while (N, T) is rejected with batch_first=True.
        if x.dim() < 3 + lead:
            layout = "(N, T, H)" if self.batch_first else "(T, N, H)"
            raise InputShapeError(
                f"variational dropout expects a sequence of shape {layout}"
                f"{' with a leading population axis' if self.population else ''}, got shape "
                f"{tuple(x.shape)}"
            )
        shape = list(x.shape)
        shape[time_axis] = 1
        return x * self.scaled_mask(x, tuple(shape))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first={self.batch_first}"


class DropBlock(DropoutBase):
    """DropBlock: drop contiguous ``block_size``-wide regions of a feature map.

    Block seeds are drawn with rate ``γ = p · numel / k^d / (valid positions)`` so that about a
    fraction p of the positions is dropped; each seed grows into a k×k (or k, or k×k×k) block by
    max-pooling. Kept values are rescaled by ``numel / kept`` (per sample group, like timm), which
    keeps the expected sum of activations. Works on 1-D ``(N, C, L)``, 2-D and 3-D maps.

    Args:
        p: Target fraction of dropped positions.
        block_size: Side of a block; clamped to the feature map size.
        couple_channels: One spatial mask shared by all channels of a sample (the paper's
            choice); False draws one mask per channel.
    """

    kind = "dropblock"

    def __init__(self, p: Rate = 0.1, block_size: int = 3, couple_channels: bool = True) -> None:
        super().__init__(p)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"dropblock: block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size
        self.couple_channels = couple_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        dims = _spatial_dims(self, x, (1, 2, 3), "convolutional")
        spatial = tuple(x.shape[-dims:])
        ks = tuple(min(self.block_size, s) for s in spatial)
        valid = math.prod(s - k + 1 for s, k in zip(spatial, ks, strict=True))
        ratio = math.prod(spatial) / math.prod(ks) / valid
        lead = tuple(x.shape[: x.dim() - dims - 1])  # [P,] N
        channels = 1 if self.couple_channels else x.shape[-dims - 1]
        seed_shape = (*lead, channels, *spatial)
        if isinstance(self.p, Tensor):
            gamma = (1.0 - self.keep_view(x, len(seed_shape))) * ratio
        else:
            gamma = torch.tensor(self.p * ratio, device=x.device, dtype=x.dtype)
        seeds = torch.rand(seed_shape, device=x.device, dtype=x.dtype) < gamma.clamp(max=1.0)
        flat = seeds.to(x.dtype).reshape(-1, channels, *spatial)
        blocks = _MAX_POOL[dims](flat, ks, stride=1, padding=[k // 2 for k in ks])
        # Even block sizes pad one position too many on each axis: crop back to the input size.
        for axis, size in enumerate(spatial, start=2):
            blocks = blocks.narrow(axis, 0, size)
        keep = (1.0 - blocks).reshape(seed_shape)
        group = tuple(range(1 if self.population is not None else 0, keep.dim()))
        if self.population is not None:
            scale = keep[0].numel() / keep.sum(dim=group, keepdim=True).clamp(min=1.0)
        else:
            scale = keep.numel() / keep.sum().clamp(min=1.0)
        return x * keep * scale

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block_size={self.block_size}, "
            f"couple_channels={self.couple_channels}"
        )


class DropPath(DropoutBase):
    """Stochastic depth: drop a residual branch for whole samples (``x + drop_path(f(x))``)."""

    kind = "droppath"

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        lead = 2 if self.population is not None else 1
        shape = tuple(x.shape[:lead]) + (1,) * (x.dim() - lead)
        return x * self.scaled_mask(x, shape)


class EmbeddingDropout(DropoutBase):
    """Drop whole rows (last-axis vectors) of its input and scale kept rows by ``1 / (1 - p)``.

    Applied to an embedding matrix ``(V, D)`` it drops word types, as Gal & Ghahramani and
    AWD-LSTM do: every occurrence of a dropped token becomes the zero vector (use
    :class:`DropoutEmbedding`, which does exactly that). Applied to embedded tokens
    ``(N, T, D)`` it drops token positions.
    """

    kind = "embedding"

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        return x * self.scaled_mask(x, (*x.shape[:-1], 1))


class DropoutEmbedding(nn.Embedding):
    """An :class:`torch.nn.Embedding` that drops word types (rows of its weight) in training.

    Its parameters and ``state_dict`` are those of ``nn.Embedding``, so a trained model loads
    into a plain embedding and vice versa.

    Example:
        >>> emb = DropoutEmbedding(100, 16, p=0.1)
        >>> emb(torch.tensor([[1, 2, 1]])).shape
        torch.Size([1, 3, 16])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, p: Rate = 0.1, **kwargs: Any):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.row_dropout = EmbeddingDropout(p)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, p: Rate) -> DropoutEmbedding:
        """Wrap an existing embedding (weights shared, not copied)."""
        new = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            p,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            _weight=embedding.weight,
            _freeze=not embedding.weight.requires_grad,
        )
        # nn.Embedding wraps ``_weight`` in a *new* Parameter (same storage, other object): keep
        # the original one, so tied weights (decoder.weight = embedding.weight) stay one
        # parameter through .to(dtype/device) and optimizers built before the swap still see it.
        new.weight = embedding.weight
        new.train(embedding.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        weight = self.row_dropout(self.weight)
        return F.embedding(
            input,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
