"""``build_datamodule(config)``: a TrainConfig's data section → a LightningDataModule."""

from __future__ import annotations

from collections.abc import Sequence
import importlib
from pathlib import Path
import sys
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from droptune.data._builtin import load_csv
from droptune.data._builtin import load_digits
from droptune.data._builtin import load_mnist1d
from droptune.data._builtin import make_synthetic
from droptune.data._loader import DataInfo
from droptune.data._loader import TensorDataModule
from droptune.exceptions import ConfigError


if TYPE_CHECKING:
    from droptune.config import DataConfig
    from droptune.config import TrainConfig

__all__ = ["build_datamodule", "describe", "import_object", "resolve_layout"]

_AUTO_LAYOUT = {"mlp": "vector", "rnn": "sequence", "transformer": "sequence", "custom": "vector"}


def import_object(path: str, field: str, roots: Sequence[str | Path] = ()) -> Any:
    """Import ``package.module:Attr``; a failure is a ConfigError naming ``field``.

    The module is found on the process's ``sys.path`` (the installed environment, and
    ``PYTHONPATH``), then in ``roots`` (the spec's or config's own directory). The working
    directory is not searched unless it is one of those: the ``droptune`` console script and
    the workers it starts (``python -P``) never put it on the path, so a module that merely
    lies in the directory a command is run from is never imported."""
    module_name, _, attr = path.partition(":")
    for root in roots:
        # after the environment, so that a file in the spec's folder never shadows an
        # installed package; kept, so that the module's own later imports resolve the same way
        if str(root) not in sys.path:
            sys.path.append(str(root))
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        where = ", ".join(repr(str(r)) for r in roots)
        hint = (
            f" (searched the installed environment{' and ' + where if where else ''}; the "
            "working directory is not searched: install the package, add its folder to "
            "PYTHONPATH or set the spec's code_dir)"
            if isinstance(exc, ModuleNotFoundError)
            else ""
        )
        raise ConfigError(f"{field}: cannot import {path!r}: {exc}{hint}") from None
    return obj


def build_object(
    path: str,
    kwargs: dict[str, Any],
    field: str,
    kwargs_field: str,
    expected: type | tuple[type, ...],
    what: str,
) -> Any:
    """Import ``path`` (a ConfigError names ``field``), check it is a class deriving from
    ``expected`` — before anything is called, so that a config cannot run an arbitrary callable
    such as ``os:system`` — then build it with ``kwargs`` (a failure names ``kwargs_field``)."""
    factory = import_object(path, field)
    if not isinstance(factory, type):
        raise ConfigError(
            f"{field}: {path!r} is a {type(factory).__name__}, not a class; give "
            f"package.module:Class naming {what} (nothing else is called)"
        )
    if not issubclass(factory, expected):
        raise ConfigError(f"{field}: {path!r} is not {what} (it was not built)")
    try:
        obj = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(f"{kwargs_field}: {path}(**kwargs) failed: {exc}") from exc
    if not isinstance(obj, expected):
        raise ConfigError(f"{field}: {path!r} built a {type(obj).__name__}, which is not {what}")
    return obj


def resolve_layout(data: DataConfig, family: str) -> str:
    """The input layout: the configured one, or the one the model family needs."""
    if data.layout != "auto":
        return data.layout
    if family == "cnn":
        return "image" if data.name == "digits" else "signal"
    return _AUTO_LAYOUT[family]


def _shape(x: np.ndarray, layout: str, name: str) -> np.ndarray:
    """Reshape flat (N, F) features to the layout."""
    if layout == "vector":
        return x
    if layout == "signal":
        return x[:, None, :]
    if layout == "sequence":
        if name == "digits":  # 8 rows of 8 pixels: a sequence of 8 steps
            return x.reshape(len(x), 8, 8)
        return x[:, :, None]
    if name == "digits":
        return x.reshape(len(x), 1, 8, 8)
    raise ConfigError(
        f"data.layout: image is only available for digits, not {name!r}; "
        "allowed here: auto, vector, signal, sequence"
    )


