"""Max-norm (reference sheet §1.13) and L2 parameter groups / penalty."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from droptune.config import L2Config
from droptune.exceptions import ConfigError
from droptune.layers import add_weight_dropout
from droptune.layers import decay_split
from droptune.layers import l2_penalty
from droptune.layers import max_norm_
from droptune.layers import param_groups


# ------------------------------------------------------------------ max-norm


def _unit_norms(weight: Tensor, dim: int = 0) -> Tensor:
    """L2 norm of each unit's incoming weights: slices along ``dim``."""
    return weight.detach().transpose(0, dim).flatten(1).norm(dim=1)


def _expected_projection(weight: Tensor, c: float, dim: int = 0) -> Tensor:
    norms = _unit_norms(weight, dim)
    scale = torch.where(norms > c, c / norms, torch.ones_like(norms))
    shape = [1] * weight.dim()
    shape[dim] = -1
    return weight.detach() * scale.view(shape)


def test_max_norm_after_huge_sgd_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    loss = model(torch.randn(16, 10)).pow(2).sum()
    loss.backward()
    opt.step()
    c = 3.0
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    assert max(float(_unit_norms(w).max()) for w in before) > 10 * c
    assert max_norm_(model, c) == 2
    for module, old in zip((model[0], model[2]), before, strict=True):
        norms = _unit_norms(module.weight)
        assert float(norms.max()) <= c + 1e-5
        torch.testing.assert_close(module.weight.detach(), _expected_projection(old, c))


def test_rows_under_the_bound_are_untouched_exactly() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 40)
    with torch.no_grad():
        layer.weight[::2] *= 50.0  # half the rows far outside the ball
    c = 2.0
    old = layer.weight.detach().clone()
    old_bias = layer.bias.detach().clone()
    inside = _unit_norms(old) <= c
    assert bool(inside.any()) and bool((~inside).any())
    assert max_norm_(layer, c) == 1
    assert torch.equal(layer.weight[inside], old[inside])
    assert torch.equal(layer.bias, old_bias)  # biases are not constrained
    assert float(_unit_norms(layer.weight).max()) <= c + 1e-5
    # Projected rows keep their direction.
    torch.testing.assert_close(layer.weight.detach(), _expected_projection(old, c))
    # Idempotent.
    projected = layer.weight.detach().clone()
    max_norm_(layer, c)
    # (renorm scales by c / (norm + 1e-7): a row landing a rounding error above c is rescaled
    # by ~1 - 1e-7 again, so compare to float32 precision.)
    torch.testing.assert_close(layer.weight.detach(), projected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv1d(3, 8, 5), id="conv1d"),
        pytest.param(lambda: nn.Conv2d(3, 8, 3), id="conv2d"),
        pytest.param(lambda: nn.Conv3d(2, 4, 2), id="conv3d"),
    ],
)
def test_conv_per_filter(conv: object) -> None:
    torch.manual_seed(0)
    layer: nn.Module = conv()  # type: ignore[operator]
    with torch.no_grad():
        layer.weight.mul_(10.0)
        layer.weight[0].mul_(0.001)  # one filter inside the ball
    c = 1.0
    old = layer.weight.detach().clone()
    assert max_norm_(layer, c) == 1
    assert float(_unit_norms(layer.weight).max()) <= c + 1e-5
    assert torch.equal(layer.weight[0], old[0])
    torch.testing.assert_close(layer.weight.detach(), _expected_projection(old, c))


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.ConvTranspose1d(6, 3, 3), id="convT1d"),
        pytest.param(lambda: nn.ConvTranspose2d(6, 3, 3), id="convT2d"),
    ],
)
def test_conv_transpose_uses_axis_1(conv: object) -> None:
    torch.manual_seed(0)
    layer: nn.Module = conv()  # type: ignore[operator]
    with torch.no_grad():
        layer.weight.mul_(10.0)  # shape (in, out, k...): an output unit's weights are [:, j]
    c = 1.0
    old = layer.weight.detach().clone()
    assert max_norm_(layer, c) == 1
    assert float(_unit_norms(layer.weight, dim=1).max()) <= c + 1e-5
    torch.testing.assert_close(layer.weight.detach(), _expected_projection(old, c, dim=1))
    # Not the axis-0 projection (which would bound the per-input slices instead).
    assert not torch.allclose(layer.weight.detach(), _expected_projection(old, c, dim=0))


def test_dropconnect_linear_is_constrained_through_raw_weight() -> None:
    torch.manual_seed(0)
    layer = add_weight_dropout(nn.Linear(5, 7), 0.5)
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        raw.mul_(20.0)
    old = raw.detach().clone()
    c = 1.5
    assert max_norm_(nn.Sequential(layer), c) == 1
    assert float(_unit_norms(raw).max()) <= c + 1e-5
    torch.testing.assert_close(raw.detach(), _expected_projection(old, c))
    assert isinstance(raw, nn.Parameter)
    layer.eval()
    assert torch.equal(layer.weight, raw)


