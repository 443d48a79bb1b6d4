"""RegularizationConfig and its sections: defaults, round trips, dotted-path errors, sites."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from droptune.config import SITES
from droptune.config import DropoutConfig
from droptune.config import EarlyStoppingConfig
from droptune.config import L2Config
from droptune.config import RegularizationConfig
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneError
from droptune.layers import DROPOUT_KINDS


RATE_FIELDS = (
    "input_rate",
    "hidden_rate",
    "conv_rate",
    "recurrent_rate",
    "attention_rate",
    "embedding_rate",
    "weight_rate",
    "recurrent_weight_rate",
    "droppath_rate",
)


def test_defaults() -> None:
    cfg = RegularizationConfig()
    assert cfg.dropout.kind == "standard"
    assert all(getattr(cfg.dropout, name) == 0.0 for name in RATE_FIELDS)
    assert cfg.dropout.block_size == 3
    assert cfg.l2 == L2Config(strength=0.0, mode="decoupled")
    assert cfg.max_norm is None
    assert cfg.early_stopping == EarlyStoppingConfig(
        patience=10, min_delta=0.0, monitor="val_loss", mode="auto"
    )
    assert RegularizationConfig.from_dict(None) == cfg
    assert RegularizationConfig.from_dict({}) == cfg


def test_from_dict_returns_a_config_object_unchanged() -> None:
    cfg = RegularizationConfig.from_dict({"max_norm": 2.0})
    assert RegularizationConfig.from_dict(cfg) is cfg


FULL = {
    "dropout": {
        "kind": "dropblock",
        "input_rate": 0.1,
        "hidden_rate": 0.3,
        "conv_rate": 0.15,
        "recurrent_rate": 0.2,
        "attention_rate": 0.05,
        "embedding_rate": 0.1,
        "weight_rate": 0.25,
        "recurrent_weight_rate": 0.5,
        "droppath_rate": 0.1,
        "block_size": 5,
    },
    "l2": {"strength": 1.0e-4, "mode": "coupled"},
    "max_norm": 3.0,
    "early_stopping": {
        "patience": None,
        "min_delta": 0.001,
        "monitor": "val_acc",
        "mode": "max",
        "restore_best": False,
    },
}


@pytest.mark.parametrize("data", [{}, {"dropout": {"kind": "none"}}, FULL])
def test_round_trip_through_dict_and_yaml(data: dict[str, Any]) -> None:
    cfg = RegularizationConfig.from_dict(data)
    assert RegularizationConfig.from_dict(cfg.to_dict()) == cfg
    text = yaml.safe_dump({"regularization": cfg.to_dict()})
    assert RegularizationConfig.from_dict(yaml.safe_load(text)["regularization"]) == cfg


def test_to_dict_is_plain_data() -> None:
    cfg = RegularizationConfig.from_dict(FULL)
    assert cfg.to_dict() == FULL


def test_ints_are_accepted_for_floats() -> None:
    cfg = RegularizationConfig.from_dict({"max_norm": 3, "l2": {"strength": 0}})
    assert cfg.max_norm == 3.0 and cfg.l2.strength == 0.0


def test_configs_are_frozen_and_hashable() -> None:
    cfg = RegularizationConfig.from_dict(FULL)
    with pytest.raises(ValueError):
        cfg.max_norm = 1.0  # type: ignore[misc]
    assert hash(cfg) == hash(RegularizationConfig.from_dict(FULL))


def test_patience_none_turns_early_stopping_off() -> None:
    cfg = RegularizationConfig.from_dict({"early_stopping": {"patience": None}})
    assert cfg.early_stopping.patience is None


# ------------------------------------------------------------------------------------------
# Bad inputs: every message names the dotted path and the rule.

KINDS = ", ".join(DROPOUT_KINDS)
DROPOUT_KEYS = "kind, " + ", ".join(RATE_FIELDS) + ", block_size"

BAD: list[tuple[str, Any, str]] = [
    (
        "rate equal to 1",
        {"dropout": {"hidden_rate": 1.0}},
        "regularization.dropout.hidden_rate: must be < 1.0, got 1.0",
    ),
    (
        "rate above 1",
        {"dropout": {"conv_rate": 1.5}},
        "regularization.dropout.conv_rate: must be < 1.0, got 1.5",
    ),
    (
        "int rate 1",
        {"dropout": {"weight_rate": 1}},
        "regularization.dropout.weight_rate: must be < 1.0, got 1",
    ),
    (
        "negative rate",
        {"dropout": {"input_rate": -0.1}},
        "regularization.dropout.input_rate: must be >= 0.0, got -0.1",
    ),
    (
        "unknown kind",
        {"dropout": {"kind": "zoneout"}},
        f"regularization.dropout.kind: must be one of {KINDS}, got 'zoneout'",
    ),
    (
        "kind not a string",
        {"dropout": {"kind": 3}},
        "regularization.dropout.kind: must be a valid string, got 3",
    ),
    (
        "unknown dropout key",
        {"dropout": {"hiden_rate": 0.3}},
        f"regularization.dropout.hiden_rate: unknown key; allowed keys: {DROPOUT_KEYS}",
    ),
    (
        "unknown top-level key",
        {"dropuot": {}},
        "regularization.dropuot: unknown key; allowed keys: dropout, l2, max_norm, early_stopping",
    ),
    (
        "unknown l2 key",
        {"l2": {"lambda": 0.1}},
        "regularization.l2.lambda: unknown key; allowed keys: strength, mode",
    ),
    (
        "string for a float (strict)",
        {"dropout": {"hidden_rate": "0.3"}},
        "regularization.dropout.hidden_rate: must be a valid number, got '0.3'",
    ),
    (
        "bool for an int",
        {"dropout": {"block_size": True}},
        "regularization.dropout.block_size: must be a valid integer, got True",
    ),
    (
        "float for an int",
        {"early_stopping": {"patience": 2.5}},
        "regularization.early_stopping.patience: must be a valid integer, got 2.5",
    ),
    (
        "block size 0",
        {"dropout": {"block_size": 0}},
        "regularization.dropout.block_size: must be >= 1, got 0",
    ),
    (
        "negative patience",
        {"early_stopping": {"patience": -3}},
        "regularization.early_stopping.patience: must be >= 1, got -3",
    ),
    (
        "zero patience",
        {"early_stopping": {"patience": 0}},
        "regularization.early_stopping.patience: must be >= 1, got 0",
    ),
    (
        "negative min_delta",
        {"early_stopping": {"min_delta": -0.1}},
        "regularization.early_stopping.min_delta: must be >= 0.0, got -0.1",
    ),
    (
        "bad early stopping mode",
        {"early_stopping": {"mode": "up"}},
        "regularization.early_stopping.mode: must be 'min', 'max' or 'auto', got 'up'",
    ),
    (
        "bad l2 mode",
        {"l2": {"mode": "weight_decay"}},
        "regularization.l2.mode: must be 'decoupled' or 'coupled', got 'weight_decay'",
    ),
    (
        "negative l2 strength",
        {"l2": {"strength": -1e-4}},
        "regularization.l2.strength: must be >= 0.0, got -0.0001",
    ),
    ("max_norm zero", {"max_norm": 0.0}, "regularization.max_norm: must be > 0.0, got 0.0"),
    ("max_norm negative", {"max_norm": -2}, "regularization.max_norm: must be > 0.0, got -2"),
    (
        "section is a list",
        {"dropout": [0.1, 0.2]},
        "regularization.dropout: must be a valid dictionary or instance of DropoutConfig, "
        "got [0.1, 0.2]",
    ),
    (
        "section is a string",
        {"l2": "decoupled"},
        "regularization.l2: must be a valid dictionary or instance of L2Config, got 'decoupled'",
    ),
    (
        "top level not a mapping",
        ["dropout"],
        "regularization: must be a valid dictionary or instance of RegularizationConfig, "
        "got ['dropout']",
    ),
]


@pytest.mark.parametrize(("data", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_dotted_path_and_the_rule(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RegularizationConfig.from_dict(data)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and isinstance(info.value, DroptuneError)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no pydantic noise


def test_every_error_is_reported_one_per_line() -> None:
    with pytest.raises(ConfigError) as info:
        RegularizationConfig.from_dict({"dropout": {"hidden_rate": 2.0, "conv_rate": -1.0}})
    assert str(info.value).splitlines() == [
        "regularization.dropout.hidden_rate: must be < 1.0, got 2.0",
        "regularization.dropout.conv_rate: must be >= 0.0, got -1.0",
    ]


def test_prefix_is_configurable() -> None:
    with pytest.raises(ConfigError, match=r"^study\.regularization\.max_norm: must be > 0\.0"):
        RegularizationConfig.from_dict({"max_norm": -1.0}, prefix="study.regularization")


# ------------------------------------------------------------------------------------------
# DropoutConfig.for_site

R = {
    "input_rate": 0.1,
    "hidden_rate": 0.2,
    "conv_rate": 0.3,
    "attention_rate": 0.4,
    "droppath_rate": 0.5,
    "embedding_rate": 0.6,
    "recurrent_rate": 0.7,
    "block_size": 5,
}

# kind -> the (kind, rate, options) expected at input, hidden, conv, sequence. Attention,
# residual and embedding sites always use standard / droppath / embedding (unless kind none).
FOR_SITE: dict[str, dict[str, tuple[str, float, dict[str, Any]]]] = {
    "standard": {
        "input": ("standard", 0.1, {}),
        "hidden": ("standard", 0.2, {}),
        "conv": ("standard", 0.3, {}),
        "sequence": ("standard", 0.2, {}),
    },
    "gaussian": {
        "input": ("gaussian", 0.1, {}),
        "hidden": ("gaussian", 0.2, {}),
        "conv": ("gaussian", 0.3, {}),
        "sequence": ("gaussian", 0.2, {}),
    },
    "alpha": {
        "input": ("alpha", 0.1, {}),
        "hidden": ("alpha", 0.2, {}),
        "conv": ("alpha", 0.3, {"channel": True}),
        "sequence": ("alpha", 0.2, {}),
    },
    "spatial": {
        "input": ("standard", 0.1, {}),
        "hidden": ("standard", 0.2, {}),
        "conv": ("spatial", 0.3, {}),
        "sequence": ("standard", 0.2, {}),
    },
    "dropblock": {
        "input": ("standard", 0.1, {}),
        "hidden": ("standard", 0.2, {}),
        "conv": ("dropblock", 0.3, {"block_size": 5}),
        "sequence": ("standard", 0.2, {}),
    },
    "variational": {
        "input": ("standard", 0.1, {}),
        "hidden": ("standard", 0.2, {}),
        "conv": ("standard", 0.3, {}),
        "sequence": ("variational", 0.2, {}),
    },
    "droppath": {
        "input": ("standard", 0.1, {}),
        "hidden": ("standard", 0.2, {}),
        "conv": ("standard", 0.3, {}),
        "sequence": ("standard", 0.2, {}),
    },
    "embedding": {
        "input": ("standard", 0.1, {}),
        "hidden": ("standard", 0.2, {}),
        "conv": ("standard", 0.3, {}),
        "sequence": ("standard", 0.2, {}),
    },
}
FIXED = {
    "attention": ("standard", 0.4, {}),
    "residual": ("droppath", 0.5, {}),
    "embedding": ("embedding", 0.6, {}),
}


def test_for_site_table_covers_every_kind() -> None:
    assert set(FOR_SITE) | {"none"} == set(DROPOUT_KINDS)
    assert set(FOR_SITE["standard"]) | set(FIXED) == set(SITES)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_for_site(kind: str, site: str) -> None:
    cfg = DropoutConfig(kind=kind, **R)
    if kind == "none":
        expected: tuple[str, float, dict[str, Any]] = ("none", 0.0, {})
    else:
        expected = FIXED[site] if site in FIXED else FOR_SITE[kind][site]
    assert cfg.for_site(site) == expected


def test_for_site_returns_a_fresh_options_dict() -> None:
    cfg = DropoutConfig(kind="dropblock", conv_rate=0.1)
    cfg.for_site("conv")[2]["block_size"] = 99
    assert cfg.for_site("conv")[2] == {"block_size": 3}


def test_for_site_unknown_site_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown site 'dense'; sites: input, hidden, conv"):
        DropoutConfig().for_site("dense")


def test_rate_is_zero_for_kind_none() -> None:
    assert DropoutConfig(kind="none", weight_rate=0.5).rate("weight_rate") == 0.0
    assert DropoutConfig(kind="standard", weight_rate=0.5).rate("weight_rate") == 0.5


# ------------------------------------------------------------------------------------------
# EarlyStoppingConfig


@pytest.mark.parametrize(
    ("monitor", "mode", "expected"),
    [
        ("val_loss", "auto", "min"),
        ("val_acc", "auto", "max"),
        ("val_accuracy", "auto", "max"),
        ("val_f1", "auto", "max"),
        ("val_auc", "auto", "max"),
        ("val_r2", "auto", "max"),
        ("val_error", "auto", "min"),
        ("val_mse", "auto", "min"),
        ("val_loss", "max", "max"),
        ("val_acc", "min", "min"),
    ],
)
def test_resolved_mode(monitor: str, mode: str, expected: str) -> None:
    assert EarlyStoppingConfig(monitor=monitor, mode=mode).resolved_mode == expected  # type: ignore[arg-type]


def test_the_build_methods_are_deprecated_shims_of_droptune_training() -> None:
    """``TrainConfig.build_*`` stay one release: they warn and give what
    ``droptune.build_*(config)`` gives."""
    import pytorch_lightning as pl

    import droptune
    from droptune.config import TrainConfig

    cfg = TrainConfig.from_dict(
        {"data": {"name": "digits", "train_subset": 64}, "model": {"hidden": [8]}}
    )
    with pytest.warns(DeprecationWarning, match=r"droptune\.build_datamodule\(config"):
        data = cfg.build_datamodule()
    with pytest.warns(DeprecationWarning, match="build_module"):
        module = cfg.build_module(data)
    with pytest.warns(DeprecationWarning, match="build_trainer"):
        trainer = cfg.build_trainer(max_epochs=1)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == 1
    fresh = droptune.build_module(cfg, droptune.build_datamodule(cfg))
    assert type(fresh) is type(module)
    for a, b in zip(fresh.parameters(), module.parameters(), strict=True):
        assert a.shape == b.shape and bool((a == b).all())  # both seeded from train.seed
