"""Training: early stopping, max-norm, L2 (decoupled and coupled, built-in and custom models),
seeding, fit() results and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping
import torch
from torch import Tensor
from torch import nn

from droptune.config import TrainConfig
from droptune.data import TensorLoader
from droptune.data import describe
from droptune.layers import decay_split
from droptune.models import PlainModuleWrapper
from droptune.models import RegularizedModule
from droptune.training import RegularizationCallback
from droptune.training import build_datamodule
from droptune.training import build_module
from droptune.training import build_trainer
from droptune.training import fit
from tests.helpers import Recorder
from tests.helpers import ScriptedModule
from tests.helpers import config
from tests.helpers import linear_and_conv_weights
from tests.user_code import UserClassifier


# ----------------------------------------------------------------------------------------------
# early stopping on a scripted metric

NAN = float("nan")
_RISING = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.4, 0.3]


@pytest.mark.parametrize(
    ("script", "stopping", "last_epoch"),
    [
        # best at epoch 1; epochs 2 and 3 do not improve -> patience 2 is used up at epoch 3
        (_RISING, {"patience": 2}, 3),
        (_RISING, {"patience": 3}, 4),
        (_RISING, {"patience": 1}, 2),
        # keeps improving: runs to max_epochs
        ([1.0, 0.9, 0.85, 0.84, 0.83, 0.82, 0.81, 0.8], {"patience": 2}, 7),
        # ... unless improvements smaller than min_delta do not count
        ([1.0, 0.9, 0.85, 0.84, 0.83, 0.82, 0.81, 0.8], {"patience": 2, "min_delta": 0.06}, 3),
        # accuracies are maximized (mode auto)
        ([0.5, 0.6, 0.55, 0.58, 0.59, 0.9, 0.9, 0.9], {"patience": 2, "monitor": "val_acc"}, 3),
        # ... and an explicit mode wins over the name (minimized: best at epoch 0)
        (
            [0.5, 0.6, 0.55, 0.58, 0.59, 0.9, 0.9, 0.9],
            {"patience": 2, "monitor": "val_acc", "mode": "min"},
            2,
        ),
        # a non-finite metric stops at once
        ([1.0, 0.9, NAN, 0.5, 0.4, 0.3, 0.2, 0.1], {"patience": 5}, 2),
        # patience null turns early stopping off
        (_RISING, {"patience": None}, 7),
    ],
)
def test_early_stopping_stops_at_the_expected_epoch(
    script: list[float], stopping: dict[str, Any], last_epoch: int
) -> None:
    monitor = stopping.get("monitor", "val_loss")
    cfg = config(train={"max_epochs": len(script)}, regularization={"early_stopping": stopping})
    module = ScriptedModule(script, monitor)
    loader = TensorLoader(torch.ones(4, 1), torch.zeros(4), batch_size=2)
    trainer = build_trainer(cfg)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert module.validated == list(range(last_epoch + 1))
    stopper = trainer.early_stopping_callback
    if stopping["patience"] is None:
        assert stopper is None
        return
    assert isinstance(stopper, EarlyStopping)
    assert stopper.patience == stopping["patience"]
    assert stopper.monitor == monitor
    stopped = last_epoch < len(script) - 1
    assert stopper.stopped_epoch == (last_epoch if stopped else 0)


def test_fit_reports_an_early_stop_in_the_first_epoch() -> None:
    # An absurd learning rate gives a NaN validation loss at epoch 0: early stopping's finite
    # check ends the run there, and fit() must say so.
    cfg = config(
        train={"optimizer": "sgd", "lr": 1e12, "max_epochs": 5},
        regularization={"early_stopping": {"patience": 3}},
    )
    result = fit(cfg, test=False)
    assert result.epochs == 1
    assert result.stopped_early
    assert "best_val_loss" not in result.metrics  # nothing finite to remember


def test_fit_reports_epochs_and_early_stop() -> None:
    cfg = config(
        train={"max_epochs": 8},
        regularization={"early_stopping": {"patience": 1, "min_delta": 100.0}},
    )
    result = fit(cfg, test=False)
    assert (result.epochs, result.stopped_early) == (2, True)
    full = fit(config(train={"max_epochs": 2}), test=False)
    assert (full.epochs, full.stopped_early) == (2, False)


# ----------------------------------------------------------------------------------------------
# max-norm


def _max_row_norms(module: nn.Module) -> dict[str, float]:
    norms = {}
    for name, weight in linear_and_conv_weights(module):
        norms[name] = float(weight.reshape(len(weight), -1).norm(dim=1).max())
    return norms


@pytest.mark.parametrize(
    "sections",
    [
        {"model": {"family": "mlp", "hidden": [64, 32]}},
        {"model": {"family": "cnn", "channels": [8, 8], "hidden": [16]}},
        {
            "model": {"family": "mlp", "hidden": [32]},
            "regularization": {"dropout": {"kind": "standard", "weight_rate": 0.2}},
        },
    ],
    ids=["mlp", "cnn", "mlp-dropconnect"],
)
def test_max_norm_holds_after_training(sections: dict[str, Any]) -> None:
    c = 0.5
    train = {"optimizer": "sgd", "lr": 0.5, "max_epochs": 2}
    reg = sections.get("regularization", {})
    cfg = config(
        **{**sections, "train": train, "regularization": {**reg, "max_norm": c}},
    )
    norms = _max_row_norms(fit(cfg, test=False).module)
    assert len(norms) >= 2
    assert all(n <= c + 1e-5 for n in norms.values()), norms
    # The constraint is what holds the norms down: without it, the same run exceeds c.
    free = config(**{**sections, "train": train, "regularization": reg})
    assert max(_max_row_norms(fit(free, test=False).module).values()) > c + 0.1


# ----------------------------------------------------------------------------------------------
# L2: optimizer groups, decoupled decay by the callback, coupled penalty / gradient


class FrozenModule(RegularizedModule):
    """A built-in module whose data loss has zero gradient (logits × 0): only L2 moves it."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * 0.0