def test_weight_norm_linear_is_constrained() -> None:
    torch.manual_seed(0)
    layer = weight_norm(nn.Linear(5, 7))
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(20.0)  # the magnitudes g
    old = layer.weight.detach().clone()
    c = 1.5
    assert max_norm_(layer, c) == 1
    assert float(_unit_norms(layer.weight).max()) <= c + 1e-5
    torch.testing.assert_close(layer.weight.detach(), _expected_projection(old, c))


def test_weight_norm_with_dropconnect_is_constrained() -> None:
    torch.manual_seed(0)
    layer = add_weight_dropout(weight_norm(nn.Linear(5, 7)), 0.5).train()
    plist = layer.parametrizations.weight
    assert len(plist) == 2
    with torch.no_grad():
        plist.original0.mul_(20.0)
    c = 1.5
    assert max_norm_(layer, c) == 1
    # Stochastic parametrizations are switched back on afterwards.
    assert layer.training and plist[1].training
    layer.eval()
    assert float(_unit_norms(layer.weight).max()) <= c + 1e-5
    layer.train()
    with torch.no_grad():
        dropped = layer.weight
    assert bool((dropped == 0).any())


def test_max_norm_count_and_errors() -> None:
    model = nn.ModuleDict(
        {
            "lin": nn.Linear(3, 3),
            "lin_nobias": nn.Linear(3, 3, bias=False),
            "conv": nn.Conv1d(3, 3, 2),
            "convt": nn.ConvTranspose2d(3, 3, 2),
            "lstm": nn.LSTM(3, 3),
            "emb": nn.Embedding(4, 3),
            "bn": nn.BatchNorm1d(3),
        }
    )
    assert max_norm_(model, 4.0) == 4
    assert max_norm_(nn.ReLU(), 4.0) == 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="max_norm"):
            max_norm_(model, bad)


# ------------------------------------------------------------------ decay split / L2


def _zoo() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "emb": nn.Embedding(10, 8),
            "lin": nn.Linear(8, 8),
            "conv": nn.Conv1d(8, 8, 3),
            "lstm": nn.LSTM(8, 8, num_layers=2),
            "gru": nn.GRU(8, 8),
            "bn": nn.BatchNorm1d(8),
            "ln": nn.LayerNorm(8),
            "gn": nn.GroupNorm(2, 8),
            "frozen": nn.Linear(8, 8),
            "head": nn.Linear(8, 3, bias=False),
        }
    )


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def test_decay_split_rules() -> None:
    model = _zoo()
    for p in model["frozen"].parameters():
        p.requires_grad_(False)
    decay, no_decay = decay_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay}
    no_decay_names = {names[id(p)] for p in no_decay}
    assert decay_names == {
        "emb.weight",
        "lin.weight",
        "conv.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "head.weight",
    }
    assert no_decay_names == {
        "lin.bias",
        "conv.bias",
        "lstm.bias_ih_l0",
        "lstm.bias_hh_l0",
        "lstm.bias_ih_l1",
        "lstm.bias_hh_l1",
        "gru.bias_ih_l0",
        "gru.bias_hh_l0",
        "bn.weight",
        "bn.bias",
        "ln.weight",
        "ln.bias",
        "gn.weight",
        "gn.bias",
    }
    # Every trainable parameter exactly once, frozen ones nowhere.
    together = decay + no_decay
    assert len(together) == len(_ids(together))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert _ids(together) == _ids(trainable)
    assert not (_ids(together) & _ids(list(model["frozen"].parameters())))


def test_decay_split_shared_and_parametrized() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10)
    head.weight = emb.weight  # tied
    lstm = add_weight_dropout(nn.LSTM(4, 4, bidirectional=True), 0.5)
    wn = weight_norm(nn.Linear(4, 4))
    norm = nn.LayerNorm(4)
    model = nn.ModuleList([emb, head, lstm, wn, norm])
    decay, no_decay = decay_split(model)
    together = decay + no_decay
    assert len(together) == len(_ids(together))
    assert _ids(together) == _ids(list(model.parameters()))
    assert id(emb.weight) in _ids(decay)
    assert id(head.bias) in _ids(no_decay)
    for name in ("weight_hh_l0", "weight_hh_l0_reverse"):
        assert id(lstm.parametrizations[name].original) in _ids(decay)
    assert id(lstm.bias_hh_l0_reverse) in _ids(no_decay)
    assert id(wn.parametrizations.weight.original1) in _ids(decay)
    assert id(wn.bias) in _ids(no_decay)
    assert _ids(list(norm.parameters())) <= _ids(no_decay)


