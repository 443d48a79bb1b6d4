"""The model families: each trains, logs its metrics and places the configured regularization;
the custom family imports, regularizes and trains a user's own model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from droptune import training
from droptune.config import TrainConfig
from droptune.data import DataInfo
from droptune.data import build_datamodule
from droptune.data import describe
from droptune.exceptions import ConfigError
from droptune.layers import DropBlock
from droptune.layers import DropConnect
from droptune.layers import Dropout
from droptune.layers import DropoutBase
from droptune.layers import DropPath
from droptune.layers import GaussianDropout
from droptune.layers import LockedDropout
from droptune.layers import NoDropout
from droptune.layers import SelfAttention
from droptune.layers import SpatialDropout
from droptune.layers import VariationalGRU
from droptune.layers import VariationalLSTM
from droptune.models import PlainModuleWrapper
from droptune.models import RegularizedModule
from droptune.models import build_module
from droptune.models import build_network
from droptune.training import fit
from tests.helpers import Recorder
from tests.helpers import config
from tests.user_code import UserClassifier
from tests.user_code import UserMLP


def _regression_csv(path: Path, n: int = 400, features: int = 5) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features))
    y = x @ np.linspace(-2.0, 2.0, features) + 3.0 + 0.1 * rng.normal(size=n)
    lines = [",".join([*(f"f{i}" for i in range(features)), "target"])]
    lines += [",".join(f"{v:.6f}" for v in [*row, t]) for row, t in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


_MNIST1D = {"name": "mnist1d", "batch_size": 50, "train_subset": 1000}

FAMILIES: dict[str, dict[str, Any]] = {
    "mlp-digits": {"model": {"family": "mlp", "hidden": [32]}},
    "cnn-digits-image": {"model": {"family": "cnn", "channels": [8], "hidden": [16]}},
    "cnn-mnist1d-signal": {
        "data": {**_MNIST1D, "layout": "signal"},
        "model": {"family": "cnn", "channels": [8, 8], "kernel_size": 5, "hidden": [16]},
    },
    "gru-bidirectional-mnist1d": {
        "data": {**_MNIST1D, "layout": "sequence"},
        "model": {"family": "rnn", "cell": "gru", "hidden_size": 32, "bidirectional": True},
        "train": {"lr": 1e-2},
    },
    "lstm-bidirectional-mnist1d": {
        "data": {**_MNIST1D, "layout": "sequence"},
        "model": {"family": "rnn", "cell": "lstm", "hidden_size": 32, "bidirectional": True},
        "train": {"lr": 1e-2},
    },
    "transformer-mnist1d": {
        "data": _MNIST1D,
        "model": {"family": "transformer", "d_model": 16, "heads": 2, "depth": 1},
    },
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_and_logs_every_epoch(name: str) -> None:
    sections = FAMILIES[name]
    cfg = config(**{**sections, "train": {"max_epochs": 3, **sections.get("train", {})}})
    recorder = Recorder()
    result = fit(cfg, test=False, callbacks=[recorder])
    assert isinstance(result.module, RegularizedModule)
    assert len(recorder.epochs) == 3
    for epoch in recorder.epochs:
        assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(epoch)
    losses = recorder.series("val_loss")
    assert losses[-1] < 0.97 * losses[0], losses
    accuracy = recorder.series("val_acc")
    assert accuracy[-1] > accuracy[0], accuracy
    assert {"lr", "epoch_time"} <= set(result.metrics)
    assert result.metrics["lr"] == pytest.approx(cfg.train.lr)
    assert result.metrics["val_loss"] == losses[-1]
    assert result.epochs == 3 and not result.stopped_early


def test_regression_on_a_csv_file(tmp_path: Path) -> None:
    path = _regression_csv(tmp_path / "reg.csv")
    cfg = config(
        data={"name": "csv", "path": str(path), "target": "target", "task": "regression"},
        model={"family": "mlp", "hidden": [32]},
        train={"max_epochs": 3, "lr": 1e-2},
    )
    recorder = Recorder()
    result = fit(cfg, callbacks=[recorder])
    assert result.module.net[-1].out_features == 1  # type: ignore[index, union-attr]
    for epoch in recorder.epochs:
        assert {"train_loss", "val_loss", "val_rmse"} <= set(epoch)
        assert "val_acc" not in epoch and "train_acc" not in epoch
        # val_rmse is the epoch mean of per-batch RMSEs: at most sqrt(mean MSE) (Jensen).
        assert epoch["val_rmse"] <= epoch["val_loss"] ** 0.5 + 1e-6
    losses = recorder.series("val_loss")
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.8 * losses[0], losses
    assert {"test_loss", "test_rmse"} <= set(result.metrics)
    # The loss is the MSE of the final model on the validation split.
    module = result.module.eval()
    x, y = result.trainer.datamodule.splits["val"]  # type: ignore[attr-defined]
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(module(x).squeeze(-1), y)
    assert float(mse) == pytest.approx(result.metrics["val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# networks: structure and placement of the regularization (no training)


def _info(shape: tuple[int, ...], classes: int | None = 10) -> DataInfo:
    return DataInfo(shape, "classification" if classes else "regression", classes)


def _dropouts(net: nn.Module) -> list[DropoutBase]:
    return [m for m in net.modules() if isinstance(m, DropoutBase)]


def test_mlp_places_input_and_hidden_dropout() -> None:
    cfg = config(
        model={"family": "mlp", "hidden": [16, 8]},
        regularization={"dropout": {"kind": "gaussian", "input_rate": 0.1, "hidden_rate": 0.3}},
    )
    net = build_network(cfg, _info((64,)))
    drops = _dropouts(net)
    assert [type(d) for d in drops] == [GaussianDropout] * 3
    assert [d.p for d in drops] == [0.1, 0.3, 0.3]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 8), (8, 10)]
    assert net(torch.randn(5, 64)).shape == (5, 10)


def test_kind_none_turns_every_dropout_off() -> None:
    cfg = config(
        model={"family": "mlp", "hidden": [8]},
        regularization={"dropout": {"kind": "none", "input_rate": 0.5, "hidden_rate": 0.5}},
    )
    drops = _dropouts(build_network(cfg, _info((64,))))
    assert drops and all(isinstance(d, NoDropout) for d in drops)


@pytest.mark.parametrize(
    ("kind", "conv_type"), [("spatial", SpatialDropout), ("dropblock", DropBlock)]
)
def test_cnn_uses_channel_dropout_after_convolutions(kind: str, conv_type: type) -> None:
    cfg = config(
        model={"family": "cnn", "channels": [4, 4], "hidden": [8]},
        regularization={
            "dropout": {"kind": kind, "conv_rate": 0.2, "hidden_rate": 0.4, "block_size": 7}
        },
    )
    net = build_network(cfg, _info((1, 8, 8)))
    conv_drops = [m for m in net.modules() if isinstance(m, conv_type)]
    assert len(conv_drops) == 2 and all(d.p == 0.2 for d in conv_drops)
    if kind == "dropblock":  # blocks never exceed the feature map (8x8, then 4x4)
        assert [d.block_size for d in conv_drops] == [7, 4]  # type: ignore[attr-defined]
    # The input site has rate 0 here; the dense head uses standard dropout at hidden_rate.
    plain = [m.p for m in net.modules() if type(m) is Dropout]
    assert plain == [0.0, 0.4, 0.4]
    assert any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_cnn_is_one_dimensional_on_signals() -> None:
    cfg = config(model={"family": "cnn", "channels": [4], "hidden": [8]})
    net = build_network(cfg, _info((1, 40)))
    assert any(isinstance(m, nn.Conv1d) for m in net.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert net(torch.randn(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize(
    ("cell", "rnn_type"), [("gru", VariationalGRU), ("lstm", VariationalLSTM)]
)
def test_rnn_places_variational_dropout(cell: str, rnn_type: type) -> None:
    cfg = config(
        model={
            "family": "rnn",
            "cell": cell,
            "hidden_size": 8,
            "num_layers": 2,
            "bidirectional": True,
        },
        regularization={
            "dropout": {
                "kind": "variational",
                "input_rate": 0.1,
                "hidden_rate": 0.2,
                "recurrent_rate": 0.3,
                "recurrent_weight_rate": 0.25,
            }
        },
    )
    net = build_network(cfg, _info((40, 1)))
    layers = [m for m in net.modules() if isinstance(m, rnn_type)]
    assert len(layers) == 2
    assert all(layer.recurrent_dropout == 0.3 for layer in layers)  # type: ignore[attr-defined]
    assert layers[1].input_size == 16  # two directions feed the second layer
    locked = [m for m in net.modules() if isinstance(m, LockedDropout)]
    assert [d.p for d in locked] == [0.1, 0.2]  # input, between the layers
    assert isinstance(net.output_drop, Dropout) and net.output_drop.p == 0.2  # type: ignore[attr-defined]
    # DropConnect (weight drop) on the recurrent weights.
    weight_drops = [m for m in net.modules() if isinstance(m, DropConnect)]
    assert weight_drops and all(d.p == 0.25 for d in weight_drops)
    assert net(torch.randn(3, 40, 1)).shape == (3, 10)


def test_transformer_places_attention_and_drop_path() -> None:
    cfg = config(
        model={"family": "transformer", "d_model": 8, "heads": 2, "depth": 3},
        regularization={
            "dropout": {
                "kind": "standard",
                "attention_rate": 0.15,
                "hidden_rate": 0.1,
                "droppath_rate": 0.2,
            }
        },
    )
    net = build_network(cfg, _info((40, 1)))
    attention = [m for m in net.modules() if isinstance(m, SelfAttention)]
    assert len(attention) == 3
    assert all(a.attn_drop.p == 0.15 for a in attention)
    assert all(isinstance(a.proj_drop, Dropout) and a.proj_drop.p == 0.1 for a in attention)
    # Drop-path grows linearly with depth up to droppath_rate.
    paths = [m for m in net.modules() if isinstance(m, DropPath)]
    assert [d.p for d in paths] == pytest.approx([0.0, 0.1, 0.2])
    assert net(torch.randn(2, 40, 1)).shape == (2, 10)


def test_weight_rate_puts_dropconnect_on_linear_layers_outside_attention() -> None:
    cfg = config(
        model={"family": "transformer", "d_model": 8, "heads": 2, "depth": 1},
        regularization={"dropout": {"kind": "standard", "weight_rate": 0.3}},
    )
    net = build_network(cfg, _info((40, 1)))
    assert any(isinstance(m, DropConnect) for m in net.modules())
    attention = {id(m) for a in net.modules() if isinstance(a, SelfAttention) for m in a.modules()}
    for module in net.modules():
        if isinstance(module, nn.Linear):
            has = any(isinstance(m, DropConnect) for m in module.modules())
            assert has == (id(module) not in attention)


@pytest.mark.parametrize(
    ("family", "shape"),
    [("cnn", (64,)), ("rnn", (64,)), ("transformer", (64,)), ("cnn", (1, 2, 3, 4))],
)
def test_wrong_input_shape_names_data_layout(family: str, shape: tuple[int, ...]) -> None:
    cfg = config(model={"family": family})
    with pytest.raises(ConfigError, match=r"data\.layout"):
        build_network(cfg, _info(shape))


def test_regression_has_one_output() -> None:
    cfg = config(model={"family": "mlp", "hidden": [4]})
    assert build_network(cfg, _info((3,), None))(torch.randn(2, 3)).shape == (2, 1)


def test_module_rebuilds_from_its_hyperparameters() -> None:
    cfg = config(
        model={"family": "mlp", "hidden": [8]},
        regularization={"dropout": {"hidden_rate": 0.2, "weight_rate": 0.1}},
    )
    module = RegularizedModule(cfg, _info((64,)))
    assert module.hparams["config"] == cfg.to_dict()
    assert module.hparams["info"] == asdict(_info((64,)))
    again = RegularizedModule(dict(module.hparams["config"]), dict(module.hparams["info"]))
    assert again.cfg == cfg and again.info == module.info
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }


# ----------------------------------------------------------------------------------------------
# custom family: the user's LightningModule / nn.Module by import path

_USER_LM = "tests.user_code.models:UserClassifier"
_USER_NET = "tests.user_code.models:UserMLP"
_DROP = {"kind": "gaussian", "input_rate": 0.1, "hidden_rate": 0.3}


def _custom(target: str, **sections: Any) -> TrainConfig:
    model = {"family": "custom", "target": target, **sections.pop("model", {})}
    reg = {"dropout": _DROP, **sections.pop("regularization", {})}
    return config(model=model, regularization=reg, **sections)


def test_user_lightning_module_gets_its_dropout_swapped() -> None:
    cfg = _custom(_USER_LM)
    module = training.build_module(cfg)
    assert type(module) is UserClassifier
    net = module.net
    assert isinstance(net[1], GaussianDropout) and net[1].p == 0.1  # input site
    assert isinstance(net[5], GaussianDropout) and net[5].p == 0.3  # hidden site
    assert not any(type(m) is nn.Dropout for m in module.modules())


def test_user_optimizer_loses_its_weight_decay_but_keeps_its_scheduler() -> None:
    module = training.build_module(_custom(_USER_LM, model={"kwargs": {"weight_decay": 0.25}}))
    assert module._droptune_owns_l2 is True
    result = module.configure_optimizers()
    optimizer = result["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0]
    scheduler = result["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert scheduler.optimizer is optimizer


def test_user_model_kwargs_are_passed() -> None:
    cfg = _custom(_USER_LM, model={"kwargs": {"hidden": 5, "lr": 0.5}})
    module = training.build_module(cfg)
    assert module.net[2].out_features == 5 and module.lr == 0.5


def test_user_lightning_module_trains_with_early_stopping() -> None:
    # min_delta larger than any possible improvement: patience 1 stops after the 2nd epoch.
    cfg = _custom(
        _USER_LM,
        train={"max_epochs": 6},
        regularization={"early_stopping": {"patience": 1, "min_delta": 10.0}},
    )
    result = fit(cfg)
    assert type(result.module) is UserClassifier
    assert result.stopped_early
    assert result.trainer.early_stopping_callback is not None
    assert result.trainer.early_stopping_callback.stopped_epoch == 1
    assert result.epochs == 2
    assert {"train_loss", "val_loss", "val_acc"} <= set(result.metrics)
    # The optimizer the trainer used carries no weight decay; the user's scheduler stepped.
    optimizer = result.trainer.optimizers[0]
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**2)


def test_user_lightning_module_learns() -> None:
    recorder = Recorder()
    fit(_custom(_USER_LM, train={"max_epochs": 3}), test=False, callbacks=[recorder])
    losses = recorder.series("val_loss")
    assert losses[-1] < 0.9 * losses[0], losses


def test_plain_module_trains_through_the_wrapper() -> None:
    cfg = _custom(_USER_NET, train={"max_epochs": 3, "lr": 1e-2})
    module = training.build_module(cfg)
    assert isinstance(module, PlainModuleWrapper)
    assert type(module.net) is UserMLP
    assert isinstance(module.net.body[3], GaussianDropout) and module.net.body[3].p == 0.3
    recorder = Recorder()
    result = fit(cfg, callbacks=[recorder])
    assert isinstance(result.module, PlainModuleWrapper)
    for epoch in recorder.epochs:
        assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(epoch)
    losses = recorder.series("val_loss")
    assert losses[-1] < 0.9 * losses[0], losses
    assert {"test_loss", "test_acc"} <= set(result.metrics)


def test_plain_module_with_mse_loss() -> None:
    cfg = _custom(_USER_NET, model={"kwargs": {"out": 1}, "loss": "mse"}, train={"max_epochs": 1})
    result = fit(cfg, test=False)
    assert "val_loss" in result.metrics and "val_acc" not in result.metrics


def test_user_model_on_user_datamodule() -> None:
    cfg = _custom(
        _USER_LM,
        data={
            "name": "datamodule",
            "datamodule": "tests.user_code.datamodules:BlobsDataModule",
            "kwargs": {"features": 8, "classes": 3, "with_test": True},
        },
        model={"kwargs": {"in_features": 8, "num_classes": 3, "lr": 0.05}},
        train={"max_epochs": 3},
    )
    recorder = Recorder()
    result = fit(cfg, callbacks=[recorder])
    losses = recorder.series("val_loss")
    assert losses[-1] < losses[0], losses
    assert "test_loss" not in result.metrics  # the user's module has no test_step


def test_builtin_family_on_user_datamodule() -> None:
    cfg = config(
        data={
            "name": "datamodule",
            "datamodule": "tests.user_code.datamodules:BlobsDataModule",
            "kwargs": {"features": 6, "classes": 4},
        },
        train={"max_epochs": 3, "lr": 1e-2},
    )
    dm = build_datamodule(cfg)
    assert describe(dm) == DataInfo((6,), "classification", 4)
    module = build_module(cfg, dm)
    assert isinstance(module, RegularizedModule)
    assert module.net[-1].out_features == 4  # type: ignore[index]
    recorder = Recorder()
    result = fit(cfg, callbacks=[recorder])
    assert recorder.series("val_loss")[-1] < recorder.series("val_loss")[0]
    assert "test_loss" not in result.metrics  # no test split


@pytest.mark.parametrize(
    ("target", "kwargs", "match"),
    [
        ("tests.user_code.nowhere:UserClassifier", {}, r"^model\.target: cannot import"),
        ("tests.user_code.models:Missing", {}, r"^model\.target: cannot import"),
        ("tests.user_code.models:NotAModule", {}, r"^model\.target: .*not an nn\.Module"),
        (_USER_LM, {"no_such_arg": 1}, r"^model\.kwargs: .*failed"),
    ],
)
def test_bad_custom_target_names_the_field(
    target: str, kwargs: dict[str, Any], match: str
) -> None:
    cfg = config(model={"family": "custom", "target": target, "kwargs": kwargs})
    with pytest.raises(ConfigError, match=match):
        training.build_module(cfg)


def test_custom_without_an_import_path_is_rejected_at_validation() -> None:
    with pytest.raises(ConfigError, match=r"model\.target: must be an import path"):
        config(model={"family": "custom", "target": "not a path"})


def test_custom_family_keeps_a_lightning_module_a_lightning_module() -> None:
    module = training.build_module(_custom(_USER_LM))
    assert isinstance(module, pl.LightningModule)
    assert not isinstance(module, PlainModuleWrapper)


def test_plain_module_returning_a_mapping_with_logits_trains() -> None:
    cfg = _custom("tests.user_code.models:DictOutputNet", train={"max_epochs": 1})
    module = training.build_module(cfg)
    assert isinstance(module, PlainModuleWrapper)
    x = torch.randn(3, 64)
    assert module(x).shape == (3, 10)
    assert "val_loss" in fit(cfg, test=False).metrics
    module.net.forward = lambda x: (x,)  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="must return a tensor or a mapping with 'logits'"):
        module(x)
