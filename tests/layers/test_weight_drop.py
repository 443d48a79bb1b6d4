"""DropConnect / weight drop (reference sheet §1.5) on RNN ``weight_hh`` and ``nn.Linear``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from droptune.exceptions import ConfigError
from droptune.layers import DropConnect
from droptune.layers import add_weight_dropout
from droptune.layers import remove_weight_dropout


def _raw_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict of a parametrized module with the plain (un-parametrized) key names."""
    return {
        key.replace("parametrizations.", "").replace(".original", ""): value
        for key, value in module.state_dict().items()
    }


def _hh_names(num_layers: int, bidirectional: bool) -> list[str]:
    suffixes = ["", "_reverse"] if bidirectional else [""]
    return [f"weight_hh_l{k}{s}" for k in range(num_layers) for s in suffixes]


RNN_CASES = [
    pytest.param(nn.LSTM, 1, False, id="lstm"),
    pytest.param(nn.LSTM, 2, False, id="lstm-2layers"),
    pytest.param(nn.LSTM, 1, True, id="lstm-bidirectional"),
    pytest.param(nn.LSTM, 2, True, id="lstm-2layers-bidirectional"),
    pytest.param(nn.GRU, 1, False, id="gru"),
    pytest.param(nn.GRU, 2, True, id="gru-2layers-bidirectional"),
]


def _make(cls: type[nn.RNNBase], layers: int, bidi: bool, p: float = 0.5) -> nn.RNNBase:
    torch.manual_seed(0)
    rnn = cls(5, 7, num_layers=layers, bidirectional=bidi)
    return add_weight_dropout(rnn, p)  # type: ignore[return-value]


@pytest.mark.parametrize(("cls", "layers", "bidi"), RNN_CASES)
def test_default_targets_every_weight_hh(cls: type[nn.RNNBase], layers: int, bidi: bool) -> None:
    rnn = _make(cls, layers, bidi)
    names = _hh_names(layers, bidi)
    for name in names:
        assert parametrize.is_parametrized(rnn, name)
        assert isinstance(rnn.parametrizations[name][0], DropConnect)
    assert sorted(rnn.parametrizations.keys()) == sorted(names)
    # The raw weight is the only trainable copy: no extra parameter appears.
    plain = cls(5, 7, num_layers=layers, bidirectional=bidi)
    assert len(list(rnn.parameters())) == len(list(plain.parameters()))


@pytest.mark.parametrize(("cls", "layers", "bidi"), RNN_CASES)
def test_first_step_equal_later_steps_differ(
    cls: type[nn.RNNBase], layers: int, bidi: bool
) -> None:
    rnn = _make(cls, layers, bidi, p=0.5).train()
    x = torch.randn(6, 3, 5)
    torch.manual_seed(1)
    out1 = rnn(x)[0]
    out2 = rnn(x)[0]
    h = 7
    if not bidi:
        # h0 = 0: W_hh only enters from t=1 on, so t=0 does not see the mask (AWD-LSTM self-test).
        assert torch.equal(out1[0], out2[0])
        for t in range(1, 6):
            assert not torch.allclose(out1[t], out2[t]), t
    elif layers == 1:
        # Forward direction starts at t=0, the reverse direction at t=T-1.
        assert torch.equal(out1[0, :, :h], out2[0, :, :h])
        assert torch.equal(out1[-1, :, h:], out2[-1, :, h:])
        assert not torch.allclose(out1[1:, :, :h], out2[1:, :, :h])
        assert not torch.allclose(out1[:-1, :, h:], out2[:-1, :, h:])
    else:
        # Layer 2 reads the reverse direction of layer 1 at every t: everything is perturbed.
        for t in range(6):
            assert not torch.allclose(out1[t], out2[t]), t


@pytest.mark.parametrize(("cls", "layers", "bidi"), RNN_CASES)
def test_eval_equals_plain_rnn_with_raw_weights(
    cls: type[nn.RNNBase], layers: int, bidi: bool
) -> None:
    rnn = _make(cls, layers, bidi)
    plain = cls(5, 7, num_layers=layers, bidirectional=bidi)
    plain.load_state_dict(_raw_state(rnn))
    x = torch.randn(6, 3, 5)
    rnn.train()
    rnn(x)  # a training forward first: eval must not keep a stale dropped weight
    rnn.eval()
    plain.eval()
    out, state = rnn(x)
    ref, ref_state = plain(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=1e-6)
    # Deterministic in eval.
    assert torch.equal(rnn(x)[0], out)


