"""``population_support``: which configs train as one population, and messages naming the
field and the allowed values when they cannot."""

from __future__ import annotations

from typing import Any

import pytest

from droptune.exceptions import ConfigError
from droptune.population import population_support
from droptune.population import train_population
from tests.population._helpers import member


@pytest.mark.parametrize(
    "overrides",
    [
        {"train.seed": 7},
        {"train.lr": 0.01, "train.momentum": 0.5, "train.max_epochs": 5},
        {"train.gradient_clip": 1.0},
        {"train.optimizer": "adam"},  # adam and adamw are one update in droptune
        {"regularization.dropout.input_rate": 0.2, "regularization.dropout.hidden_rate": 0.5},
        {"regularization.dropout.weight_rate": 0.3},
        {"regularization.l2.strength": 1e-3, "regularization.l2.mode": "coupled"},
        {"regularization.max_norm": 2.0},
        {"regularization.early_stopping.patience": 3, "regularization.early_stopping.mode": "max"},
        {"regularization.early_stopping.monitor": "val_acc"},
        {"train.num_threads": 1},  # the base's value: equal
    ],
)
def test_members_may_differ_in_what_only_scales_numbers(overrides: dict[str, Any]) -> None:
    base = member(regularization={"dropout": {"kind": "standard"}})
    assert population_support([base, base.with_overrides(overrides)]) is None


def test_every_supported_family_alone() -> None:
    for model in (
        {"family": "mlp", "hidden": [8], "norm": "batch"},
        {"family": "cnn", "channels": [4], "hidden": [8], "norm": "layer"},
        {"family": "rnn", "cell": "lstm", "num_layers": 2, "bidirectional": True},
        # built with torch.func; prepare_population checks and trial-runs the model itself
        {"family": "transformer", "d_model": 8, "heads": 2, "depth": 1},
        {"family": "custom", "target": "tests.user_code.models:UserClassifier"},
    ):
        assert population_support([member(model=model)]) is None


MLP_STANDARD = {"regularization": {"dropout": {"kind": "standard"}}}


@pytest.mark.parametrize(
    ("sections", "other", "expected"),
    [
        (
            {
                "data": {
                    "name": "datamodule",
                    "datamodule": "tests.user_code.datamodules:BlobsDataModule",
                }
            },
            None,
            "data.name 'datamodule' has no population mode",
        ),
        (
            {
                "data": {
                    "name": "datamodule",
                    "datamodule": "tests.user_code.datamodules:BlobsDataModule",
                }
            },
            None,
            "allowed: digits, mnist1d, synthetic, csv",
        ),
        (
            {"train": {"precision": "16-mixed"}},
            None,
            "train.precision '16-mixed' has no population mode",
        ),
        ({"train": {"precision": "16-mixed"}}, None, "allowed: 32-true, bf16-mixed, 64-true"),
        ({"train": {"devices": 2}}, None, "train.devices 2: a population trains on one device"),
        (
            {"model": {"family": "rnn", "vocab_size": 100}},
            None,
            "model.vocab_size (a token embedding) has no population mode",
        ),
        (
            {"regularization": {"early_stopping": {"monitor": "val_f1"}}},
            None,
            "regularization.early_stopping.monitor 'val_f1' is not logged by a population; "
            "allowed: val_loss, val_acc",
        ),
        (
            MLP_STANDARD,
            {"regularization.dropout.kind": "gaussian"},
            "regularization.dropout.kind differs between members: standard, gaussian",
        ),
        (MLP_STANDARD, {"model.hidden": [16]}, "model.hidden differs between members: [32], [16]"),
        (MLP_STANDARD, {"model.norm": "batch"}, "model.norm differs between members: none, batch"),
        (MLP_STANDARD, {"data.batch_size": 32}, "data.batch_size differs between members: 64, 32"),
        (MLP_STANDARD, {"data.seed": 1}, "data.seed differs between members: 0, 1"),
        (
            MLP_STANDARD,
            {"train.precision": "64-true"},
            "train.precision differs between members: 32-true, 64-true",
        ),
        (
            MLP_STANDARD,
            {"train.optimizer": "sgd"},
            "train.optimizer differs between members: adamw, sgd; members may mix only adam and "
            "adamw",
        ),
        (
            {
                "model": {"family": "cnn", "channels": [4], "hidden": [8]},
                "regularization": {"dropout": {"kind": "dropblock"}},
            },
            {"regularization.dropout.block_size": 5},
            "regularization.dropout.block_size differs between members: 3, 5",
        ),
    ],
)
def test_unsupported_configs_are_named(
    sections: dict[str, Any], other: dict[str, Any] | None, expected: str
) -> None:
    first = member(**sections)
    configs = [first] if other is None else [first, first.with_overrides(other)]
    reason = population_support(configs)
    assert reason is not None and expected in reason, reason
    if other is not None:  # a difference also says what may differ
        assert "differ" in reason


def test_no_configs() -> None:
    assert population_support([]) == "no configs: a population needs at least one member"


def test_regression_data_monitors_rmse(tmp_path: Any) -> None:
    path = tmp_path / "r.csv"
    path.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i * 0.5}\n" for i in range(20)))
    data = {"name": "csv", "path": str(path), "target": "y", "task": "regression"}
    assert population_support([member(data=data)]) is None  # val_loss
    rmse = member(data=data, regularization={"early_stopping": {"monitor": "val_rmse"}})
    assert population_support([rmse]) is None
    acc = member(data=data, regularization={"early_stopping": {"monitor": "val_acc"}})
    reason = population_support([acc])
    assert reason is not None and "allowed: val_loss, val_rmse" in reason


def test_train_population_refuses_with_the_reason() -> None:
    first = member(**MLP_STANDARD)
    other = first.with_overrides({"regularization.dropout.kind": "alpha"})
    with pytest.raises(ConfigError, match=r"regularization\.dropout\.kind differs"):
        train_population([first, other])
