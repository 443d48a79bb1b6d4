"""Functional populations (``torch.func``) of users' own models and the transformer family:
without dropout every member follows ``fit()`` step for step; with dropout the per-config
means over seeds agree with ``fit()``'s; each member drops at its own rate inside ``vmap``;
what cannot be batched is refused before training with a message naming the module and the
reason."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
import torch
from torch.func import functional_call
from torch.func import vmap

from droptune.config import TrainConfig
from droptune.exceptions import PopulationUnsupported
from droptune.layers import make_dropout
from droptune.population import FunctionalPopulation
from droptune.population import prepare_population
from droptune.population import train_population
from droptune.population._build import _REFUSED
from droptune.training import build_datamodule
from tests.layers._stats import assert_fraction
from tests.population._helpers import member
from tests.population._helpers import quiet_fit
from tests.population.test_train import assert_same_trajectory


torch.set_num_threads(1)


def custom(target: str, **kwargs: Any) -> dict[str, Any]:
    return {"model": {"family": "custom", "target": target, "kwargs": kwargs}}


SMALL = {"data": {"name": "digits", "train_subset": 300}}

# Without dropout a member is deterministic: it must follow fit() step for step.
TRAJECTORIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # a user's LightningModule: its own AdamW (weight decay handed to droptune) and a StepLR
    # that halves the learning rate every epoch
    "lightning-adamw-steplr-maxnorm": (
        {**custom("tests.user_code.models:UserClassifier", hidden=16), "train": {"max_epochs": 3}},
        {"regularization.l2.strength": 0.01, "regularization.max_norm": 0.5},
    ),
    "lightning-sgd-coupled": (
        custom("tests.user_code.models:UserClassifier", hidden=16, optimizer="sgd", lr=0.05),
        {"regularization.l2.strength": 1e-3, "regularization.l2.mode": "coupled"},
    ),
    "examples-usernet": (
        custom("examples.user_model:UserNet", hidden=32),
        {"regularization.l2.strength": 0.05},
    ),
    "plain-module-clip-lr": (
        {
            **custom("tests.user_code.models:UserMLP", hidden=16),
            "train": {"gradient_clip": 0.5, "lr": 0.01},
        },
        {"train.lr": 0.003, "train.gradient_clip": 0.1},
    ),
    "plain-batchnorm-sgd": (
        {
            **custom("tests.population._models:BatchNormMLP"),
            "train": {"optimizer": "sgd", "lr": 0.05},
        },
        {"train.momentum": 0.5},
    ),
    "mapping-output": (
        custom("tests.user_code.models:DictOutputNet"),
        {"regularization.l2.strength": 0.01, "regularization.l2.mode": "coupled"},
    ),
    "transformer": (
        {
            "data": {"name": "mnist1d", "train_subset": 300},
            "model": {"family": "transformer", "d_model": 8, "heads": 2, "depth": 1},
        },
        {"regularization.l2.strength": 0.01},
    ),
}


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_without_dropout_each_member_follows_fit(name: str) -> None:
    sections, second = TRAJECTORIES[name]
    first = member(3, **{**SMALL, **sections})
    configs = [first, first.with_overrides({**second, "train.seed": 4})]
    results = train_population(configs)
    for result, cfg in zip(results, configs, strict=True):
        assert_same_trajectory(result, cfg, rtol=1e-4)


def test_a_user_scheduler_sets_every_members_learning_rate() -> None:
    """UserClassifier's StepLR halves its lr (1e-2) after every epoch: the history says so."""
    cfg = member(
        0,
        **SMALL,
        **custom("tests.user_code.models:UserClassifier", hidden=8),
        train={"max_epochs": 3},
    )
    (result,) = train_population([cfg])
    assert [row["lr"] for row in result.history] == pytest.approx([1e-2, 5e-3, 2.5e-3])


def test_returned_weights_load_into_the_members_own_module() -> None:
    cfg = member(0, **SMALL, **custom("tests.user_code.models:UserMLP"), train={"max_epochs": 2})
    configs = [cfg, cfg.with_overrides({"train.seed": 1})]
    results = train_population(configs, return_weights=True)
    data = build_datamodule(configs[0])
    x, y = data.splits["val"]
    for result in results:
        from tests.user_code.models import UserMLP

        net = UserMLP()
        assert result.state_dict is not None
        net.load_state_dict(result.state_dict)  # the plain module's own keys
        loss = float(torch.nn.functional.cross_entropy(net.eval()(x), y))
        assert loss == pytest.approx(result.metrics["val_loss"], rel=1e-5)


def test_a_frozen_member_keeps_its_batch_norm_statistics() -> None:
    cfg = member(0, **SMALL, **custom("tests.population._models:BatchNormMLP"))
    prepared = prepare_population([cfg, cfg.with_overrides({"train.seed": 1})])
    net = prepared.run.net
    assert isinstance(net, FunctionalPopulation)
    x = prepared.run.x[:32]
    net.train()
    before = net.member_state_dict(1)
    net.set_active(torch.tensor([True, False]))
    net(x)
    after = net.member_state_dict(1)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not torch.equal(net.member_state_dict(0)["body.2.running_mean"], before[
        "body.2.running_mean"])  # fmt: skip