_LR, _LAMBDA = 0.1, 0.5
_USER_LM = "tests.user_code.models:UserClassifier"
_USER_NET = "tests.user_code.models:UserMLP"
# digits, 100 training samples in batches of 50: 2 steps per epoch, 2 epochs.
_DATA = {"train_subset": 100, "batch_size": 50}
_STEPS_PER_EPOCH, _EPOCHS = 2, 2


def _builtin(optimizer: str, mode: str, strength: float, momentum: float = 0.9) -> TrainConfig:
    return config(
        data=_DATA,
        model={"family": "mlp", "hidden": [16], "norm": "layer"},
        train={"optimizer": optimizer, "lr": _LR, "momentum": momentum, "max_epochs": _EPOCHS},
        regularization={"l2": {"strength": strength, "mode": mode}},
    )


def _custom(
    target: str, mode: str, strength: float, train: dict[str, Any] | None = None, **kwargs: Any
) -> TrainConfig:
    """The user's model (``kwargs`` for its constructor) with a frozen data loss."""
    if target == _USER_LM:
        kwargs.setdefault("lr", _LR)  # the user's own optimizer uses its own LR
    return config(
        data=_DATA,
        model={"family": "custom", "target": target, "kwargs": {"frozen": True, **kwargs}},
        train={"lr": _LR, "momentum": 0.0, "max_epochs": _EPOCHS, **(train or {})},
        regularization={"l2": {"strength": strength, "mode": mode}},
    )


def _per_epoch_lr(halving: bool) -> list[float]:
    """The LR of each epoch: the user's StepLR halves it every epoch."""
    return [_LR * (0.5**e if halving else 1.0) for e in range(_EPOCHS)]


def _factor(per_step: float, lrs: list[float]) -> float:
    """Product over all steps of (1 - per_step·lr·λ)."""
    out = 1.0
    for lr in lrs:
        out *= (1.0 - per_step * lr * _LAMBDA) ** _STEPS_PER_EPOCH
    return out


# (id, builder, per-step multiple of lr·λ, user LR schedule halves, group decays when λ > 0)
L2_CASES: list[tuple[str, Any, float, bool, list[float]]] = [
    # AdamW carries decoupled decay itself, on the decay group only
    ("adamw-decoupled", lambda s: _builtin("adamw", "decoupled", s), 1.0, False, [_LAMBDA, 0.0]),
    # Adam / SGD do not: the callback applies w ← w(1 − lr·λ)
    ("adam-decoupled", lambda s: _builtin("adam", "decoupled", s), 1.0, False, [0.0, 0.0]),
    ("sgd-decoupled", lambda s: _builtin("sgd", "decoupled", s), 1.0, False, [0.0, 0.0]),
    # coupled: the penalty λ·Σw² in the loss has gradient 2λw
    ("sgd-coupled", lambda s: _builtin("sgd", "coupled", s, momentum=0.0), 2.0, False, [0.0, 0.0]),
    # the user's LightningModule: its own AdamW (weight_decay 0.1, zeroed) + StepLR
    ("custom-decoupled", lambda s: _custom(_USER_LM, "decoupled", s), 1.0, True, [0.0]),
    # ... its own SGD (weight_decay 0.1, zeroed): the callback adds 2λw to the gradient
    (
        "custom-coupled",
        lambda s: _custom(_USER_LM, "coupled", s, optimizer="sgd"),
        2.0,
        True,
        [0.0],
    ),
    # a plain nn.Module, trained by droptune's wrapper with Adam / SGD
    (
        "plain-decoupled",
        lambda s: _custom(_USER_NET, "decoupled", s, train={"optimizer": "adam"}),
        1.0,
        False,
        [0.0, 0.0],
    ),
    (
        "plain-coupled",
        lambda s: _custom(_USER_NET, "coupled", s, train={"optimizer": "sgd"}),
        2.0,
        False,
        [0.0, 0.0],
    ),
]


