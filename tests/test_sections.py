"""Every public function that takes a regularization section reads it the same way: the config
object, its dict form, the section's own part, or the documented shorthand (one helper,
:func:`droptune._sections.read_section`), and bad input is a ConfigError naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import droptune
from droptune._sections import read_section
from droptune.config import DropoutConfig
from droptune.config import L2Config
from droptune.config import RegularizationConfig
from droptune.config import TrainConfig
from droptune.exceptions import ConfigError
from droptune.layers import l2_penalty
from droptune.layers import max_norm_
from droptune.layers import param_groups


WHOLE = {
    "dropout": {"hidden_rate": 0.3},
    "l2": {"strength": 0.01, "mode": "coupled"},
    "max_norm": 2.0,
}

#: Every accepted form of the same L2 section.
L2_FORMS: list[Any] = [
    L2Config(strength=0.01, mode="coupled"),
    {"strength": 0.01, "mode": "coupled"},
    RegularizationConfig.from_dict(WHOLE),
    WHOLE,
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


@pytest.mark.parametrize("form", L2_FORMS)
def test_every_l2_form_gives_the_same_groups_and_penalty(form: Any) -> None:
    model = _model()
    groups = param_groups(model, form)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]  # coupled: the loss carries it
    expected = 0.01 * sum(p.pow(2).sum() for p in (model[0].weight, model[2].weight))
    assert float(l2_penalty(model, form)) == pytest.approx(float(expected))


def test_the_reported_dict_and_the_number_shorthand() -> None:
    model = _model()
    # The user's report: AttributeError: 'dict' object has no attribute 'strength'.
    groups = droptune.param_groups(model, {"strength": 1e-4, "mode": "decoupled"})
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert droptune.param_groups(model, 1e-4)[0]["weight_decay"] == 1e-4
    assert droptune.param_groups(model, {"strength": 1e-4}, mode="coupled")[0]["weight_decay"] == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"strength": -1.0}, r"^regularization\.l2\.strength: must be >= 0\.0, got -1\.0$"),
        ({"strength": 1e-4, "mode": "sideways"}, r"^regularization\.l2\.mode: must be"),
        (
            {"strenght": 1e-4},
            r"^regularization\.l2\.strenght: unknown key; allowed keys: strength, mode",
        ),
        ({"l2": {"strength": -1.0}}, r"^regularization\.l2\.strength: must be >= 0"),
        ("1e-4", r"^regularization\.l2: must be .*got str '1e-4'"),
        (True, r"^regularization\.l2: must be .*got bool True"),
        (float("nan"), r"^regularization\.l2\.strength: "),
    ],
)
def test_bad_l2_input_names_the_field(bad: Any, message: str) -> None:
    for fn in (param_groups, l2_penalty):
        with pytest.raises(ConfigError, match=message):
            fn(_model(), bad)


@pytest.mark.parametrize(
    "form", [2.0, WHOLE, RegularizationConfig.from_dict(WHOLE), {"max_norm": 2.0}]
)
def test_every_max_norm_form_clips_to_the_same_bound(form: Any) -> None:
    model = _model()
    with torch.no_grad():
        model[0].weight.mul_(100)
    assert max_norm_(model, form) == 2
    assert float(model[0].weight.norm(dim=1).max()) <= 2.0 + 1e-5


def test_max_norm_off_visits_nothing_and_bad_bounds_name_the_field() -> None:
    model = _model()
    before = model[0].weight.detach().clone().mul_(100)
    with torch.no_grad():
        model[0].weight.copy_(before)
    assert max_norm_(model, None) == 0
    assert max_norm_(model, {"dropout": {"hidden_rate": 0.1}}) == 0  # max_norm: null = off
    assert torch.equal(model[0].weight, before)
    for bad, message in [
        (0.0, r"^regularization\.max_norm: must be > 0\.0"),
        ({"max_norm": -1}, r"^regularization\.max_norm: must be > 0\.0"),
        ("3", r"^regularization\.max_norm: must be .*got str '3'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            max_norm_(model, bad)


@pytest.mark.parametrize(
    "form",
    [
        {"dropout": {"hidden_rate": 0.3}},
        RegularizationConfig.from_dict({"dropout": {"hidden_rate": 0.3}}),
        DropoutConfig(hidden_rate=0.3),
        {"hidden_rate": 0.3},
    ],
)
def test_apply_takes_the_whole_section_or_its_dropout_part(form: Any) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    _, report = droptune.apply(model, form)
    assert report.sites() == {"1": "hidden"} and model[1].p == 0.3


def test_apply_bad_dropout_part_names_the_field() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    with pytest.raises(ConfigError, match=r"^regularization\.dropout\.hidden_rate: must be < 1"):
        droptune.apply(model, {"hidden_rate": 1.5})
    with pytest.raises(ConfigError, match=r"^regularization\.dropout\.hiden_rate: unknown key"):
        droptune.apply(model, {"hiden_rate": 0.1})
    with pytest.raises(ConfigError, match=r"^regularization\.dropout: must be"):
        droptune.apply(model, 0.3)  # type: ignore[arg-type]
    assert type(model[1]) is nn.Dropout


def test_config_builders_take_the_same_shorthand() -> None:
    assert RegularizationConfig.from_dict({"l2": 1e-4}).l2 == L2Config(strength=1e-4)
    cfg = TrainConfig.from_dict({"regularization": {"l2": 1e-4, "max_norm": 3.0}})
    assert cfg.regularization.l2.strength == 1e-4
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"^regularization\.l2\.strength: must be >= 0"):
        TrainConfig.from_dict({"regularization": {"l2": -1}})


def test_a_constructed_but_invalid_object_is_validated_again() -> None:
    bad = L2Config.model_construct(strength=-1.0, mode="decoupled")
    with pytest.raises(ConfigError, match=r"^regularization\.l2\.strength"):
        read_section(bad, "l2")
