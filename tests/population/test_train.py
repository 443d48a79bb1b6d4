"""``train_population`` against ``droptune.training.fit`` (the Lightning path): the same
trajectories without dropout, the same early-stopping decisions, the same accuracy
distribution with dropout; per-member stopping, pruning, freezing and deadlines."""

from __future__ import annotations

import math
from pathlib import Path
import statistics
import time
from typing import Any

import pytest
from pytorch_lightning.callbacks import EarlyStopping
import torch
import torch.nn.functional as F

from droptune.config import EarlyStoppingConfig
from droptune.config import TrainConfig
from droptune.models import build_network
from droptune.population import MemberResult
from droptune.population import train_population
from droptune.population._train import EarlyStopper
from droptune.population._train import _Run
from droptune.training import build_datamodule
from tests.population._helpers import member
from tests.population._helpers import members
from tests.population._helpers import quiet_fit


torch.set_num_threads(1)

HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time"}


def assert_same_trajectory(result: MemberResult, cfg: TrainConfig, rtol: float) -> None:
    """Every epoch's metrics of a population member equal the Lightning run's."""
    fitted, epochs = quiet_fit(cfg)
    assert result.epochs == fitted.epochs == len(result.history) == len(epochs)
    assert result.stopped_early == fitted.stopped_early
    for mine, theirs in zip(result.history, epochs, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "val_rmse", "train_acc", "lr"):
            if key in theirs:
                assert math.isclose(mine[key], theirs[key], rel_tol=rtol, abs_tol=1e-6), (
                    key,
                    mine,
                    theirs,
                )
    monitor = cfg.regularization.early_stopping.monitor
    assert result.best is not None
    assert math.isclose(result.best, fitted.metrics[f"best_{monitor}"], rel_tol=rtol)


# Without dropout a member's run is deterministic: it must follow fit() step for step (tanh:
# ReLU kinks would amplify last-bit rounding differences between bmm and mm).
TRAJECTORIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adamw-decoupled-maxnorm": (
        {"model": {"family": "mlp", "hidden": [32], "activation": "tanh"}},
        {"regularization.l2.strength": 0.05, "regularization.max_norm": 0.5},
    ),
    "adam-coupled-64bit": (
        {
            "model": {"family": "mlp", "hidden": [32], "activation": "tanh"},
            "train": {"optimizer": "adam", "precision": "64-true"},
        },
        {"regularization.l2.strength": 1e-3, "regularization.l2.mode": "coupled"},
    ),
    "sgd-batchnorm-clip": (
        {
            "model": {"family": "mlp", "hidden": [32, 16], "norm": "batch"},
            "train": {"optimizer": "sgd", "lr": 0.05, "gradient_clip": 0.5},
        },
        {"train.lr": 0.02, "train.momentum": 0.5},
    ),
    "early-stopping-patience": (
        {
            "model": {"family": "mlp", "hidden": [16], "activation": "tanh"},
            "train": {"max_epochs": 6},
            "regularization": {"early_stopping": {"patience": 1, "min_delta": 0.3}},
        },
        {"regularization.early_stopping.patience": 2},
    ),
    "cnn1d-layernorm": (
        {
            "data": {"name": "mnist1d", "train_subset": 500},
            "model": {
                "family": "cnn",
                "channels": [4],
                "hidden": [8],
                "norm": "layer",
                "activation": "tanh",
            },
        },
        {"regularization.max_norm": 1.0},
    ),
    "rnn-gru": (
        {"model": {"family": "rnn", "hidden_size": 8}, "data": {"train_subset": 400}},
        {"regularization.l2.strength": 0.01},
    ),
}


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_without_dropout_each_member_follows_fit(name: str) -> None:
    sections, second = TRAJECTORIES[name]
    first = member(3, **sections)
    configs = [first, first.with_overrides({**second, "train.seed": 4})]
    results = train_population(configs)
    for result, cfg in zip(results, configs, strict=True):
        assert set(result.history[0]) == HISTORY_KEYS
        assert_same_trajectory(result, cfg, rtol=1e-4)