def _build(cfg: TrainConfig) -> tuple[pl.LightningModule, Any]:
    dm = build_datamodule(cfg)
    if cfg.model.family == "custom":
        return build_module(cfg, dm), dm
    return FrozenModule(cfg, describe(dm)), dm


@pytest.mark.parametrize("strength", [0.0, _LAMBDA])
@pytest.mark.parametrize(
    ("builder", "per_step", "halving", "group_decay"),
    [case[1:] for case in L2_CASES],
    ids=[case[0] for case in L2_CASES],
)
def test_l2_shrinks_exactly_the_decayed_weights(
    builder: Any, per_step: float, halving: bool, group_decay: list[float], strength: float
) -> None:
    cfg = builder(strength)
    pl.seed_everything(0, verbose=False)
    module, dm = _build(cfg)
    decay, no_decay = decay_split(module)
    assert decay and no_decay
    before_decay = [p.detach().clone() for p in decay]
    before_rest = [p.detach().clone() for p in no_decay]

    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=dm)

    groups = trainer.optimizers[0].param_groups
    expected_groups = group_decay if strength else [0.0] * len(group_decay)
    assert [g["weight_decay"] for g in groups] == expected_groups
    if len(groups) == 2:  # droptune's own groups: weights vs biases and norm parameters
        assert {id(p) for p in groups[0]["params"]} == {id(p) for p in decay}
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in no_decay}
    factor = _factor(per_step, _per_epoch_lr(halving)) if strength else 1.0
    assert factor < 0.9 or strength == 0.0
    for old, new in zip(before_decay, decay, strict=True):
        torch.testing.assert_close(new.detach(), old * factor, rtol=1e-5, atol=1e-7)
    for old, new in zip(before_rest, no_decay, strict=True):
        assert torch.equal(new.detach(), old)  # biases and norm parameters are never decayed


def test_coupled_penalty_is_added_to_the_builtin_training_loss() -> None:
    cfg = _builtin("adamw", "coupled", _LAMBDA)
    plain = _builtin("adamw", "coupled", 0.0)
    dm = build_datamodule(cfg)
    module = RegularizedModule(cfg, describe(dm))
    reference = RegularizedModule(plain, describe(dm))
    reference.load_state_dict(module.state_dict())
    batch = next(iter(dm.train_dataloader()))
    penalty = _LAMBDA * sum(
        float(m.weight.detach().pow(2).sum()) for m in module.modules() if isinstance(m, nn.Linear)
    )
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: logging is skipped
        difference = module.training_step(batch, 0) - reference.training_step(batch, 0)
    difference = difference.detach()
    assert float(difference) == pytest.approx(penalty, rel=1e-5)


@pytest.mark.parametrize(
    ("optimizer", "mode", "expected"),
    [
        ("adamw", "decoupled", None),  # the optimizer carries it
        ("adam", "decoupled", "decoupled"),
        ("sgd", "decoupled", "decoupled"),
        ("adamw", "coupled", None),  # the module adds the penalty
    ],
)
def test_callback_applies_l2_only_where_nothing_else_does(
    optimizer: str, mode: str, expected: str | None
) -> None:
    cfg = _builtin(optimizer, mode, _LAMBDA)
    module = RegularizedModule(cfg, describe(build_datamodule(cfg)))
    callback = RegularizationCallback(cfg)
    assert callback._l2_here(module) == expected
    user = cfg.with_overrides(
        {"model": {"family": "custom", "target": _USER_LM}, "data.train_subset": None}
    )
    user_module = build_module(user)
    assert isinstance(user_module, UserClassifier)
    assert RegularizationCallback(user)._l2_here(user_module) == mode
    off = cfg.with_overrides({"regularization.l2.strength": 0.0})
    assert RegularizationCallback(off)._l2_here(module) is None


