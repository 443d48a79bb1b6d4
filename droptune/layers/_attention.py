"""Multi-head self-attention whose attention-probability dropout follows ``.train()``/``.eval()``.

``F.scaled_dot_product_attention(dropout_p=...)`` applies dropout whenever ``dropout_p > 0``; it
does not know about ``.eval()`` (pytorch/pytorch#124464, #99293). This block passes
``dropout_p`` only while its dropout module is in training mode, and routes population rates
(``[P]`` tensors) through an explicit softmax so each member gets its own rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.exceptions import ConfigError
from droptune.layers._base import Rate
from droptune.layers._elementwise import Dropout


__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(N, T, D)`` inputs (``(P, N, T, D)`` for populations).

    Args:
        dim: Model width D; must be divisible by ``num_heads``.
        num_heads: Number of heads.
        attn_dropout: Dropout rate on the attention probabilities (off in eval).
        proj_dropout: Dropout rate on the output projection.
        bias: Biases in the projections.

    Example:
        >>> attn = SelfAttention(16, 4, attn_dropout=0.1).eval()
        >>> x = torch.randn(2, 5, 16)
        >>> torch.equal(attn(x), attn(x))
        True
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_dropout: Rate = 0.0,
        proj_dropout: Rate = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(
                f"SelfAttention: dim must be divisible by num_heads, got dim={dim}, "
                f"num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.attn_drop = Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = Dropout(proj_dropout)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        *lead, length, dim = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(*lead, length, 3, heads, dim // heads)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each (..., H, T, Dh)
        rate = self.attn_drop.p
        if isinstance(rate, Tensor) and self.attn_drop.training:
            scores = q @ k.transpose(-2, -1) / math.sqrt(dim // heads)
            if is_causal:
                causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            if attn_mask is not None:
                scores = (
                    scores.masked_fill(~attn_mask, float("-inf"))
                    if attn_mask.dtype == torch.bool
                    else scores + attn_mask
                )
            out = self.attn_drop(scores.softmax(dim=-1)) @ v
        else:
            p = float(rate) if self.attn_drop.training and not isinstance(rate, Tensor) else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal
            )
        out = out.transpose(-3, -2).reshape(*lead, length, dim)
        return self.proj_drop(self.proj(out))
