"""MC dropout (reference sheet §1.12, pitfall 11): dropout on, BatchNorm on running statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch import nn

from droptune.exceptions import ConfigError
from droptune.layers import Dropout
from droptune.layers import SelfAttention
from droptune.layers import VariationalLSTM
from droptune.layers import add_weight_dropout
from droptune.layers import mc_dropout
from droptune.layers import mc_predict


def _bn_net(p: float = 0.5) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3)
    )
    # Non-trivial running statistics, far from the statistics of the test batch.
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(32, 4) * 3 + 2)
    return net


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _bn_state(net: nn.Sequential) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in net[1].state_dict().items()}


def test_mc_passes_differ_and_batchnorm_is_frozen() -> None:
    net = _bn_net().eval()
    x = torch.randn(8, 4)
    before = _bn_state(net)
    with torch.no_grad(), mc_dropout(net) as model:
        assert model is net
        assert not net[1].training  # BatchNorm on running statistics
        assert net[3].training  # dropout stochastic
        a, b = net(x), net(x)
    assert not torch.allclose(a, b)
    mean, var = mc_predict(net, x, samples=10)
    assert mean.shape == var.shape == (8, 3)
    assert bool((var > 0).all())
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, before[key]), key  # running_mean/var, num_batches_tracked
    # Plain eval stays deterministic afterwards.
    assert torch.equal(net(x), net(x))


def test_batchnorm_uses_running_statistics() -> None:
    net = _bn_net(p=0.0)
    x = torch.randn(8, 4)
    net.eval()
    expected = net(x)
    net.train()  # even from train mode, MC must not switch BN to batch statistics
    mean, var = mc_predict(net, x, samples=5)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
    assert float(var.abs().max()) <= 1e-12
    # A single example: BatchNorm in training mode would refuse it.
    mean1, _ = mc_predict(net, x[:1], samples=3)
    torch.testing.assert_close(mean1, expected[:1], rtol=0, atol=1e-6)
    # The output differs from what batch statistics would give (the test is not vacuous).
    with torch.no_grad():
        assert not torch.allclose(net.train()(x), expected, atol=1e-3)


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_flags_are_restored(start: str) -> None:
    net = nn.Sequential(_bn_net(), nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 3)))
    if start == "train":
        net.train()
    elif start == "eval":
        net.eval()
    else:
        net.train()
        net[0][1].eval()
        net[1][0].eval()
        net[0][3].train()
    before = _flags(net)
    mc_predict(net, torch.randn(4, 4), samples=3)
    assert _flags(net) == before
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(net):
        raise RuntimeError("boom")
    assert _flags(net) == before


def test_mean_and_variance_are_the_sample_moments() -> None:
    net = _bn_net()
    x = torch.randn(5, 4)
    torch.manual_seed(11)
    mean, var = mc_predict(net, x, samples=7)
    torch.manual_seed(11)
    with torch.no_grad(), mc_dropout(net):
        outs = torch.stack([net(x) for _ in range(7)]).double()
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), outs.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(var.double(), outs.var(0, unbiased=True), rtol=1e-5, atol=1e-9)
    # float64 models give float64 moments.
    mean64, var64 = mc_predict(net.double(), x.double(), samples=3)
    assert mean64.dtype == var64.dtype == torch.float64


def test_mc_mean_is_unbiased() -> None:
    torch.manual_seed(0)
    p = 0.5
    net = nn.Sequential(nn.Dropout(p), nn.Linear(6, 1))
    x = torch.randn(1, 6)
    n = 2000
    mean, var = mc_predict(net, x, samples=n)
    w = net[1].weight.detach().double()[0]
    expected = net.eval()(x).item()
    # y = b + Σ_j w_j x_j m_j / (1-p): Var(y) = p/(1-p) Σ_j (w_j x_j)^2, sigma_mean = sqrt(Var/n).
    var_y = p / (1 - p) * float((w * x[0].double()).pow(2).sum())
    assert abs(float(mean) - expected) < 5 * math.sqrt(var_y / n)
    # Sample variance: relative standard error sqrt((κ-1)/n) with kurtosis κ <= 3 for a weighted
    # sum of independent symmetric (p = 0.5) Bernoullis.
    assert abs(float(var) / var_y - 1) < 5 * math.sqrt(2 / n)


def test_no_dropout_gives_zero_variance() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(6, 4)
    mean, var = mc_predict(net, x, samples=4)
    assert float(var.abs().max()) <= 1e-12
    torch.testing.assert_close(mean, net.eval()(x), rtol=0, atol=1e-6)


def _assert_stochastic_only_under_mc(
    model: nn.Module, x: Tensor, transform: object = None
) -> None:
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    if isinstance(first, tuple):
        first, second = first[0], second[0]
    assert torch.equal(first, second)  # plain eval: deterministic
    mean, var = mc_predict(model, x, samples=6, transform=transform)  # type: ignore[arg-type]
    assert float(var.max()) > 1e-6
    assert mean.shape == first.shape
    assert not model.training  # restored


def test_droptune_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Dropout(0.5), nn.Linear(8, 2))
    _assert_stochastic_only_under_mc(model, torch.randn(3, 4))


def test_droptune_population_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Dropout(torch.tensor([0.0, 0.5])), nn.Linear(8, 2))
    x = torch.randn(2, 3, 4)  # (P, N, D)
    _, var = mc_predict(model, x, samples=5)
    assert float(var[0].abs().max()) <= 1e-12  # member 0 has rate 0
    assert float(var[1].max()) > 1e-6


def test_attention_dropout_inside_transformer_encoder_layer() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer.self_attn.dropout = 0.5  # the ONLY source of randomness: attention probabilities
    x = torch.randn(3, 5, 8)
    _assert_stochastic_only_under_mc(layer, x)
    # Within the context, two passes differ while BatchNorm-free eval elsewhere is untouched.
    with torch.no_grad(), mc_dropout(layer):
        assert not torch.allclose(layer(x), layer(x))


def test_bare_multihead_attention() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    _assert_stochastic_only_under_mc(Block(), torch.randn(3, 5, 8))


def test_self_attention() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(SelfAttention(8, 2, attn_dropout=0.5), nn.Linear(8, 2))
    _assert_stochastic_only_under_mc(model, torch.randn(3, 5, 8))


def test_variational_lstm() -> None:
    torch.manual_seed(0)
    rnn = VariationalLSTM(4, 6, recurrent_dropout=0.5)
    _assert_stochastic_only_under_mc(rnn, torch.randn(5, 3, 4), transform=lambda out: out[0])


def test_dropconnect_lstm() -> None:
    torch.manual_seed(0)
    rnn = add_weight_dropout(nn.LSTM(4, 6), 0.5)
    _assert_stochastic_only_under_mc(rnn, torch.randn(5, 3, 4), transform=lambda out: out[0])


def test_softmax_transform_gives_probabilities() -> None:
    net = _bn_net()
    mean, var = mc_predict(net, torch.randn(7, 4), samples=8, transform=lambda z: z.softmax(-1))
    torch.testing.assert_close(mean.sum(-1), torch.ones(7), rtol=0, atol=1e-6)
    assert bool((mean >= 0).all()) and bool((var >= 0).all())
    assert bool((var <= 0.25 + 1e-6).all())  # variance of a quantity in [0, 1]


@pytest.mark.parametrize("samples", [1, 0, -3, True, 2.5, "10"])
def test_samples_must_be_at_least_two(samples: object) -> None:
    with pytest.raises(ConfigError, match="samples"):
        mc_predict(nn.Linear(2, 2), torch.randn(1, 2), samples=samples)  # type: ignore[arg-type]
