"""Element-wise dropout kinds: none, standard (inverted Bernoulli), Gaussian and alpha dropout.

References:
    Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 15 (standard dropout; multiplicative Gaussian noise in section 10).
    Klambauer et al. 2017, "Self-Normalizing Neural Networks", arXiv 1706.02515 (alpha dropout).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
import torch.nn.functional as F

from droptune.layers._base import DropoutBase
from droptune.layers._base import Rate


__all__ = ["AlphaDropout", "Dropout", "GaussianDropout", "NoDropout"]

# -lambda * alpha of SELU: the value a dropped unit takes before the affine correction.
_SELU_NEG_SATURATION = -1.7580993408473766


class NoDropout(DropoutBase):
    """The identity, for the kind ``none``. The rate is validated and then ignored."""

    kind = "none"

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return "identity"


class Dropout(DropoutBase):
    """Inverted dropout: zero each element with probability p, scale kept ones by 1/(1-p).

    Same semantics as :class:`torch.nn.Dropout`; a float rate goes straight to
    :func:`torch.nn.functional.dropout` (the fused kernel on CUDA), a ``[P]`` rate tensor draws one
    mask over ``[P, N, ...]`` with each member's own rate.

    Example:
        >>> layer = Dropout(0.5)
        >>> y = layer(torch.ones(4, 8))
        >>> sorted(set(y.flatten().tolist())) in ([0.0, 2.0], [2.0], [0.0])
        True
    """

    kind = "standard"

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        if not isinstance(self.p, Tensor):
            return F.dropout(x, self.p, training=True)
        return x * self.scaled_mask(x, x.shape)


class GaussianDropout(DropoutBase):
    """Multiplicative Gaussian noise ``x * N(1, p / (1 - p))``.

    The noise has the mean and variance of inverted Bernoulli dropout at the same rate, so
    ``E[y] = x`` and ``Var[y] = x² p / (1 - p)``, but no unit is ever exactly zero.
    """

    kind = "gaussian"

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        noise = torch.randn_like(x)
        if isinstance(self.p, Tensor):
            p = self.keep_view(x, x.dim()).neg().add(1.0)  # p = 1 - keep, shaped [P, 1, ...]
            std = (p / (1.0 - p)).sqrt()
        else:
            std = torch.tensor(math.sqrt(self.p / (1.0 - self.p)), dtype=x.dtype, device=x.device)
        return x * noise.mul_(std).add_(1.0)


class AlphaDropout(DropoutBase):
    """Alpha dropout for SELU networks: keeps zero mean and unit variance of its input.

    A dropped unit is set to SELU's negative saturation value ``α' = -λα`` and the result is
    corrected by the affine map ``a·x + b`` with ``a = ((1 - p)(1 + p α'²))^(-1/2)`` and
    ``b = -a α' p``, so a standard-normal input keeps mean 0 and variance 1.

    Args:
        p: Drop rate.
        channel: Drop whole channels (axis 1, like :class:`torch.nn.FeatureAlphaDropout`)
            instead of single elements.
    """

    kind = "alpha"

    def __init__(self, p: Rate = 0.1, channel: bool = False) -> None:
        super().__init__(p)
        self.channel = channel

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x
        if not isinstance(self.p, Tensor):
            # F.alpha_dropout defaults to training=False (unlike F.dropout): pass it explicitly.
            if self.channel:
                return F.feature_alpha_dropout(x, self.p, training=True)
            return F.alpha_dropout(x, self.p, training=True)
        # [P,] batch, channel: one member inside vmap has no population axis
        lead = (3 if self.population is not None else 2) if self.channel else x.dim()
        shape = tuple(x.shape[:lead]) + (1,) * (x.dim() - lead)
        keep = self.keep_view(x, len(shape))
        kept = (torch.rand(shape, device=x.device, dtype=x.dtype) < keep).to(x.dtype)
        p = 1.0 - keep
        a = ((1.0 - p) * (1.0 + p * _SELU_NEG_SATURATION**2)).rsqrt()
        b = -a * _SELU_NEG_SATURATION * p
        return a * (x * kept + _SELU_NEG_SATURATION * (1.0 - kept)) + b

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channel=True" if self.channel else "")