def test_regression_logs_rmse_like_lightning(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(300, generator=gen)
    rows = "".join(f"{a:.5f},{b:.5f},{c:.5f},{t:.5f}\n" for (a, b, c), t in zip(x, y, strict=True))
    path = tmp_path / "reg.csv"
    path.write_text("a,b,c,y\n" + rows)
    data = {"name": "csv", "path": str(path), "target": "y", "task": "regression"}
    cfg = member(
        1,
        data=data,
        model={"family": "mlp", "hidden": [8], "activation": "tanh"},
        regularization={"early_stopping": {"monitor": "val_rmse"}},
    )
    (result,) = train_population([cfg])
    assert "val_rmse" in result.history[0] and "train_acc" not in result.history[0]
    assert_same_trajectory(result, cfg, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# early stopping

NAN = float("nan")
SCRIPTS = [
    ([1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.4, 0.3], {"patience": 2}),
    ([1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.4, 0.3], {"patience": 1}),
    ([1.0, 0.9, 0.85, 0.84, 0.83, 0.82, 0.81, 0.8], {"patience": 2, "min_delta": 0.06}),
    ([0.5, 0.6, 0.55, 0.58, 0.59, 0.9, 0.9, 0.9], {"patience": 2, "monitor": "val_acc"}),
    ([0.5, 0.6, 0.55, 0.58, 0.59, 0.9], {"patience": 2, "monitor": "val_acc", "mode": "min"}),
    ([1.0, 0.9, NAN, 0.5, 0.4, 0.3, 0.2, 0.1], {"patience": 5}),
    ([1.0, 1.0, 1.0, 1.0], {"patience": 3}),
    ([1.0, 0.9, 0.8], {"patience": None}),
]


@pytest.mark.parametrize(("script", "settings"), SCRIPTS)
def test_early_stopper_decides_like_lightning(
    script: list[float], settings: dict[str, Any]
) -> None:
    config = EarlyStoppingConfig(**settings)
    mine = EarlyStopper(config)
    theirs = EarlyStopping(
        monitor=config.monitor,
        patience=config.patience or 10**9,
        min_delta=config.min_delta,
        mode=config.resolved_mode,
        check_finite=config.patience is not None,
    )
    for value in script:
        stop, _ = theirs._evaluate_stopping_criteria(torch.tensor(value))
        assert mine.update(value) == stop, (value, mine.wait, theirs.wait_count)
        if stop:
            break


def test_members_stop_at_their_own_patience() -> None:
    """With a huge min_delta no epoch after the first improves: patience k stops after k + 1
    epochs, whatever the noise; patience null runs to max_epochs."""
    patiences = [1, 3, 2, None]
    base = member(
        model={"family": "mlp", "hidden": [16]},
        train={"max_epochs": 6},
        regularization={"dropout": {"kind": "standard", "hidden_rate": 0.2}},
    )
    configs = [
        base.with_overrides(
            {
                "regularization.early_stopping.patience": p,
                "regularization.early_stopping.min_delta": 100.0,
                "train.seed": i,
            }
        )
        for i, p in enumerate(patiences)
    ]
    results = train_population(configs)
    assert [r.epochs for r in results] == [2, 4, 3, 6]
    assert [r.stopped_early for r in results] == [True, True, True, False]
    for result in results:
        assert result.best == min(row["val_loss"] for row in result.history)
        assert result.metrics["best_val_loss"] == result.best
        assert result.metrics["val_loss"] == result.history[-1]["val_loss"]
    # finished members left the stacks: each later epoch was shorter
    ends = [r.seconds for r in results]
    assert ends[0] < ends[2] < ends[1] < ends[3]


def test_members_stop_at_their_own_max_epochs() -> None:
    configs = [member(i, train={"max_epochs": e}) for i, e in enumerate([1, 3, 2])]
    results = train_population(configs)
    assert [r.epochs for r in results] == [1, 3, 2]
    assert not any(r.stopped_early or r.pruned or r.timed_out for r in results)


# ----------------------------------------------------------------------------------------------
# pruning, freezing, deadline, divergence


def test_pruning_freezes_the_member_and_marks_it() -> None:
    calls: list[tuple[int, int]] = []

    def on_epoch(index: int, epoch: int, metrics: dict[str, float]) -> bool:
        calls.append((index, epoch))
        assert set(metrics) == HISTORY_KEYS and metrics["epoch"] == epoch
        return index == 1 and epoch == 1

    configs = members(range(3), train={"max_epochs": 4})
    results = train_population(configs, on_epoch=on_epoch)
    assert [r.pruned for r in results] == [False, True, False]
    assert [r.epochs for r in results] == [4, 2, 4]
    expected = [(i, e) for e in range(4) for i in range(3) if not (i == 1 and e > 1)]
    assert calls == expected
    assert results[1].metrics["val_loss"] == results[1].history[1]["val_loss"]


def test_on_epochs_sees_each_epoch_at_once_and_prunes_the_members_it_names() -> None:
    calls: list[tuple[int, list[int]]] = []

    def on_epochs(epoch: int, rows: dict[int, dict[str, float]]) -> list[int]:
        calls.append((epoch, sorted(rows)))
        assert all(set(m) == HISTORY_KEYS and m["epoch"] == epoch for m in rows.values())
        return [0, 2] if epoch == 1 else []

    configs = members(range(4), train={"max_epochs": 4})
    configs[3] = configs[3].with_overrides({"train.max_epochs": 1})
    results = train_population(configs, on_epochs=on_epochs)
    assert calls == [(0, [0, 1, 2, 3]), (1, [0, 1, 2]), (2, [1]), (3, [1])]
    assert [r.pruned for r in results] == [True, False, True, False]
    assert [r.epochs for r in results] == [2, 4, 2, 1]
    assert results[0].metrics["val_loss"] == results[0].history[1]["val_loss"]


def test_on_epochs_may_only_prune_members_that_trained() -> None:
    configs = members(range(2), train={"max_epochs": 3})
    configs[1] = configs[1].with_overrides({"train.max_epochs": 1})
    with pytest.raises(ValueError, match="on_epochs returned member 1, which did not train"):
        train_population(configs, on_epochs=lambda epoch, rows: [1] if epoch == 1 else [])


def test_a_frozen_member_is_bit_identical_after_more_training() -> None:
    """compact=0 keeps a finished member in the stacks: its weights, batch-norm statistics and
    optimizer state stay exactly as they were while the others train on."""
    configs = members(
        range(3),
        model={"family": "mlp", "hidden": [16], "norm": "batch"},
        regularization={
            "dropout": {"kind": "standard", "hidden_rate": 0.3},
            "l2": {"strength": 0.01},
            "max_norm": 1.0,
        },
    )
    datamodule = build_datamodule(configs[0])
    run = _Run(configs, torch.device("cpu"), datamodule, compact=0.0)
    run.train_epoch(0, None)
    run.active[1] = False
    run.freeze()
    run.shrink()  # compact=0: nothing leaves
    assert run.net.size == 3
    frozen = run.net.member_state_dict(1)
    state = [[s[1].clone() for s in slots] for slots in run.optimizer.state]
    trained = run.net.member_state_dict(0)
    run.train_epoch(1, None)
    run.validate()
    after = run.net.member_state_dict(1)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    for slots, before in zip(run.optimizer.state, state, strict=True):
        assert all(torch.equal(s[1], b) for s, b in zip(slots, before, strict=True))
    assert not torch.equal(run.net.member_state_dict(0)["2.0.weight"], trained["2.0.weight"])


def test_compacting_does_not_change_the_survivors() -> None:
    configs = members(range(3), model={"family": "mlp", "hidden": [16], "activation": "tanh"})
    configs = [
        c.with_overrides({"train.max_epochs": e}) for c, e in zip(configs, [1, 3, 2], strict=True)
    ]
    compacted = train_population(configs, compact=1.0)
    in_place = train_population(configs, compact=0.0)
    for a, b in zip(compacted, in_place, strict=True):
        assert a.epochs == b.epochs
        for row_a, row_b in zip(a.history, b.history, strict=True):
            assert math.isclose(row_a["val_loss"], row_b["val_loss"], rel_tol=1e-6)


def test_returned_weights_reproduce_the_last_validation() -> None:
    configs = members(range(2), model={"family": "mlp", "hidden": [16]}, train={"max_epochs": 2})
    configs[1] = configs[1].with_overrides({"regularization.dropout.weight_rate": 0.3})
    results = train_population(configs, return_weights=True)
    datamodule = build_datamodule(configs[0])
    x, y = datamodule.splits["val"]
    for cfg, result in zip(configs, results, strict=True):
        net = build_network(cfg, datamodule.info)
        assert result.state_dict is not None
        net.load_state_dict(result.state_dict)
        net.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(net(x), y))
        assert math.isclose(loss, result.metrics["val_loss"], rel_tol=1e-5)


def test_a_diverging_member_stops_and_leaves_the_others_alone() -> None:
    sections: dict[str, Any] = {
        "model": {"family": "mlp", "hidden": [16], "activation": "tanh"},
        "train": {"optimizer": "sgd", "lr": 0.05, "max_epochs": 3},
    }
    healthy = member(0, **sections)
    wild = member(1, **sections).with_overrides({"train.lr": 1e38})
    alone = train_population([healthy])[0]
    together = train_population([healthy, wild])
    assert together[1].diverged and together[1].epochs == 1
    assert not math.isfinite(together[1].history[-1]["val_loss"])
    assert together[0].epochs == 3 and not together[0].diverged
    for a, b in zip(alone.history, together[0].history, strict=True):
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-6)


