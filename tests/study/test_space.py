"""The conditional search space against real Optuna trials (in-memory studies, FixedTrial).

The rule (droptune/study/space.py): the dropout kind is sampled first; with kind ``none`` no
dropout parameter is sampled; ``block_size`` only with ``dropblock``; ``conv_rate`` only for
``cnn``; ``recurrent_rate`` only for ``rnn``; parameter names are the dotted config paths.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
import pytest

from droptune.exceptions import SpecError
from droptune.study.objective import Objective
from droptune.study.objective import trial_seed
from droptune.study.space import KIND_PATH
from droptune.study.space import suggest
from droptune.study.spec import StudySpec
from droptune.study.spec import spec_from_dict
from tests.study.helpers import TINY
from tests.study.helpers import merge


DROP = "regularization.dropout."


def make_spec(
    search: dict[str, Any], model: dict[str, Any] | None = None, **extra: Any
) -> StudySpec:
    data = merge(TINY, {"search": search, **extra})
    if model is not None:
        data["model"] = model
        data["data"] = {"name": "digits", "batch_size": 64, "train_subset": 200}
    return spec_from_dict(data)


def ask(spec: StudySpec, n: int = 1, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """Suggest ``n`` trials on a real in-memory study; returns them as Optuna stored them."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, spec, spec.base)
        assert params == trial.params
        study.tell(trial, 0.0)
    return study.trials


