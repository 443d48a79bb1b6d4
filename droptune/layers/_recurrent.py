"""Gal & Ghahramani variational LSTM and GRU: one input mask and one hidden mask per sequence.

Reference: Gal & Ghahramani 2016, "A Theoretically Grounded Application of Dropout in Recurrent
Neural Networks", arXiv 1512.05287.

``nn.LSTM(dropout=...)`` is not this: it drops the outputs of every layer but the last with a
fresh mask per element and step, and does nothing for one layer (pytorch/pytorch#5985). Here each
layer and direction samples, once per forward call, a mask over its input features ``(N, D)`` and
one over its hidden state ``(N, H)``, and reuses both at every time step. Training with a
non-zero rate runs a Python loop over steps (no cuDNN); eval mode, or both rates zero, runs the
parent class's fused kernel on the very same parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers._base import check_rate


__all__ = ["VariationalGRU", "VariationalLSTM"]


def _float_rate(kind: str, p: float) -> float:
    rate = check_rate(kind, p)
    if isinstance(rate, Tensor):
        raise ConfigError(f"{kind}: population rate tensors are not supported, got a tensor")
    return rate


class _VariationalMixin:
    """The loop shared by the LSTM and GRU variants; the cell step differs."""

    input_dropout: float
    recurrent_dropout: float
    num_layers: int
    bidirectional: bool
    batch_first: bool
    hidden_size: int
    bias: bool
    training: bool

    def _setup(self, input_dropout: float, recurrent_dropout: float) -> None:
        self.input_dropout = _float_rate("variational input dropout", input_dropout)
        self.recurrent_dropout = _float_rate("variational recurrent dropout", recurrent_dropout)

    def _masks_active(self) -> bool:
        return self.training and (self.input_dropout > 0 or self.recurrent_dropout > 0)

    @staticmethod
    def _mask(like: Tensor, shape: tuple[int, int], p: float) -> Tensor | None:
        if p == 0.0:
            return None
        return like.new_empty(shape).bernoulli_(1.0 - p).div_(1.0 - p)

    def _cell(
        self,
        gi: Tensor,
        h: Tensor,
        state: Tensor | None,
        w_hh: Tensor,
        b_hh: Tensor | None,
        mask_h: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _zero_state(self, hx: Any, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _forward_loop(self, x: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        """Step-by-step forward with freshly sampled per-sequence masks (the training path)."""
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise InputShapeError(
                f"{type(self).__name__}: PackedSequence input is not supported while training "
                "with variational dropout; pad the batch instead"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = (
                    tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
                )
        seq = x.transpose(0, 1) if self.batch_first else x  # (T, N, D)
        batch = seq.shape[1]
        h0, c0 = self._zero_state(hx, batch, seq)
        directions = 2 if self.bidirectional else 1
        h_last: list[Tensor] = []
        c_last: list[Tensor] = []
        layer_input = seq
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"l{layer}{'_reverse' if direction else ''}"
                # Read each weight once: a DropConnect parametrization samples a new mask at
                # every access, and the mask must stay the same for the whole sequence.
                w_ih = getattr(self, f"weight_ih_{suffix}")
                w_hh = getattr(self, f"weight_hh_{suffix}")
                b_ih = getattr(self, f"bias_ih_{suffix}") if self.bias else None
                b_hh = getattr(self, f"bias_hh_{suffix}") if self.bias else None
                mask_x = self._mask(seq, (batch, layer_input.shape[-1]), self.input_dropout)
                mask_h = self._mask(seq, (batch, self.hidden_size), self.recurrent_dropout)
                inp = layer_input if mask_x is None else layer_input * mask_x
                gates_in = F.linear(inp, w_ih, b_ih)  # all steps at once: (T, N, G*H)
                h = h0[index]
                c = None if c0 is None else c0[index]
                steps = range(seq.shape[0] - 1, -1, -1) if direction else range(seq.shape[0])
                out: list[Tensor] = [h] * seq.shape[0]
                for t in steps:
                    h, c = self._cell(gates_in[t], h, c, w_hh, b_hh, mask_h)
                    out[t] = h
                outputs.append(torch.stack(out))
                h_last.append(h)
                if c is not None:
                    c_last.append(c)
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        h_n = torch.stack(h_last)
        state: Any = (h_n, torch.stack(c_last)) if c_last else h_n
        if unbatched:
            output = output.squeeze(0 if self.batch_first else 1)
            state = (
                tuple(s.squeeze(1) for s in state)
                if isinstance(state, tuple)
                else (state.squeeze(1))
            )
        return output, state

    def _rates_repr(self) -> str:
        return f", input_dropout={self.input_dropout}, recurrent_dropout={self.recurrent_dropout}"


class VariationalLSTM(_VariationalMixin, nn.LSTM):
    """``nn.LSTM`` with Gal & Ghahramani input and recurrent dropout (same masks at every step).

    Parameters and ``state_dict`` are exactly ``nn.LSTM``'s, so weights move freely between the
    two; with both rates 0 (or in eval mode) the output equals ``nn.LSTM``'s.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, bidirectional: as ``nn.LSTM``.
        input_dropout: Rate of the per-sequence mask on each layer's input features.
        recurrent_dropout: Rate of the per-sequence mask on the hidden state fed back.

    Example:
        >>> rnn = VariationalLSTM(8, 16, batch_first=True, recurrent_dropout=0.25)
        >>> rnn(torch.randn(2, 5, 8))[0].shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("proj_size", 0):
            raise ConfigError("VariationalLSTM: proj_size is not supported")
        if kwargs.get("dropout", 0):
            raise ConfigError(
                "VariationalLSTM: use input_dropout (a per-sequence mask on every layer's input) "
                "instead of nn.LSTM's per-step dropout="
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            bidirectional=bidirectional,
            **kwargs,
        )
        self._setup(input_dropout, recurrent_dropout)

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:  # type: ignore[override]
        if not self._masks_active():
            return super().forward(input, hx)
        return self._forward_loop(input, hx)

    def _zero_state(self, hx: Any, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        if hx is not None:
            return hx[0], hx[1]
        layers = self.num_layers * (2 if self.bidirectional else 1)
        zeros = like.new_zeros(layers, batch, self.hidden_size)
        return zeros, zeros

    def _cell(
        self,
        gi: Tensor,
        h: Tensor,
        state: Tensor | None,
        w_hh: Tensor,
        b_hh: Tensor | None,
        mask_h: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        assert state is not None
        gates = gi + F.linear(h if mask_h is None else h * mask_h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * state + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def extra_repr(self) -> str:
        return super().extra_repr() + self._rates_repr()


class VariationalGRU(_VariationalMixin, nn.GRU):
    """``nn.GRU`` with Gal & Ghahramani input and recurrent dropout; see :class:`VariationalLSTM`.

    The hidden mask applies to the state entering ``W_hh`` (all three gates); the interpolation
    ``h' = (1 - z) n + z h`` uses the unmasked state.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("proj_size", 0):
            raise ConfigError("VariationalGRU: proj_size is not supported")
        if kwargs.get("dropout", 0):
            raise ConfigError(
                "VariationalGRU: use input_dropout (a per-sequence mask on every layer's input) "
                "instead of nn.GRU's per-step dropout="
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            bidirectional=bidirectional,
            **kwargs,
        )
        self._setup(input_dropout, recurrent_dropout)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if not self._masks_active():
            return super().forward(input, hx)
        return self._forward_loop(input, hx)

    def _zero_state(self, hx: Any, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        if hx is not None:
            return hx, None
        layers = self.num_layers * (2 if self.bidirectional else 1)
        return like.new_zeros(layers, batch, self.hidden_size), None

    def _cell(
        self,
        gi: Tensor,
        h: Tensor,
        state: Tensor | None,
        w_hh: Tensor,
        b_hh: Tensor | None,
        mask_h: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        gh = F.linear(h if mask_h is None else h * mask_h, w_hh, b_hh)
        r_i, z_i, n_i = gi.chunk(3, dim=-1)
        r_h, z_h, n_h = gh.chunk(3, dim=-1)
        r = torch.sigmoid(r_i + r_h)
        z = torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1.0 - z) * n + z * h, None

    def extra_repr(self) -> str:
        return super().extra_repr() + self._rates_repr()