def test_param_groups_modes() -> None:
    model = _zoo()
    decay, no_decay = decay_split(model)
    groups = param_groups(model, 0.01)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [_ids(g["params"]) for g in groups] == [_ids(decay), _ids(no_decay)]
    coupled = param_groups(model, 0.01, mode="coupled")
    assert [g["weight_decay"] for g in coupled] == [0.0, 0.0]
    assert [_ids(g["params"]) for g in coupled] == [_ids(decay), _ids(no_decay)]
    # L2Config: its mode unless overridden.
    cfg = L2Config(strength=0.02, mode="coupled")
    assert [g["weight_decay"] for g in param_groups(model, cfg)] == [0.0, 0.0]
    assert [g["weight_decay"] for g in param_groups(model, cfg, mode="decoupled")] == [0.02, 0.0]
    assert [g["weight_decay"] for g in param_groups(model, L2Config(strength=0.3))] == [0.3, 0.0]
    # The groups are accepted by torch optimizers.
    torch.optim.AdamW(groups, lr=1e-3)
    torch.optim.SGD(coupled, lr=1e-3)


def test_l2_penalty_values() -> None:
    model = _zoo()
    lam = 0.05
    decay, _ = decay_split(model)
    by_hand = sum(float(p.detach().double().pow(2).sum()) for p in decay) * lam
    penalty = l2_penalty(model, lam, mode="coupled")
    assert penalty.dim() == 0
    assert penalty.requires_grad
    assert abs(penalty.item() - by_hand) <= 1e-5 * by_hand
    cfg = L2Config(strength=lam, mode="coupled")
    assert torch.equal(l2_penalty(model, cfg), penalty)
    # Decoupled (default for floats), or strength 0: no penalty term.
    for value in (
        l2_penalty(model, lam),
        l2_penalty(model, L2Config(strength=lam)),
        l2_penalty(model, cfg, mode="decoupled"),
        l2_penalty(model, 0.0, mode="coupled"),
    ):
        assert float(value) == 0.0
    # A model without decayed parameters.
    assert float(l2_penalty(nn.LayerNorm(3), lam, mode="coupled")) == 0.0
    # Biases and norm parameters do not contribute.
    layer = nn.Sequential(nn.Linear(2, 1), nn.LayerNorm(1))
    with torch.no_grad():
        layer[0].weight.fill_(2.0)
        layer[0].bias.fill_(100.0)
    assert l2_penalty(layer, 0.5, mode="coupled").item() == pytest.approx(0.5 * 8.0)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))


def _loss(model: nn.Module) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=gen)
    y = torch.randn(8, 2, generator=gen)
    return (model(x) - y).pow(2).mean()


def test_decoupled_adamw_step_shrinks_weights_only() -> None:
    lam, lr = 0.1, 0.01
    with_decay, without = _net(), _net()
    start = {n: p.detach().clone() for n, p in with_decay.named_parameters()}
    for model, strength in ((with_decay, lam), (without, 0.0)):
        opt = torch.optim.AdamW(param_groups(model, strength), lr=lr)
        _loss(model).backward()
        opt.step()
    decayed = {id(p) for p in decay_split(with_decay)[0]}
    for (name, p), q in zip(with_decay.named_parameters(), without.parameters(), strict=True):
        if id(p) in decayed:
            # AdamW: w ← w − lr·λ·w, then the same Adam update for both models.
            torch.testing.assert_close(p - q, -lr * lam * start[name], rtol=1e-4, atol=1e-7)
            assert not torch.equal(p, q)
        else:
            assert torch.equal(p, q), name  # biases and LayerNorm untouched by decay
    assert len(decayed) == 2


def test_coupled_penalty_equals_gradient_2_lambda_w() -> None:
    lam, lr = 0.1, 0.05
    coupled, manual = _net(), _net()
    opt = torch.optim.SGD(param_groups(coupled, lam, mode="coupled"), lr=lr)
    (_loss(coupled) + l2_penalty(coupled, lam, mode="coupled")).backward()
    opt.step()
    decayed = {id(p) for p in decay_split(manual)[0]}
    _loss(manual).backward()
    with torch.no_grad():
        for p in manual.parameters():
            grad = p.grad + (2 * lam * p if id(p) in decayed else 0.0)
            p -= lr * grad
    for p, q in zip(coupled.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # And the penalty did something.
    plain = _net()
    torch.optim.SGD(plain.parameters(), lr=lr)
    _loss(plain).backward()
    with torch.no_grad():
        for p in plain.parameters():
            p -= lr * p.grad
    assert not torch.allclose(coupled[0].weight, plain[0].weight)
    assert torch.allclose(coupled[0].bias, plain[0].bias)


def test_l2_errors() -> None:
    model = _zoo()
    for fn in (param_groups, l2_penalty):
        with pytest.raises(ConfigError, match="mode"):
            fn(model, 0.1, mode="sideways")
        with pytest.raises(ConfigError, match="strength"):
            fn(model, -0.1)
        with pytest.raises(ConfigError, match="strength"):
            fn(model, float("nan"))
        with pytest.raises(ConfigError):
            fn(model, True)  # type: ignore[arg-type]
        # An L2Config-like object with a bad mode.
        bad = L2Config.model_construct(strength=0.1, mode="sideways")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="mode"):
            fn(model, bad)
    # Integers are fine.
    assert param_groups(model, 0)[0]["weight_decay"] == 0.0