def test_a_passed_deadline_times_every_member_out() -> None:
    results = train_population(members(range(2)), deadline=time.time() - 1)
    assert all(r.timed_out and r.epochs == 0 and r.best is None for r in results)
    assert all(not r.history and r.metrics == {} for r in results)


def test_bf16_autocast_trains() -> None:
    configs = members(range(2), train={"precision": "bf16-mixed", "max_epochs": 3})
    reference = train_population(members(range(2), train={"max_epochs": 3}))
    for result, full in zip(train_population(configs), reference, strict=True):
        assert abs(result.metrics["val_acc"] - full.metrics["val_acc"]) < 0.05


# ----------------------------------------------------------------------------------------------
# with dropout: the same distribution as training each member alone


def _mean_and_sem(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_population_accuracy_matches_fit_with_dropout() -> None:
    """8 seeds × 2 dropout configs: the population's final val_acc and best val_loss per
    config have the mean of fit()'s within 3 standard errors of the difference (+0.01)."""
    seeds = range(8)
    sections: dict[str, Any] = {
        "model": {"family": "mlp", "hidden": [64]},
        "train": {"max_epochs": 4},
    }
    settings = [
        {"regularization.dropout.kind": "standard", "regularization.dropout.hidden_rate": 0.5},
        {
            "regularization.dropout.kind": "standard",
            "regularization.dropout.input_rate": 0.2,
            "regularization.dropout.hidden_rate": 0.1,
            "regularization.l2.strength": 0.01,
        },
    ]
    configs = [member(s, **sections).with_overrides(o) for o in settings for s in seeds]
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


def test_fast_init_trains_as_well() -> None:
    configs = members(range(4), model={"family": "mlp", "hidden": [32]}, train={"max_epochs": 3})
    exact = train_population(configs)
    fast = train_population(configs, init="fast")
    accuracy = [statistics.fmean(r.metrics["val_acc"] for r in rs) for rs in (exact, fast)]
    assert abs(accuracy[0] - accuracy[1]) < 0.05 and min(accuracy) > 0.8, accuracy


def test_returned_weights_are_the_best_epochs_like_fit() -> None:
    """With early stopping, a member's returned weights are those of its best epoch: their
    validation loss is the member's best, as ``fit``'s restored module."""
    configs = [
        member(seed, train={"max_epochs": 40, "lr": 0.03}, regularization={
            "early_stopping": {"patience": 3}})
        for seed in (0, 1)
    ]  # fmt: skip
    results = train_population(configs, return_weights=True)
    data = build_datamodule(configs[0])
    data.setup("fit")
    x, y = data.splits["val"]
    for cfg, result in zip(configs, results, strict=True):
        assert result.stopped_early and result.best is not None and result.state_dict
        net = build_network(cfg, data.info)
        net.load_state_dict(result.state_dict)
        net.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(net(x), y))
        assert loss == pytest.approx(result.best, rel=1e-4, abs=1e-5)
        assert result.epochs > 1 + min(
            i for i, row in enumerate(result.history) if row["val_loss"] == result.best
        )
