"""Population networks compute, member by member, what the single networks compute: same
forward for the same weights, the same initial weights for the same seed, and each member's own
dropout rates."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torch import nn

from droptune.config import TrainConfig
from droptune.data import DataInfo
from droptune.models import build_network
from droptune.population import PopulationNetwork
from droptune.population import build_population
from droptune.training import build_datamodule
from droptune.training import build_module
from tests.layers._stats import assert_fraction
from tests.population._helpers import member


FAMILIES: dict[str, dict[str, Any]] = {
    "mlp": {"model": {"family": "mlp", "hidden": [16, 8]}},
    "mlp-batch": {"model": {"family": "mlp", "hidden": [16, 8], "norm": "batch"}},
    "mlp-layer-selu-alpha": {
        "model": {"family": "mlp", "hidden": [16], "norm": "layer", "activation": "selu"},
        "regularization": {"dropout": {"kind": "alpha", "input_rate": 0.1}},
    },
    "mlp-dropconnect-gelu": {
        "model": {"family": "mlp", "hidden": [16], "activation": "gelu"},
        "regularization": {"dropout": {"kind": "gaussian", "weight_rate": 0.2}},
    },
    "cnn2d-batch": {
        "model": {"family": "cnn", "channels": [3, 5], "hidden": [8], "norm": "batch"}
    },
    "cnn2d-layer-spatial": {
        "model": {"family": "cnn", "channels": [3], "hidden": [8], "norm": "layer"},
        "regularization": {"dropout": {"kind": "spatial", "input_rate": 0.1}},
    },
    "cnn2d-dropblock-elu": {
        "model": {"family": "cnn", "channels": [3], "hidden": [], "activation": "elu"},
        "regularization": {"dropout": {"kind": "dropblock"}},
    },
    "cnn-no-conv": {"model": {"family": "cnn", "channels": [], "hidden": [8]}},
    "cnn1d": {
        "data": {"name": "mnist1d"},
        "model": {"family": "cnn", "channels": [3, 4], "hidden": [8], "kernel_size": 5},
    },
    "rnn-gru": {"model": {"family": "rnn", "hidden_size": 8}},
    "rnn-lstm-2x-bi-variational": {
        "model": {
            "family": "rnn",
            "cell": "lstm",
            "hidden_size": 6,
            "num_layers": 2,
            "bidirectional": True,
        },
        "regularization": {
            "dropout": {
                "kind": "variational",
                "input_rate": 0.1,
                "recurrent_rate": 0.2,
                "recurrent_weight_rate": 0.3,
            }
        },
    },
}

# Member i gets rate RATES[i] at every site: a population of mixed rates, one of them 0.
RATES = [0.0, 0.3, 0.6]
RATE_FIELDS = (
    "input_rate",
    "hidden_rate",
    "conv_rate",
    "recurrent_rate",
    "weight_rate",
    "recurrent_weight_rate",
)


def population_configs(sections: dict[str, Any], rates: list[float] = RATES) -> list[TrainConfig]:
    base = member(**sections)
    if base.regularization.dropout.kind == "none":
        base = base.with_overrides({"regularization.dropout.kind": "standard"})
    return [
        base.with_overrides(
            {"train.seed": 10 + i, **{f"regularization.dropout.{f}": r for f in RATE_FIELDS}}
        )
        for i, r in enumerate(rates)
    ]


def data_of(cfg: TrainConfig) -> tuple[DataInfo, Tensor]:
    datamodule = build_datamodule(cfg)
    return datamodule.info, datamodule.splits["val"][0][:40]


def randomize(population: PopulationNetwork) -> None:
    """Every stacked tensor random (variances positive): a strong forward comparison."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*population.named_parameters(), *population.named_buffers()]:
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.is_floating_point() and not name.endswith((".p", "rate", "active")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("rates", [RATES, [0.0, 0.0]], ids=["rates", "no-dropout"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_member_computes_its_single_network(name: str, rates: list[float]) -> None:
    """Also with every rate 0, where the first layer reads the shared input in one GEMM."""
    configs = population_configs(FAMILIES[name], rates)
    info, x = data_of(configs[0])
    population = build_population(configs, info)
    randomize(population)
    population.eval()
    out = population(x)
    assert out.shape == (len(configs), len(x), 10)
    for index, cfg in enumerate(configs):
        single = build_network(cfg, info)
        single.load_state_dict(population.member_state_dict(index))  # strict: same keys
        single.eval()
        torch.testing.assert_close(out[index], single(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_initial_weights_are_the_single_paths_for_each_seed(name: str) -> None:
    configs = population_configs(FAMILIES[name])
    info, _ = data_of(configs[0])
    state = torch.random.get_rng_state()
    population = build_population(configs, info)
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's RNG moved"
    for index, cfg in enumerate(configs):
        module = build_module(cfg)  # what fit() trains: seeded from train.seed
        expected = module.net.state_dict()
        got = population.member_state_dict(index)
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"member {index} {key}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_member_with_zero_rates_sees_no_dropout(name: str) -> None:
    """Training mode differs from eval mode only by dropout (no batch norm here): the member
    with all rates 0 gives the eval output exactly, the others do not."""
    if "batch" in name:
        pytest.skip("batch norm differs between train and eval by design")
    configs = population_configs(FAMILIES[name])
    info, x = data_of(configs[0])
    population = build_population(configs, info)
    expected = population.eval()(x)
    got = population.train()(x)
    assert torch.allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)
    for index in (1, 2):
        assert not torch.allclose(got[index], expected[index], atol=1e-3), index


def _inputs_of(module: nn.Module, run: Any) -> list[Tensor]:
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("site", ["input", "hidden"])
def test_each_member_drops_at_its_own_rate(site: str) -> None:
    """Standard dropout at a dense site: member i zeroes a fraction rates[i] of the units
    (binomial, 5σ) and scales the kept ones by 1 / (1 - rates[i])."""
    rates = [0.0, 0.5, 0.2]
    base = member(model={"family": "mlp", "hidden": [64]})
    configs = [
        base.with_overrides(
            {
                "regularization.dropout.kind": "standard",
                f"regularization.dropout.{site}_rate": rate,
                "train.seed": i,
            }
        )
        for i, rate in enumerate(rates)
    ]
    info = DataInfo((64,), "classification", 10)
    population = build_population(configs, info)
    with torch.no_grad():  # positive weights and inputs: every hidden unit is > 0
        for param in population.parameters():
            param.copy_(param.abs() + 0.01)
    x = torch.rand(500, 64) + 0.5
    target = population.linears[0] if site == "input" else population.linears[1]
    clean = _inputs_of(target, lambda: population.eval()(x))[0]
    dropped = _inputs_of(target, lambda: population.train()(x))[0]
    assert clean.shape == dropped.shape == (3, 500, 64)
    assert bool((clean > 0).all())
    for index, rate in enumerate(rates):
        zeros = dropped[index] == 0
        if rate == 0:
            assert torch.equal(dropped[index], clean[index])
            continue
        assert_fraction(int(zeros.sum()), zeros.numel(), rate, f"member {index} ({rate})")
        kept = ~zeros
        torch.testing.assert_close(dropped[index][kept], clean[index][kept] / (1 - rate))


def test_keep_selects_members() -> None:
    configs = population_configs(FAMILIES["mlp-batch"])
    info, x = data_of(configs[0])
    population = build_population(configs, info)
    randomize(population)
    states = [population.member_state_dict(i) for i in range(3)]
    population.eval()
    before = population(x)
    population.keep(torch.tensor([2, 0]))
    assert population.size == 2
    for row, old in ((0, 2), (1, 0)):
        for key, value in population.member_state_dict(row).items():
            assert torch.equal(value, states[old][key])
    torch.testing.assert_close(population(x), before[[2, 0]])
    # the per-member rates moved with their members
    drop = population.hidden_drop
    assert drop is not None and torch.equal(drop.p, torch.tensor([RATES[2], RATES[0]]))


def test_frozen_members_keep_their_batch_norm_statistics() -> None:
    configs = population_configs(FAMILIES["mlp-batch"])[:2]
    info, x = data_of(configs[0])
    population = build_population(configs, info).train()
    population.set_active(torch.tensor([True, False]))
    before = population.member_state_dict(1)
    moved = population.member_state_dict(0)
    population(x)
    after = population.member_state_dict(1)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    changed = population.member_state_dict(0)
    assert not torch.equal(changed["2.1.running_mean"], moved["2.1.running_mean"])


def test_frozen_members_keep_their_conv_batch_norm_statistics() -> None:
    configs = population_configs(FAMILIES["cnn2d-batch"])
    info, x = data_of(configs[0])
    population = build_population(configs, info).train()
    population.set_active(torch.tensor([True, False, True]))
    before = population.member_state_dict(1)
    population(x)
    after = population.member_state_dict(1)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert int(population.member_state_dict(0)["2.num_batches_tracked"]) == 1


@pytest.mark.parametrize("name", ["mlp-batch", "mlp-layer-selu-alpha", "cnn2d-batch", "rnn-gru"])
def test_fast_init_draws_the_single_paths_distributions_per_seed(name: str) -> None:
    """Reproducible per seed, each tensor with the exact init's spread and bound. (On the CPU
    the draws often even coincide with the exact init: a CPU generator seeded like the global
    one gives the same stream; not for SELU or DropConnect models, whose single path draws
    more.)"""
    configs = population_configs(FAMILIES[name])
    info, _ = data_of(configs[0])
    fast = build_population(configs, info, init="fast")
    again = build_population(configs, info, init="fast")
    exact = build_population(configs, info)
    for index in range(len(configs)):
        mine, theirs = fast.member_state_dict(index), exact.member_state_dict(index)
        same_seed = again.member_state_dict(index)
        assert all(torch.equal(v, same_seed[k]) for k, v in mine.items()), "not reproducible"
        for key, value in theirs.items():
            if value.numel() < 100 or not value.is_floating_point() or value.std() == 0:
                assert torch.equal(mine[key], value) or value.numel() < 100, key
                continue
            ratio = float(mine[key].std() / value.std())
            assert 0.8 < ratio < 1.25, (key, ratio)
            if "selu" not in name:  # uniform: the same bound
                assert float(mine[key].abs().max()) <= float(value.abs().max()) * 1.05, key
    first, second = fast.member_state_dict(0).values(), fast.member_state_dict(1).values()
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True) if a.numel() > 1)


def test_each_member_masks_its_recurrent_state_at_its_own_rate() -> None:
    rates = [0.0, 0.5, 0.25]
    base = member(
        model={"family": "rnn", "hidden_size": 50},
        regularization={"dropout": {"kind": "standard"}},
    )
    configs = [
        base.with_overrides({"regularization.dropout.recurrent_rate": r, "train.seed": i})
        for i, r in enumerate(rates)
    ]
    info, _ = data_of(configs[0])
    layer = build_population(configs, info).recurrent[0]
    mask = layer.recurrent_mask(torch.zeros(3, 400, 50))
    assert mask.shape == (3, 400, 50)
    assert torch.equal(mask[0], torch.ones(400, 50))
    for index in (1, 2):
        dropped = mask[index] == 0
        assert_fraction(int(dropped.sum()), dropped.numel(), rates[index], f"member {index}")
        assert torch.equal(
            mask[index][~dropped], torch.full_like(mask[index][~dropped], 1 / (1 - rates[index]))
        )
