"""Gal & Ghahramani variational LSTM/GRU (reference sheet §1.8): one mask per sequence."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers import DropConnect
from droptune.layers import VariationalGRU
from droptune.layers import VariationalLSTM
from droptune.layers import add_weight_dropout


VARIANTS = [
    pytest.param(VariationalLSTM, nn.LSTM, id="lstm"),
    pytest.param(VariationalGRU, nn.GRU, id="gru"),
]

D, H, T, N = 6, 5, 7, 4


# ------------------------------------------------------------------ reference cells (by hand)


def _lstm_step(
    x: Tensor, h_in: Tensor, h: Tensor, c: Tensor, w: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """One LSTM step; ``h_in`` is the (masked) state entering W_hh."""
    gates = x @ w["w_ih"].T + w["b_ih"] + h_in @ w["w_hh"].T + w["b_hh"]
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_step(
    x: Tensor, h_in: Tensor, h: Tensor, c: Tensor, w: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """One GRU step; ``h_in`` (masked) enters W_hh, the interpolation uses the unmasked ``h``."""
    r_i, z_i, n_i = (x @ w["w_ih"].T + w["b_ih"]).chunk(3, dim=-1)
    r_h, z_h, n_h = (h_in @ w["w_hh"].T + w["b_hh"]).chunk(3, dim=-1)
    r = torch.sigmoid(r_i + r_h)
    z = torch.sigmoid(z_i + z_h)
    n = torch.tanh(n_i + r * n_h)
    return (1 - z) * n + z * h, c


def _manual(
    step: Callable[..., tuple[Tensor, Tensor]],
    x: Tensor,
    w: dict[str, Tensor],
    mask_x: Tensor,
    mask_h: Tensor,
) -> Tensor:
    """Single-layer unidirectional loop over ``x`` (T, N, D) with the SAME masks at every step."""
    h = x.new_zeros(x.shape[1], w["w_hh"].shape[1])
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[0]):
        h, c = step(x[t] * mask_x, h * mask_h, h, c, w)
        outs.append(h)
    return torch.stack(outs)


def _weights(rnn: nn.RNNBase) -> dict[str, Tensor]:
    return {
        "w_ih": rnn.weight_ih_l0.detach(),
        "w_hh": rnn.weight_hh_l0.detach(),
        "b_ih": rnn.bias_ih_l0.detach(),
        "b_hh": rnn.bias_hh_l0.detach(),
    }


def _infer_masks(
    rnn: nn.RNNBase,
    x: Tensor,
    seed: int,
    hh_grad: Callable[[], Tensor],
    p_x: float,
    p_h: float,
) -> tuple[Tensor, Tensor]:
    """Recover the per-sequence masks of a seeded training forward from the gradients.

    For batch element n, column j of dL_n/dW_ih is Σ_t δ_t · x[t, n, j] · m_x[n, j]: exactly zero
    iff m_x[n, j] = 0 (generic inputs). Likewise column j of dL_n/dW_hh is zero iff m_h[n, j] = 0.
    The same seed reproduces the same masks on every forward.
    """
    mask_x = torch.zeros(x.shape[1], x.shape[2])
    mask_h = torch.zeros(x.shape[1], rnn.hidden_size)
    for n in range(x.shape[1]):
        rnn.zero_grad()
        torch.manual_seed(seed)
        out = rnn(x)[0]
        out[:, n].sum().backward()
        mask_x[n] = (rnn.weight_ih_l0.grad != 0).any(0).float() / (1 - p_x)
        mask_h[n] = (hh_grad() != 0).any(0).float() / (1 - p_h)
    return mask_x, mask_h


# ------------------------------------------------------------------ equality with the parent


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
def test_zero_rates_equal_parent_both_ways(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase]
) -> None:
    torch.manual_seed(0)
    var = cls(D, H, num_layers=2, bidirectional=True)
    ref = parent(D, H, num_layers=2, bidirectional=True)
    assert list(var.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(var.state_dict())
    x = torch.randn(T, N, D)
    for mode in (True, False):
        var.train(mode)
        ref.train(mode)
        out, state = var(x)
        ref_out, ref_state = ref(x)
        assert torch.equal(out, ref_out)
        torch.testing.assert_close(state, ref_state, rtol=0, atol=0)
    # And the other way round: parent weights into the variational module.
    torch.manual_seed(1)
    other = parent(D, H, num_layers=2, bidirectional=True)
    var.load_state_dict(other.state_dict())
    assert torch.equal(var(x)[0], other(x)[0])


LOOP_CASES = [
    pytest.param({}, False, False, id="plain"),
    pytest.param({"batch_first": True}, False, False, id="batch_first"),
    pytest.param({"num_layers": 2}, False, False, id="2layers"),
    pytest.param({"bidirectional": True}, False, False, id="bidirectional"),
    pytest.param(
        {"num_layers": 2, "bidirectional": True, "batch_first": True},
        True,
        False,
        id="2layers-bidi-bf-hx",
    ),
    pytest.param({"num_layers": 2}, True, False, id="hx"),
    pytest.param({"bias": False}, False, False, id="no-bias"),
    pytest.param({}, False, True, id="unbatched"),
    pytest.param({"batch_first": True, "num_layers": 2}, True, True, id="unbatched-bf-hx"),
]


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
@pytest.mark.parametrize(("kwargs", "with_hx", "unbatched"), LOOP_CASES)
def test_loop_equals_fused_parent(
    cls: type[nn.RNNBase],
    parent: type[nn.RNNBase],
    kwargs: dict[str, bool | int],
    with_hx: bool,
    unbatched: bool,
) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, **kwargs)
    batch_first = bool(kwargs.get("batch_first", False))
    layers = int(kwargs.get("num_layers", 1)) * (2 if kwargs.get("bidirectional") else 1)
    if unbatched:
        x = torch.randn(T, D)
        state_shape: tuple[int, ...] = (layers, H)
    else:
        x = torch.randn(N, T, D) if batch_first else torch.randn(T, N, D)
        state_shape = (layers, N, H)
    hx = None
    if with_hx:
        h0 = torch.randn(state_shape)
        hx = (h0, torch.randn(state_shape)) if cls is VariationalLSTM else h0
    out, state = rnn._forward_loop(x, hx)
    ref_out, ref_state = parent.forward(rnn, x, hx)  # the fused parent kernel
    assert torch.equal(rnn(x, hx)[0], ref_out)  # rates 0: forward takes the fused path
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the masks


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="plain"),
        pytest.param({"batch_first": True}, id="batch_first"),
        pytest.param({"num_layers": 2, "bidirectional": True}, id="2layers-bidi"),
    ],
)
def test_input_mask_is_the_same_at_every_step(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase], kwargs: dict[str, bool | int]
) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, input_dropout=0.5, **kwargs).train()
    batch_first = bool(kwargs.get("batch_first", False))
    x = torch.randn(N, T, D) if batch_first else torch.randn(T, N, D)
    x.requires_grad_(True)
    rnn(x)[0].sum().backward()
    assert x.grad is not None
    zero = (x.grad == 0) if not batch_first else (x.grad == 0).transpose(0, 1)  # (T, N, D)
    # d out / d x[t, n, j] vanishes exactly when feature j of sequence n is dropped: the same
    # features at every step (a fresh mask per step would give different patterns).
    for t in range(T):
        assert torch.equal(zero[t], zero[0]), t
    assert bool(zero.any()) and bool((~zero).any())
    # One mask per sequence, not per batch.
    assert not all(torch.equal(zero[0, n], zero[0, 0]) for n in range(1, N))
    # And a new mask at every call.
    x2 = x.detach().clone().requires_grad_(True)
    rnn(x2)[0].sum().backward()
    assert x2.grad is not None
    zero2 = (x2.grad == 0) if not batch_first else (x2.grad == 0).transpose(0, 1)
    assert not torch.equal(zero2[0], zero[0])


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
@pytest.mark.parametrize(("p_x", "p_h"), [(0.5, 0.0), (0.0, 0.5), (0.4, 0.3)])
def test_output_equals_manual_loop_with_fixed_masks(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase], p_x: float, p_h: float
) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, input_dropout=p_x, recurrent_dropout=p_h).train()
    x = torch.randn(T, N, D)
    mask_x, mask_h = _infer_masks(rnn, x, 7, lambda: rnn.weight_hh_l0.grad, p_x, p_h)
    for mask, p in ((mask_x, p_x), (mask_h, p_h)):
        if p > 0:
            assert bool((mask == 0).any()) and bool((mask != 0).any())
        else:
            assert bool((mask == 1).all())
    torch.manual_seed(7)
    out = rnn(x)[0]
    step = _lstm_step if cls is VariationalLSTM else _gru_step
    ref = _manual(step, x, _weights(rnn), mask_x, mask_h)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
@pytest.mark.parametrize("layers", [1, 2])
def test_recurrent_dropout_leaves_first_step(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase], layers: int
) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, num_layers=layers, recurrent_dropout=0.5)
    x = torch.randn(T, N, D)
    rnn.eval()
    ref = rnn(x)[0]
    rnn.train()
    out = rnn(x)[0]
    # h0 = 0, so the hidden mask has nothing to act on at t = 0.
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)
    for t in range(1, T):
        assert not torch.allclose(out[t], ref[t], atol=1e-4), t


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
def test_eval_is_deterministic_and_equals_parent(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase]
) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, num_layers=2, input_dropout=0.5, recurrent_dropout=0.5).eval()
    ref = parent(D, H, num_layers=2).eval()
    ref.load_state_dict(rnn.state_dict())
    x = torch.randn(T, N, D)
    out = rnn(x)[0]
    assert torch.equal(out, rnn(x)[0])
    assert torch.equal(out, ref(x)[0])
    rnn.train()
    a, b = rnn(x)[0], rnn(x)[0]
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, out)


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
def test_gradients_flow_to_every_parameter(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase]
) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, num_layers=2, bidirectional=True, input_dropout=0.3, recurrent_dropout=0.3)
    rnn.train()
    x = torch.randn(T, N, D, requires_grad=True)
    out, _ = rnn(x)
    out.pow(2).sum().backward()
    for name, param in rnn.named_parameters():
        assert param.grad is not None, name
        assert bool(torch.isfinite(param.grad).all()), name
        assert param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="input_dropout"):
        VariationalLSTM(3, 4, num_layers=2, dropout=0.2)
    with pytest.raises(ConfigError, match="input_dropout"):
        VariationalGRU(3, 4, num_layers=2, dropout=0.2)
    with pytest.raises(ConfigError, match="proj_size"):
        VariationalLSTM(3, 4, proj_size=2)
    with pytest.raises(ConfigError, match="proj_size"):
        VariationalGRU(3, 4, proj_size=2)
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ConfigError):
            VariationalLSTM(3, 4, input_dropout=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            VariationalGRU(3, 4, recurrent_dropout=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="population"):
        VariationalLSTM(3, 4, input_dropout=torch.tensor([0.1, 0.2]))  # type: ignore[arg-type]
    # dropout=0 is harmless; the repr shows the rates.
    rnn = VariationalLSTM(3, 4, dropout=0.0, recurrent_dropout=0.25)
    assert "recurrent_dropout=0.25" in repr(rnn)


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
def test_packed_sequence(cls: type[nn.RNNBase], parent: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    rnn = cls(D, H, input_dropout=0.2)
    packed = pack_padded_sequence(torch.randn(T, 3, D), torch.tensor([7, 5, 2]))
    rnn.train()
    with pytest.raises(InputShapeError, match="PackedSequence"):
        rnn(packed)
    # Eval (and zero rates) use the parent's kernel, which accepts packed input.
    rnn.eval()
    ref = parent(D, H).eval()
    ref.load_state_dict(rnn.state_dict())
    assert torch.equal(rnn(packed)[0].data, ref(packed)[0].data)
    rnn0 = cls(D, H).train()
    rnn0(packed)


@pytest.mark.parametrize(("cls", "parent"), VARIANTS)
@pytest.mark.parametrize("p_h", [0.0, 0.3])
def test_weight_drop_mask_is_fixed_across_the_sequence(
    cls: type[nn.RNNBase], parent: type[nn.RNNBase], p_h: float
) -> None:
    torch.manual_seed(0)
    p_x = 0.3
    rnn = add_weight_dropout(cls(D, H, input_dropout=p_x, recurrent_dropout=p_h), 0.5)
    rnn.train()
    drop = rnn.parametrizations.weight_hh_l0[0]
    assert isinstance(drop, DropConnect)
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor], output: Tensor) -> None:
        if output.requires_grad:
            output.retain_grad()
        captured.append(output)

    handle = drop.register_forward_hook(hook)
    x = torch.randn(T, N, D)
    torch.manual_seed(3)
    out = rnn(x)[0]
    # The loop reads the parametrized weight once per forward: one mask for all T steps.
    assert len(captured) == 1
    dropped = captured[0].detach()
    raw = rnn.parametrizations.weight_hh_l0.original.detach()
    assert bool((dropped == 0).any())
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], raw[kept] * 2, rtol=1e-6, atol=0)

    def hh_grad() -> Tensor:
        grad = captured[-1].grad
        assert grad is not None
        return grad

    mask_x, mask_h = _infer_masks(rnn, x, 3, hh_grad, p_x, p_h)
    handle.remove()
    weights = {
        "w_ih": rnn.weight_ih_l0.detach(),
        "w_hh": dropped,
        "b_ih": rnn.bias_ih_l0.detach(),
        "b_hh": rnn.bias_hh_l0.detach(),
    }
    step = _lstm_step if cls is VariationalLSTM else _gru_step
    ref = _manual(step, x, weights, mask_x, mask_h)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # The gradient reaches the raw weight only through kept entries.
    rnn.zero_grad()
    rnn(x)[0].sum().backward()
    assert rnn.parametrizations.weight_hh_l0.original.grad.abs().sum() > 0
    # Eval: no mask at all, equals the parent with the raw weights.
    rnn.eval()
    plain = parent(D, H).eval()
    plain.load_state_dict(
        {
            k.replace("parametrizations.", "").replace(".original", ""): v
            for k, v in rnn.state_dict().items()
        }
    )
    torch.testing.assert_close(rnn(x)[0], plain(x)[0], rtol=0, atol=1e-6)
