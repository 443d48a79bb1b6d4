"""Samplers and pruners from the spec: built without touching the process's warning filters."""

from __future__ import annotations

import warnings

import optuna
import pytest

from droptune.study.factories import make_sampler
from droptune.study.spec import spec_from_dict
from tests.study.helpers import TINY
from tests.study.helpers import merge


@pytest.mark.parametrize("name", ["gp", "qmc", "tpe"])
def test_building_a_sampler_changes_no_warning_filter_and_warns_nothing(name: str) -> None:
    spec = spec_from_dict(merge(TINY, {"sampler": {"name": name, "seed": 3}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        sampler = make_sampler(spec)
        study = optuna.create_study(sampler=sampler)
        study.ask()  # the per-trial sampler is built here
        assert list(warnings.filters) == before
    experimental = [
        w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)
    ]
    assert experimental == []