def _split(n: int, fractions: tuple[float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffled (train, val, test) index tensors for n samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * fractions[0]), round(n * fractions[1])
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def build_datamodule(config: TrainConfig) -> pl.LightningDataModule:
    """Build the data of ``config``: a :class:`TensorDataModule` for built-in data, the user's
    own ``LightningDataModule`` for ``data.name: datamodule``."""
    data = config.data
    if data.name == "datamodule":
        assert data.datamodule is not None
        return build_object(
            data.datamodule,
            data.kwargs,
            "data.datamodule",
            "data.kwargs",
            pl.LightningDataModule,
            "a pytorch_lightning.LightningDataModule",
        )
    layout = resolve_layout(data, config.model.family)
    num_classes: int | None = 10
    task = "classification"
    test: tuple[np.ndarray, np.ndarray] | None = None
    if data.name == "digits":
        x, y = load_digits()
    elif data.name == "mnist1d":
        (x, y), test = load_mnist1d()
    elif data.name == "synthetic":
        x, y = make_synthetic(
            data.n_samples,
            data.n_features,
            data.n_classes,
            data.label_noise,
            data.teacher_hidden,
            data.seed,
        )
        num_classes = data.n_classes
    else:
        assert data.path is not None and data.target is not None
        x, y, num_classes = load_csv(data.path, data.target, data.task)
        task = data.task
    test_fraction = 0.0 if test is not None else data.test_fraction
    train_idx, val_idx, test_idx = _split(len(x), (data.val_fraction, test_fraction), data.seed)
    if data.train_subset is not None:
        train_idx = train_idx[: data.train_subset]
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    # Standardize with training-split statistics only (never validation or test).
    if data.name == "csv":  # per column: columns have their own units
        mean, std = xt[train_idx].mean(0), xt[train_idx].std(0).clamp(min=1e-8)
        xt = (xt - mean) / std
    elif data.name == "mnist1d":  # one scale: the 40 positions are one signal
        mean, std = xt[train_idx].mean(), xt[train_idx].std()
        xt = (xt - mean) / std
        assert test is not None
        test = (((test[0] - mean.item()) / std.item()).astype(np.float32), test[1])
    xt = torch.from_numpy(np.ascontiguousarray(_shape(xt.numpy(), layout, data.name)))
    splits = {"train": (xt[train_idx], yt[train_idx]), "val": (xt[val_idx], yt[val_idx])}
    if test is not None:
        x_test = torch.from_numpy(np.ascontiguousarray(_shape(test[0], layout, data.name)))
        splits["test"] = (x_test, torch.from_numpy(test[1]))
    elif len(test_idx):
        splits["test"] = (xt[test_idx], yt[test_idx])
    info = DataInfo(tuple(xt.shape[1:]), task, num_classes)
    return TensorDataModule(
        splits, info, data.batch_size, seed=data.seed, on_device=data.on_device
    )


def describe(datamodule: pl.LightningDataModule) -> DataInfo:
    """Input shape, task and class count of any DataModule.

    droptune's own modules carry it; for a user's DataModule it is read from one training batch
    (floating targets mean regression) and ``num_classes`` / ``vocab_size`` attributes where
    present, else the largest label seen over the training set.
    """
    info = getattr(datamodule, "info", None)
    if isinstance(info, DataInfo):
        return info
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    first = next(iter(loader))
    x, y = first[0], first[1]
    regression = bool(torch.is_floating_point(y))
    num_classes = getattr(datamodule, "num_classes", None)
    if not regression and num_classes is None:
        num_classes = int(max(int(batch[1].max()) for batch in loader)) + 1
    return DataInfo(
        tuple(x.shape[1:]),
        "regression" if regression else "classification",
        None if regression or num_classes is None else int(num_classes),
        getattr(datamodule, "vocab_size", None),
    )