@pytest.mark.parametrize(("cls", "layers", "bidi"), RNN_CASES)
def test_raw_weight_gets_nonzero_gradient(cls: type[nn.RNNBase], layers: int, bidi: bool) -> None:
    rnn = _make(cls, layers, bidi).train()
    out = rnn(torch.randn(6, 3, 5))[0]
    out.pow(2).sum().backward()
    for name in _hh_names(layers, bidi):
        raw = rnn.parametrizations[name].original
        assert raw.grad is not None
        assert raw.grad.abs().sum() > 0, name
    # The gradient reaches only entries that were kept: with p close to 1 many entries of the
    # raw gradient are exactly zero (sampled mask shared by the batch and all steps).
    rnn2 = _make(cls, layers, bidi, p=0.9).train()
    rnn2(torch.randn(6, 3, 5))[0].sum().backward()
    grad = rnn2.parametrizations[_hh_names(layers, bidi)[0]].original.grad
    assert grad is not None
    assert (grad == 0).float().mean() > 0.5


def test_train_eval_cycles_do_not_raise() -> None:
    # The AWD-LSTM recipe raises "cannot assign 'torch.FloatTensor' as parameter" on the second
    # training forward after an eval forward (salesforce/awd-lstm-lm#79).
    rnn = _make(nn.LSTM, 2, True)
    x = torch.randn(4, 2, 5)
    keys = set(rnn.state_dict())
    for _ in range(3):
        rnn.train()
        rnn(x)[0].sum().backward()
        rnn.eval()
        with torch.no_grad():
            rnn(x)
    assert set(rnn.state_dict()) == keys
    assert all(isinstance(p, nn.Parameter) for p in rnn.parameters())


def test_to_float64_keeps_working() -> None:
    rnn = _make(nn.LSTM, 1, False)
    rnn.to(torch.float64)
    assert rnn.parametrizations.weight_hh_l0.original.dtype == torch.float64
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    rnn.train()
    a = rnn(x)[0]
    b = rnn(x)[0]
    assert a.dtype == torch.float64
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1:], b[1:])
    a.sum().backward()
    rnn.eval()
    assert torch.equal(rnn(x)[0], rnn(x)[0])
    rnn.train()
    rnn(x)


@pytest.mark.parametrize(("cls", "layers", "bidi"), RNN_CASES[:4])
def test_state_dict_round_trip(cls: type[nn.RNNBase], layers: int, bidi: bool) -> None:
    rnn = _make(cls, layers, bidi)
    state = rnn.state_dict()
    for name in _hh_names(layers, bidi):
        assert f"parametrizations.{name}.original" in state
        assert name not in state
    torch.manual_seed(123)  # a different initialisation
    fresh = add_weight_dropout(cls(5, 7, num_layers=layers, bidirectional=bidi), 0.5)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(4, 2, 5)
    rnn.eval()
    fresh.eval()
    assert torch.equal(rnn(x)[0], fresh(x)[0])


def test_remove_weight_dropout_restores_plain_keys() -> None:
    rnn = _make(nn.LSTM, 2, True)
    raw = {k: v.clone() for k, v in _raw_state(rnn).items()}
    model = nn.Sequential(rnn)
    assert remove_weight_dropout(model) == 4
    assert not parametrize.is_parametrized(rnn)
    assert type(rnn) is nn.LSTM
    plain = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    assert list(rnn.state_dict()) == list(plain.state_dict())
    for key, value in rnn.state_dict().items():
        assert torch.equal(value, raw[key]), key
    # Plain LSTM again: training forwards are deterministic.
    rnn.train()
    x = torch.randn(4, 2, 5)
    assert torch.equal(rnn(x)[0], rnn(x)[0])
    assert remove_weight_dropout(model) == 0
    # Linear too: the key order is nn.Linear's (parametrize alone would put weight last).
    layer = add_weight_dropout(nn.Linear(3, 2), 0.5)
    assert remove_weight_dropout(layer) == 1
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]


def test_add_twice_updates_rate_instead_of_stacking() -> None:
    rnn = _make(nn.LSTM, 1, False, p=0.5)
    add_weight_dropout(rnn, 0.2, rows=True)
    plist = rnn.parametrizations.weight_hh_l0
    assert len(plist) == 1
    assert plist[0].p == 0.2
    assert plist[0].rows is True
    layer = add_weight_dropout(add_weight_dropout(nn.Linear(3, 4), 0.3), 0.0)
    assert len(layer.parametrizations.weight) == 1
    layer.train()
    # Rate 0 now: the weight is the raw weight.
    assert torch.equal(layer.weight, layer.parametrizations.weight.original)


