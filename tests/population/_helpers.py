"""Helpers shared by the population tests: small configs and quiet Lightning fits."""

from __future__ import annotations

import logging
from typing import Any
import warnings

from droptune.config import TrainConfig
from droptune.training import FitResult
from droptune.training import fit
from tests.helpers import Recorder
from tests.helpers import config


def member(seed: int = 0, **sections: dict[str, Any]) -> TrainConfig:
    """:func:`tests.helpers.config` (digits, CPU, one thread, no dropout, no early stopping)
    with ``train.seed`` set."""
    return config(**sections).with_overrides({"train.seed": seed})


def members(seeds: range | list[int], **sections: dict[str, Any]) -> list[TrainConfig]:
    return [member(seed, **sections) for seed in seeds]


def quiet_fit(cfg: TrainConfig) -> tuple[FitResult, list[dict[str, float]]]:
    """``fit(cfg, test=False)`` without Lightning's banners; also the per-epoch metrics."""
    recorder = Recorder()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(cfg, test=False, callbacks=[recorder])
    return result, recorder.epochs