def test_plain_wrapper_optimizer_has_no_weight_decay() -> None:
    cfg = _custom(_USER_NET, "decoupled", _LAMBDA, train={"optimizer": "adamw"})
    module = build_module(cfg)
    assert isinstance(module, PlainModuleWrapper)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    assert RegularizationCallback(cfg)._l2_here(module) == "decoupled"


# ----------------------------------------------------------------------------------------------
# seeding


def _seeded(seed: int) -> dict[str, float]:
    cfg = config(
        data={"train_subset": 300},
        train={"seed": seed, "max_epochs": 2},
        regularization={"dropout": {"kind": "standard", "input_rate": 0.2, "hidden_rate": 0.5}},
    )
    metrics = fit(cfg).metrics
    metrics.pop("epoch_time")
    return metrics


def test_same_seed_gives_identical_metrics() -> None:
    first, second = _seeded(3), _seeded(3)
    assert first == second  # exact equality on CPU
    assert {"val_loss", "val_acc", "test_loss", "test_acc", "train_loss"} <= set(first)
    other = _seeded(4)
    assert other["val_loss"] != first["val_loss"]
    assert other["train_loss"] != first["train_loss"]


# ----------------------------------------------------------------------------------------------
# fit() and checkpoints


def test_fit_metrics(tmp_path: Path) -> None:
    recorder = Recorder()
    cfg = config(train={"max_epochs": 3}, regularization={"early_stopping": {"patience": 5}})
    result = fit(cfg, checkpoint=tmp_path / "m.ckpt", callbacks=[recorder])
    losses = recorder.series("val_loss")
    assert result.metrics["val_loss"] == losses[-1]
    assert result.metrics["best_val_loss"] == min(losses)
    assert {"test_loss", "test_acc", "train_loss", "train_acc", "val_acc"} <= set(result.metrics)
    assert all(isinstance(v, float) for v in result.metrics.values())
    assert result.config is cfg and result.epochs == 3 and not result.stopped_early

    loaded = RegularizedModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.cfg == cfg
    x = result.trainer.datamodule.splits["val"][0]  # type: ignore[attr-defined]
    result.module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), result.module(x))


def test_fit_without_test() -> None:
    result = fit(config(train={"max_epochs": 1}), test=False)
    assert not any(k.startswith("test_") for k in result.metrics)


def test_user_callbacks_run_next_to_droptunes_own() -> None:
    recorder = Recorder()
    cfg = config(regularization={"early_stopping": {"patience": 3}})
    trainer = build_trainer(cfg, callbacks=[recorder], max_epochs=1)
    kinds = [type(c) for c in trainer.callbacks]
    assert RegularizationCallback in kinds and EarlyStopping in kinds and Recorder in kinds
    assert trainer.max_epochs == 1
    assert trainer.logger is None


def test_matmul_precision_is_applied_and_validated() -> None:
    previous = torch.get_float32_matmul_precision()
    cfg = TrainConfig.from_dict(
        {
            "data": {"name": "synthetic", "n_samples": 200, "n_features": 8},
            "model": {"hidden": [8]},
            "train": {"max_epochs": 1, "accelerator": "cpu", "matmul_precision": "high"},
        }
    )
    try:
        fit(cfg, test=False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    with pytest.raises(ValueError, match=r"train\.matmul_precision: .*'highest'.*'tf32'"):
        TrainConfig.from_dict({"train": {"matmul_precision": "tf32"}})


# ----------------------------------------------------------------------------------------------
# Restoring the best epoch's weights


def _val_loss(module: Any, cfg: TrainConfig) -> float:
    data = build_datamodule(cfg)
    data.setup("fit")
    x, y = data.splits["val"]
    module.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(module(x), y))


@pytest.mark.parametrize("restore", [True, False])
def test_early_stopping_ends_with_the_best_epochs_weights(restore: bool) -> None:
    """A high learning rate overfits after a few epochs; with restore_best the module ends with
    the weights of the epoch that scored best (what a trial's value reports), otherwise with
    the last epoch's, ``patience`` epochs later."""
    cfg = config(
        model={"family": "mlp", "hidden": [64]},
        train={"max_epochs": 40, "lr": 0.03},
        regularization={"early_stopping": {"patience": 3, "restore_best": restore}},
    )
    result = fit(cfg, test=False)
    assert result.stopped_early
    best = result.metrics["best_val_loss"]
    final = _val_loss(result.module, cfg)
    if restore:
        assert final == pytest.approx(best, rel=1e-4, abs=1e-5)
    else:
        assert final > best + 1e-4