def test_linear_mean_of_training_forwards_is_unbiased() -> None:
    torch.manual_seed(0)
    p = 0.5
    layer = add_weight_dropout(nn.Linear(6, 3), p).train()
    x = torch.randn(6)
    n = 4000
    with torch.no_grad():
        outs = torch.stack([layer(x) for _ in range(n)]).double()
        w = layer.parametrizations.weight.original.double()
        b = layer.bias.double()
    expected = w @ x.double() + b
    # y_i = b_i + sum_j W_ij x_j m_ij / (1-p), m_ij ~ Bernoulli(1-p) independent:
    # Var(y_i) = p/(1-p) * sum_j (W_ij x_j)^2 ; sigma_mean = sqrt(Var / n).
    sigma = torch.sqrt(p / (1 - p) * (w * x.double()).pow(2).sum(1) / n)
    assert ((outs.mean(0) - expected).abs() < 5 * sigma).all()
    # ... and it really is stochastic, with the right per-forward spread (5σ on the std of a
    # sample variance is loose; check only the order of magnitude).
    assert (outs.std(0) > 0.5 * math.sqrt(n) * sigma).all()
    layer.eval()
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-6)


def test_linear_entries_are_zero_or_scaled() -> None:
    torch.manual_seed(0)
    p = 0.25
    layer = add_weight_dropout(nn.Linear(400, 500), p).train()
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        dropped = layer.weight
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], raw[kept] / (1 - p), rtol=1e-6, atol=0)
    n = raw.numel()
    frac = 1 - kept.double().mean().item()
    # Binomial fraction of dropped entries: sigma = sqrt(p(1-p)/n).
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_rows_true_drops_whole_rows() -> None:
    torch.manual_seed(0)
    p = 0.5
    layer = add_weight_dropout(nn.Linear(4, 20000), p, rows=True).train()
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        dropped = layer.weight
    row_zero = (dropped == 0).all(dim=1)
    row_kept = (dropped != 0).all(dim=1)
    assert bool((row_zero | row_kept).all())  # no mixed rows
    torch.testing.assert_close(dropped[row_kept], raw[row_kept] / (1 - p), rtol=1e-6, atol=0)
    n = raw.shape[0]
    # Fraction of dropped rows: binomial, sigma = sqrt(p(1-p)/n).
    assert abs(row_zero.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Entry-wise (the default) does mix within rows.
    entry = add_weight_dropout(nn.Linear(4, 2000), p).train()
    with torch.no_grad():
        w = entry.weight
    mixed = ~((w == 0).all(1) | (w != 0).all(1))
    assert bool(mixed.any())


def test_rows_on_lstm_weight_hh() -> None:
    rnn = add_weight_dropout(nn.LSTM(3, 50), 0.5, rows=True).train()
    with torch.no_grad():
        w = rnn.weight_hh_l0
    assert bool(((w == 0).all(1) | (w != 0).all(1)).all())
    assert bool((w == 0).all(1).any())


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="Conv1d"):
        add_weight_dropout(nn.Conv1d(2, 3, 3), 0.5)
    with pytest.raises(ConfigError, match="nope"):
        add_weight_dropout(nn.Linear(2, 3), 0.5, names=["nope"])
    with pytest.raises(ConfigError):
        add_weight_dropout(nn.LSTM(2, 3), 0.5, names=["weight_hh_l1"])  # only one layer
    with pytest.raises(ConfigError):
        add_weight_dropout(nn.Linear(2, 3), 1.0)
    with pytest.raises(ConfigError):
        add_weight_dropout(nn.Linear(2, 3), -0.1)
    # Explicit names work for other modules.
    conv = add_weight_dropout(nn.Conv1d(2, 3, 3), 0.5, names=["weight"])
    assert parametrize.is_parametrized(conv, "weight")


def test_assigning_the_weight_sets_the_raw_weight() -> None:
    layer = nn.Linear(3, 2)
    weight = layer.weight
    add_weight_dropout(layer, 0.5)
    # The raw weight is the very Parameter the module had (an optimizer built before still works).
    assert layer.parametrizations.weight.original is weight
    new = torch.arange(6.0).reshape(2, 3)
    with torch.no_grad():
        layer.weight = new
    raw = layer.parametrizations.weight.original
    assert isinstance(raw, nn.Parameter)
    assert torch.equal(raw, new)


def test_zero_rate_and_eval_return_raw_weight() -> None:
    dc = DropConnect(0.5)
    w = torch.randn(3, 4)
    dc.eval()
    assert dc(w) is w
    dc = DropConnect(0.0).train()
    assert dc(w) is w
    assert "rows=True" in repr(DropConnect(0.1, rows=True))