def fixed(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    """suggest() on a FixedTrial: raises if a parameter outside ``params`` is asked for."""
    return suggest(optuna.trial.FixedTrial(params), spec, spec.base)


CNN = {"family": "cnn", "channels": [4], "hidden": [8]}
RNN = {"family": "rnn", "hidden_size": 8}


def test_kind_none_samples_no_dropout_parameter() -> None:
    spec = make_spec(
        {
            KIND_PATH: {"choices": ["none", "standard"]},
            DROP + "input_rate": {"low": 0.0, "high": 0.5},
            DROP + "hidden_rate": {"low": 0.0, "high": 0.5},
            DROP + "weight_rate": {"low": 0.0, "high": 0.5},
            "regularization.l2.strength": {"low": 1e-6, "high": 1e-2, "log": True},
        }
    )
    params = fixed(spec, {KIND_PATH: "none", "regularization.l2.strength": 1e-4})
    assert params == {KIND_PATH: "none", "regularization.l2.strength": 1e-4}
    params = fixed(
        spec,
        {
            KIND_PATH: "standard",
            DROP + "input_rate": 0.1,
            DROP + "hidden_rate": 0.2,
            DROP + "weight_rate": 0.3,
            "regularization.l2.strength": 1e-4,
        },
    )
    assert set(params) == {
        KIND_PATH,
        DROP + "input_rate",
        DROP + "hidden_rate",
        DROP + "weight_rate",
        "regularization.l2.strength",
    }
    # Many sampled trials: a rate appears exactly when the kind is not none.
    for trial in ask(spec, n=30):
        has_rates = any(name.startswith(DROP) and name != KIND_PATH for name in trial.params)
        assert has_rates == (trial.params[KIND_PATH] != "none"), trial.params
        assert "regularization.l2.strength" in trial.params


def test_fixed_kind_none_samples_no_rate() -> None:
    spec = make_spec(
        {DROP + "hidden_rate": {"low": 0.0, "high": 0.5}, "train.lr": {"low": 1e-4, "high": 1e-2}},
        regularization={"dropout": {"kind": "none"}},
    )
    assert fixed(spec, {"train.lr": 1e-3}) == {"train.lr": 1e-3}


def test_kind_is_sampled_first_whatever_the_spec_order() -> None:
    # The kind comes last in the spec; the base kind is "standard". If hidden_rate were decided
    # before the kind, the FixedTrial would be asked for it and raise.
    spec = make_spec(
        {
            DROP + "hidden_rate": {"low": 0.0, "high": 0.5},
            "regularization.l2.strength": {"low": 1e-6, "high": 1e-2, "log": True},
            KIND_PATH: {"choices": ["standard", "none"]},
        }
    )
    assert list(spec.search)[-1] == KIND_PATH
    assert fixed(spec, {KIND_PATH: "none", "regularization.l2.strength": 1e-3}) == {
        KIND_PATH: "none",
        "regularization.l2.strength": 1e-3,
    }
    for trial in ask(spec, n=5):
        assert next(iter(trial.params)) == KIND_PATH
        assert next(iter(trial.distributions)) == KIND_PATH


def test_block_size_only_with_dropblock() -> None:
    spec = make_spec(
        {
            KIND_PATH: {"choices": ["standard", "spatial", "dropblock"]},
            DROP + "conv_rate": {"low": 0.0, "high": 0.3},
            DROP + "block_size": {"low": 1, "high": 3, "type": "int"},
        },
        model=CNN,
    )
    for kind in ("standard", "spatial"):
        assert fixed(spec, {KIND_PATH: kind, DROP + "conv_rate": 0.1}) == {
            KIND_PATH: kind,
            DROP + "conv_rate": 0.1,
        }
    params = fixed(spec, {KIND_PATH: "dropblock", DROP + "conv_rate": 0.1, DROP + "block_size": 2})
    assert params[DROP + "block_size"] == 2
    seen = set()
    for trial in ask(spec, n=30):
        kind = trial.params[KIND_PATH]
        seen.add(kind)
        assert (DROP + "block_size" in trial.params) == (kind == "dropblock")
        assert DROP + "conv_rate" in trial.params
    assert seen == {"standard", "spatial", "dropblock"}


def test_conv_rate_only_for_cnn_recurrent_rate_only_for_rnn() -> None:
    conv = {DROP + "conv_rate": {"low": 0.0, "high": 0.3}}
    recurrent = {DROP + "recurrent_rate": {"low": 0.0, "high": 0.3}}
    assert set(ask(make_spec(conv, model=CNN))[0].params) == {DROP + "conv_rate"}
    assert set(ask(make_spec(recurrent, model=RNN))[0].params) == {DROP + "recurrent_rate"}
    with pytest.raises(SpecError, match=r"conv_rate: only applies to model\.family cnn"):
        make_spec(conv)
    with pytest.raises(SpecError, match=r"recurrent_rate: only applies to model\.family rnn"):
        make_spec(recurrent, model=CNN)
    with pytest.raises(SpecError, match=r"conv_rate: only applies to model\.family cnn"):
        make_spec(conv, model=RNN)
    # The kinds a family takes: variational needs an rnn, spatial a cnn.
    with pytest.raises(SpecError, match=r"'variational' does not fit model\.family 'cnn'"):
        make_spec({KIND_PATH: {"choices": ["standard", "variational"]}}, model=CNN)
    spec = make_spec({KIND_PATH: {"choices": ["none", "variational"]}, **recurrent}, model=RNN)
    assert fixed(spec, {KIND_PATH: "variational", DROP + "recurrent_rate": 0.2}) == {
        KIND_PATH: "variational",
        DROP + "recurrent_rate": 0.2,
    }


def test_distributions_use_the_right_suggest() -> None:
    spec = make_spec(
        {
            KIND_PATH: {"choices": ["standard", "gaussian"]},
            DROP + "hidden_rate": {"low": 0.0, "high": 0.5, "step": 0.1},
            "regularization.l2.strength": {"low": 1e-6, "high": 1e-2, "log": True},
            "regularization.early_stopping.patience": {"low": 2, "high": 10, "type": "int"},
            "data.batch_size": {"low": 16, "high": 128, "type": "int", "log": True},
            "regularization.max_norm": {"choices": [None, 2.0, 4.0]},
            "train.lr": {"low": 1e-4, "high": 1e-2},
        }
    )
    trials = ask(spec, n=10)
    dists = trials[0].distributions
    assert dists[KIND_PATH] == CategoricalDistribution(["standard", "gaussian"])
    assert dists[DROP + "hidden_rate"] == FloatDistribution(0.0, 0.5, step=0.1)
    assert dists["regularization.l2.strength"] == FloatDistribution(1e-6, 1e-2, log=True)
    assert dists["regularization.early_stopping.patience"] == IntDistribution(2, 10)
    assert dists["data.batch_size"] == IntDistribution(16, 128, log=True)
    assert dists["regularization.max_norm"] == CategoricalDistribution([None, 2.0, 4.0])
    assert dists["train.lr"] == FloatDistribution(1e-4, 1e-2)
    for trial in trials:
        p = trial.params
        assert isinstance(p["regularization.early_stopping.patience"], int)
        assert isinstance(p["data.batch_size"], int) and 16 <= p["data.batch_size"] <= 128
        assert abs(p[DROP + "hidden_rate"] * 10 - round(p[DROP + "hidden_rate"] * 10)) < 1e-9
        assert 1e-6 <= p["regularization.l2.strength"] <= 1e-2


def test_parameter_names_are_config_paths_and_build_the_trial_config() -> None:
    spec = make_spec(
        {
            KIND_PATH: {"choices": ["standard", "gaussian"]},
            DROP + "hidden_rate": {"low": 0.1, "high": 0.5},
            "regularization.early_stopping.patience": {"low": 2, "high": 4, "type": "int"},
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    cfg, params = Objective(spec).config_for(trial)
    assert set(trial.params) == set(spec.search)
    assert params == trial.params
    assert cfg.regularization.dropout.kind == params[KIND_PATH]
    assert cfg.regularization.dropout.hidden_rate == params[DROP + "hidden_rate"]
    assert (
        cfg.regularization.early_stopping.patience
        == params["regularization.early_stopping.patience"]
    )
    assert cfg.train.seed == trial_seed(spec.study.seed, trial.number)
    # Not searched: the spec's fixed values.
    assert cfg.regularization.dropout.input_rate == TINY["regularization"]["dropout"]["input_rate"]
    assert cfg.model.hidden == [16]


def test_trial_seed_depends_on_study_seed_and_number() -> None:
    seeds = {trial_seed(s, n) for s in range(3) for n in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**31 - 1 for s in seeds)
    assert trial_seed(7, 3) == trial_seed(7, 3)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            {"regularization.early_stopping.patience": {"low": 2, "high": 10}},
            "patience: candidate 2.0 is invalid",
        ),
        ({"data.batch_size": {"low": 0, "high": 8, "type": "int"}}, "candidate 0 is invalid"),
        ({"train.optimizer": {"choices": ["adamw", "lion"]}}, "candidate 'lion' is invalid"),
        ({"regularization.l2.mode": {"choices": ["decoupled", 3]}}, "candidate 3 is invalid"),
        ({"model.hidden": {"low": 8, "high": 16, "type": "int"}}, "hidden: no such config field"),
        ({"regularization.dropout.block_size": {"low": 0.5, "high": 3}}, "block_size"),
    ],
)
def test_check_search_space_rejects_candidates_that_do_not_validate(
    search: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        make_spec(search)