# ----------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("kind", ["standard", "gaussian", "alpha"])
def test_inside_vmap_each_member_drops_at_its_own_rate(kind: str) -> None:
    """A droptune dropout module called through functional_call under vmap with its stacked
    ``[P]`` rate: member i sees rate[i] (standard: the zeroed fraction, 5 sigma; the kept
    units scaled by 1/(1-p)); a member with rate 0 sees its input unchanged."""
    rates = torch.tensor([0.0, 0.5, 0.2])
    drop = make_dropout(kind, rates)
    x = torch.ones(4000)

    def one(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(drop, {"p": p}, (x,))

    out = vmap(one, in_dims=(0, None), randomness="different")(drop.p, x)
    assert out.shape == (3, 4000)
    assert torch.equal(out[0], x)
    for index in (1, 2):
        rate = float(rates[index])
        if kind == "standard":
            zeros = out[index] == 0
            assert_fraction(int(zeros.sum()), zeros.numel(), rate, f"member {index}")
            torch.testing.assert_close(out[index][~zeros], x[~zeros] / (1 - rate))
        elif kind == "gaussian":  # variance p / (1 - p)
            assert float(out[index].var()) == pytest.approx(rate / (1 - rate), rel=0.1)
        else:
            assert not torch.equal(out[index], x)


@pytest.mark.parametrize(
    ("kind", "options", "shape"),
    [
        ("spatial", {}, (200, 20, 8)),
        ("spatial", {}, (100, 40, 4, 4)),
        ("alpha", {"channel": True}, (200, 20, 8)),
    ],
)
def test_inside_vmap_channel_kinds_drop_whole_channels_at_each_members_rate(
    kind: str, options: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """Channel-wise kinds under vmap (one member's input has no population axis): member i
    keeps or drops each (sample, channel) whole, at rate[i] (5 sigma); rate 0 is the input."""
    rates = torch.tensor([0.0, 0.5, 0.2])
    drop = make_dropout(kind, rates, **options)
    x = torch.ones(shape)

    def one(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(drop, {"p": p}, (x,))

    out = vmap(one, in_dims=(0, None), randomness="different")(drop.p, x)
    assert out.shape == (3, *shape)
    assert torch.equal(out[0], x)
    for index in (1, 2):
        channels = out[index].flatten(2)  # [N, C, spatial]
        whole = (channels == channels[..., :1]).all(-1)
        assert bool(whole.all()), f"member {index}: a channel was dropped in parts"
        dropped = channels[..., 0] != channels.max()
        assert_fraction(int(dropped.sum()), dropped.numel(), float(rates[index]), f"{index}")


def _mean_and_sem(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_population_accuracy_matches_fit_with_dropout() -> None:
    """examples/user_model.py's UserNet, 6 seeds x 2 dropout configs: per config, the mean
    final val_acc and best val_loss of the population and of fit() agree within 3 standard
    errors of the difference (+0.01), as the built-in families' test requires."""
    seeds = range(6)
    base = member(**SMALL, **custom("examples.user_model:UserNet", hidden=64))
    base = base.with_overrides({"train.max_epochs": 4})
    settings = [
        {"regularization.dropout.kind": "standard", "regularization.dropout.hidden_rate": 0.5},
        {
            "regularization.dropout.kind": "standard",
            "regularization.dropout.input_rate": 0.2,
            "regularization.dropout.hidden_rate": 0.1,
        },
    ]
    configs = [base.with_overrides({**o, "train.seed": s}) for o in settings for s in seeds]
    population = train_population(configs)
    alone = [quiet_fit(cfg)[0].metrics for cfg in configs]
    for k in range(len(settings)):
        chunk = slice(k * len(seeds), (k + 1) * len(seeds))
        for key in ("val_acc", "best_val_loss"):
            ours = [r.metrics[key] for r in population[chunk]]
            theirs = [m[key] for m in alone[chunk]]
            (m1, e1), (m2, e2) = _mean_and_sem(ours), _mean_and_sem(theirs)
            bound = 3 * math.hypot(e1, e2) + 0.01
            assert abs(m1 - m2) < bound, (k, key, m1, m2, bound)
            assert len(set(ours)) > 1, "members must differ (their own seeds and masks)"


# ----------------------------------------------------------------------------------------------
# honest fallbacks


REFUSED: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {
    "data-dependent-control-flow": (
        custom("tests.population._models:ControlFlowNet"),
        {},
        ["(ControlFlowNet)", "torch.func.vmap", "data-dependent control flow"],
    ),
    "custom-autograd-function": (
        custom("tests.population._models:AutogradFunctionNet"),
        {},
        ["(AutogradFunctionNet)", "autograd.Function"],
    ),
    "training-step-not-forward-plus-loss": (
        custom("tests.population._models:SmoothedLoss"),
        {},
        ["(SmoothedLoss)", "training_step returned", "not the cross-entropy loss of forward"],
    ),
    "loop-hook": (
        custom("tests.population._models:EpochHook"),
        {},
        ["(EpochHook)", "overrides on_train_epoch_end"],
    ),
    "metric-scheduler": (
        custom("tests.population._models:Plateau"),
        {},
        ["(Plateau)", "ReduceLROnPlateau", "not stepped once per epoch"],
    ),
    "library-float-rate-differs": (
        {
            **custom("tests.population._models:AttentionNet"),
            "regularization": {"dropout": {"kind": "standard", "attention_rate": 0.1}},
        },
        {"regularization.dropout.attention_rate": 0.3},
        ["(AttentionNet)", "attention.dropout", "differs between members: 0.1, 0.3"],
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_cannot_be_batched_is_refused_before_training(name: str) -> None:
    sections, other, expected = REFUSED[name]
    first = member(0, **{**SMALL, **sections})
    configs = [first, first.with_overrides({**other, "train.seed": 1})]
    target = first.model.target
    with pytest.raises(PopulationUnsupported) as caught:
        prepare_population(configs)
    message = str(caught.value)
    assert message.startswith(f"model.target {target} ("), message
    assert "cannot train as a population" in message
    for part in expected:
        assert part in message, (part, message)
    # every such model trains alone as it did
    result, _ = quiet_fit(first.with_overrides({"train.max_epochs": 1}))
    assert result.epochs == 1


def test_a_structural_refusal_is_remembered_and_not_rebuilt(monkeypatch: Any) -> None:
    first = member(0, **{**SMALL, **custom("tests.population._models:ControlFlowNet")})
    with pytest.raises(PopulationUnsupported):
        prepare_population([first])
    assert any("ControlFlowNet" in reason for reason in _REFUSED.values())

    def no_build(*args: Any) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr("droptune.population._build._members", no_build)
    with pytest.raises(PopulationUnsupported, match="data-dependent control flow"):
        prepare_population([first.with_overrides({"train.seed": 5})])


def test_equal_library_rates_batch() -> None:
    """The same attention rate for every member: the float is one value, the model batches."""
    sections = {
        **custom("tests.population._models:AttentionNet"),
        "regularization": {"dropout": {"kind": "standard", "attention_rate": 0.1}},
    }
    first: TrainConfig = member(0, **{**SMALL, **sections})
    configs = [first, first.with_overrides({"train.seed": 1})]
    results = train_population(configs)
    assert all(r.epochs == first.train.max_epochs for r in results)


# ----------------------------------------------------------------------------------------------
# in a study


def _round(tmp_path: Any, target: str) -> list[Any]:
    import optuna

    from droptune.storage import open_storage
    from droptune.study.objective import Objective
    from droptune.study.population import population_round
    from droptune.study.spec import spec_from_dict
    from tests.study.helpers import DELETE
    from tests.study.helpers import TINY
    from tests.study.helpers import merge

    model = {"family": "custom", "target": target, "hidden": DELETE}
    search = {  # one dropout kind: one population
        "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    }
    spec = spec_from_dict(
        merge(TINY, {"model": model, "search": search, "pruner": {"name": "none"}})
    )
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'round.db'}"),
        study_name="round",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    population_round(study, Objective(spec, worker="test"), [0, 1, 2], lambda s, t: None, print)
    return study.get_trials()


def test_a_study_round_trains_a_users_lightning_module_as_one_population(tmp_path: Any) -> None:
    trials = _round(tmp_path, "tests.user_code.models:UserClassifier")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs["droptune.population"] == 3 for t in trials)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("AutogradFunctionNet", "AutogradFunctionNet"),
        # configure_optimizers needs a Trainer: building the population fails, not the trials
        ("TrainerSchedule", "not attached to a `Trainer`"),
        # vmappable on a few rows, not on a real batch: the trial run uses a full batch
        ("BatchSizeBranch", "BatchSizeBranch"),
    ],
)
def test_a_study_round_of_a_model_that_cannot_batch_runs_one_at_a_time(
    tmp_path: Any, caplog: Any, model: str, reason: str
) -> None:
    with caplog.at_level("WARNING", logger="droptune.study.population"):
        trials = _round(tmp_path, f"tests.population._models:{model}")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # never failed by batching
    assert all("droptune.population" not in t.user_attrs for t in trials)
    assert any(reason in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_a_refusal_that_depends_on_the_rates_is_not_remembered() -> None:
    """DropConnect adds its parametrization only at a rate > 0: members with weight rates 0 and
    0.4 differ in structure and are refused, but a later round with 0.2 and 0.4 batches."""
    from droptune.exceptions import PopulationUnsupported
    from tests.population._helpers import member

    base = member(
        0,
        data={"name": "digits", "train_subset": 200},
        model={"family": "custom", "target": "tests.user_code.models:UserMLP"},
        train={"max_epochs": 1},
        regularization={"dropout": {"kind": "standard", "weight_rate": 0.2}},
    )

    def configs(rates: tuple[float, float]) -> list[Any]:
        return [
            base.with_overrides({"regularization.dropout.weight_rate": r, "train.seed": i})
            for i, r in enumerate(rates)
        ]

    with pytest.raises(PopulationUnsupported, match="one structure"):
        prepare_population(configs((0.0, 0.4)))
    assert prepare_population(configs((0.2, 0.4))) is not None
