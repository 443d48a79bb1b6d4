"""Built-in datasets: scikit-learn digits, MNIST-1D (generated offline), a synthetic teacher task,
and a user's CSV file. Each loader returns float32/int64 numpy arrays; nothing is downloaded.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
import random

import numpy as np
import torch

from droptune.exceptions import ConfigError


__all__ = ["cache_dir", "load_csv", "load_digits", "load_mnist1d", "make_synthetic"]

Arrays = tuple[np.ndarray, np.ndarray]


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$DROPTUNE_CACHE_DIR`` or ``~/.cache/droptune``."""
    root = os.environ.get("DROPTUNE_CACHE_DIR") or Path.home() / ".cache" / "droptune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_digits() -> Arrays:
    """scikit-learn's 8x8 digits: x (1797, 64) in [0, 1], y (1797,) in 0..9."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def load_mnist1d() -> tuple[Arrays, Arrays]:
    """MNIST-1D (Greydanus & Kobak): ((x 4000×40, y), (x_test 1000×40, y_test)).

    Generated offline with ``mnist1d.data.make_dataset`` and cached as ``.npz``. ``make_dataset``
    reseeds Python's ``random`` and NumPy's global RNG; both are restored afterwards, so the
    caller's random state is untouched. (``mnist1d.get_dataset`` would try a download first.)
    """
    path = cache_dir() / "mnist1d-default-v1.npz"
    if not path.exists():
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            from mnist1d.data import get_dataset_args
            from mnist1d.data import make_dataset

            data = make_dataset(get_dataset_args())
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
        os.replace(tmp, path)  # atomic: concurrent workers never read a half-written file
    with np.load(path) as arrays:
        train = (arrays["x"].astype(np.float32), arrays["y"].astype(np.int64))
        test = (arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64))
    return train, test


def make_synthetic(
    n_samples: int,
    n_features: int,
    n_classes: int,
    label_noise: float,
    teacher_hidden: int,
    seed: int,
) -> Arrays:
    """A teacher-network classification task: x ~ N(0, I), y = argmax(teacher(x)), then a
    fraction ``label_noise`` of labels replaced by uniformly random classes.

    Deterministic in ``seed``; uses its own generator (the global RNG is untouched).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=gen)
    w1 = torch.randn(n_features, teacher_hidden, generator=gen) / n_features**0.5
    w2 = torch.randn(teacher_hidden, n_classes, generator=gen) / teacher_hidden**0.5
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    noisy = torch.rand(n_samples, generator=gen) < label_noise
    y[noisy] = torch.randint(0, n_classes, (int(noisy.sum()),), generator=gen)
    return x.numpy().astype(np.float32), y.numpy().astype(np.int64)


def load_csv(path: str, target: str, task: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A CSV file with a header row: every column but ``target`` is a numeric feature.

    Returns ``(x, y, num_classes)``; for classification the target values (numbers or strings)
    are mapped to 0..K-1 in sorted order, for regression they must be numeric.
    """
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"data.path: file {path!r} does not exist")
    if not file.is_file():
        raise ConfigError(f"data.path: {path!r} is not a file (a CSV file with a header row)")
    with file.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise ConfigError(f"data.path: {path!r} needs a header row and at least one data row")
    header, body = rows[0], [r for r in rows[1:] if r]
    if target not in header:
        raise ConfigError(
            f"data.target: column {target!r} not in {path!r}; columns: {', '.join(header)}"
        )
    t = header.index(target)
    features = [i for i in range(len(header)) if i != t]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise ConfigError(
                f"data.path: {path!r} line {r + 2} has {len(row)} fields, expected {len(header)}"
            )
        for c, i in enumerate(features):
            try:
                x[r, c] = value = float(row[i])
            except ValueError:
                raise ConfigError(
                    f"data.path: column {header[i]!r} of {path!r} is not numeric "
                    f"(line {r + 2}: {row[i]!r})"
                ) from None
            if not math.isfinite(value):
                raise ConfigError(
                    f"data.path: column {header[i]!r} of {path!r} holds {row[i]!r} at line "
                    f"{r + 2}; every value must be a finite number (fill or drop missing ones)"
                )
    labels = [row[t] for row in body]
    empty = next((r for r, v in enumerate(labels) if not v.strip()), None)
    if empty is not None:
        raise ConfigError(f"data.target: column {target!r} is empty at line {empty + 2}")
    if task == "regression":
        try:
            y = np.array([float(v) for v in labels], dtype=np.float32)
        except ValueError:
            raise ConfigError(
                f"data.target: column {target!r} must be numeric for regression"
            ) from None
        if not np.isfinite(y).all():
            line = int(np.flatnonzero(~np.isfinite(y))[0]) + 2
            raise ConfigError(
                f"data.target: column {target!r} holds a non-finite value at line {line}"
            )
        return x, y, None
    classes = sorted(set(labels), key=_label_key)
    index = {label: k for k, label in enumerate(classes)}
    return x, np.array([index[v] for v in labels], dtype=np.int64), len(classes)


def _label_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
