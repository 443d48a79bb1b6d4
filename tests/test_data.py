"""Built-in data: shapes, split sizes, determinism, CSV files, the MNIST-1D cache, the tensor
loader and users' DataModules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import random
from typing import Any

import numpy as np
import pytest
import torch

from droptune.data import DataInfo
from droptune.data import TensorDataModule
from droptune.data import TensorLoader
from droptune.data import build_datamodule
from droptune.data import describe
from droptune.data import load_csv
from droptune.data import load_digits
from droptune.data import load_mnist1d
from droptune.exceptions import ConfigError
from tests.helpers import config
from tests.user_code import BlobsDataModule


def _sizes(dm: Any) -> dict[str, int]:
    assert isinstance(dm, TensorDataModule)
    return dm.sizes()


def _rows(x: torch.Tensor) -> set[bytes]:
    flat = x.reshape(len(x), -1).numpy()
    return {row.tobytes() for row in flat}


def _rng_state() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_same_rng(before: tuple[Any, Any, torch.Tensor]) -> None:
    py, np_state, torch_state = before
    assert random.getstate() == py
    now = np.random.get_state()
    assert now[0] == np_state[0]
    assert np.array_equal(now[1], np_state[1])
    assert now[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


# ----------------------------------------------------------------------------------------------
# digits


@pytest.mark.parametrize(
    ("family", "layout", "shape"),
    [
        ("mlp", "auto", (64,)),
        ("mlp", "vector", (64,)),
        ("cnn", "auto", (1, 8, 8)),
        ("mlp", "image", (1, 8, 8)),
        ("rnn", "auto", (8, 8)),
        ("mlp", "signal", (1, 64)),
    ],
)
def test_digits_layouts_and_split_sizes(family: str, layout: str, shape: tuple[int, ...]) -> None:
    model: dict[str, Any] = {"family": family}
    cfg = config(data={"name": "digits", "layout": layout}, model=model)
    dm = build_datamodule(cfg)
    assert isinstance(dm, TensorDataModule)
    # 1797 samples: 20 % validation, 20 % test (rounded), the rest training.
    assert _sizes(dm) == {"train": 1079, "val": 359, "test": 359}
    assert dm.info == DataInfo(shape, "classification", 10)
    for split, (x, y) in dm.splits.items():
        assert tuple(x.shape[1:]) == shape, split
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) <= set(range(10))


def test_digits_image_is_the_8x8_picture() -> None:
    x, _ = load_digits()
    dm = build_datamodule(config(data={"name": "digits", "layout": "image", "val_fraction": 0.1}))
    vectors = build_datamodule(config(data={"name": "digits", "val_fraction": 0.1}))
    image, vector = dm.splits["train"][0], vectors.splits["train"][0]  # type: ignore[attr-defined]
    assert torch.equal(image.reshape(len(image), 64), vector)
    assert x.shape == (1797, 64)


@pytest.mark.parametrize(("val", "test"), [(0.2, 0.2), (0.1, 0.0), (0.3, 0.1)])
def test_split_fractions(val: float, test: float) -> None:
    dm = build_datamodule(
        config(data={"name": "digits", "val_fraction": val, "test_fraction": test})
    )
    sizes = _sizes(dm)
    assert sizes["val"] == round(1797 * val)
    assert sizes.get("test", 0) == round(1797 * test)
    assert sum(sizes.values()) == 1797
    if test == 0.0:
        assert "test" not in sizes
        assert dm.test_dataloader() == []


@pytest.mark.parametrize("name", ["digits", "synthetic", "mnist1d"])
def test_splits_are_disjoint(name: str) -> None:
    dm = build_datamodule(config(data={"name": name}))
    splits = dm.splits  # type: ignore[attr-defined]
    rows = {split: _rows(x) for split, (x, _) in splits.items()}
    assert set(rows) == {"train", "val", "test"}
    for split, (x, _) in splits.items():
        assert len(rows[split]) == len(x), f"duplicate rows inside {split}"
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]


def test_split_depends_on_data_seed_only() -> None:
    a = build_datamodule(config(data={"seed": 1}))
    b = build_datamodule(config(data={"seed": 1}, train={"seed": 7}))
    c = build_datamodule(config(data={"seed": 2}))
    xa, xb, xc = (m.splits["val"][0] for m in (a, b, c))  # type: ignore[attr-defined]
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


@pytest.mark.parametrize(("subset", "expected"), [(100, 100), (1079, 1079), (5000, 1079)])
def test_train_subset(subset: int, expected: int) -> None:
    full = build_datamodule(config())
    dm = build_datamodule(config(data={"train_subset": subset}))
    assert _sizes(dm) == {"train": expected, "val": 359, "test": 359}
    # The subset is a prefix of the same shuffled training split; val and test are unchanged.
    x_full, x_sub = full.splits["train"][0], dm.splits["train"][0]  # type: ignore[attr-defined]
    assert torch.equal(x_sub, x_full[:expected])
    assert torch.equal(dm.splits["val"][0], full.splits["val"][0])  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# MNIST-1D


@pytest.mark.parametrize(
    ("family", "layout", "shape"),
    [
        ("mlp", "auto", (40,)),
        ("mlp", "vector", (40,)),
        ("cnn", "auto", (1, 40)),
        ("cnn", "signal", (1, 40)),
        ("rnn", "auto", (40, 1)),
        ("transformer", "sequence", (40, 1)),
    ],
)
def test_mnist1d_layouts_and_sizes(family: str, layout: str, shape: tuple[int, ...]) -> None:
    cfg = config(
        data={"name": "mnist1d", "layout": layout, "val_fraction": 0.2}, model={"family": family}
    )
    dm = build_datamodule(cfg)
    # 4000 generated training samples split 3200/800; the 1000 official test samples are kept.
    assert _sizes(dm) == {"train": 3200, "val": 800, "test": 1000}
    assert dm.info == DataInfo(shape, "classification", 10)  # type: ignore[attr-defined]
    for x, y in dm.splits.values():  # type: ignore[attr-defined]
        assert tuple(x.shape[1:]) == shape
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))
    # Standardized (one scalar mean and std): the training inputs are centred, unit scale.
    x_train = dm.splits["train"][0]  # type: ignore[attr-defined]
    assert abs(float(x_train.mean())) < 0.05
    assert abs(float(x_train.std()) - 1.0) < 0.05


def test_mnist1d_test_split_is_the_official_one() -> None:
    (_, _), (x_test, y_test) = load_mnist1d()
    assert x_test.shape == (1000, 40) and y_test.shape == (1000,)
    dm = build_datamodule(config(data={"name": "mnist1d", "test_fraction": 0.3}))
    # test_fraction does not carve a test split out of the training pool: there is one already.
    assert _sizes(dm) == {"train": 3200, "val": 800, "test": 1000}
    assert torch.equal(dm.splits["test"][1], torch.from_numpy(y_test))  # type: ignore[attr-defined]


def test_mnist1d_image_layout_is_a_config_error_naming_the_field() -> None:
    cfg = config(data={"name": "mnist1d", "layout": "image"})
    with pytest.raises(ConfigError, match=r"^data\.layout: image is only available for digits"):
        build_datamodule(cfg)


def test_mnist1d_cache_is_created_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist1d.data

    cache = tmp_path / "cache"
    monkeypatch.setenv("DROPTUNE_CACHE_DIR", str(cache))
    calls = []
    real = mnist1d.data.make_dataset

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    # Generating MNIST-1D reseeds Python's and NumPy's global RNGs: they must come back as
    # they were. The torch RNG must not be touched either.
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = _rng_state()
    (x, y), (x_test, y_test) = load_mnist1d()
    _assert_same_rng(before)
    assert calls == [1]
    files = sorted(p.name for p in cache.iterdir())
    assert files == ["mnist1d-default-v1.npz"]  # no temporary file left behind
    stamp = (cache / files[0]).stat().st_mtime_ns
    assert x.shape == (4000, 40) and x.dtype == np.float32
    assert y.shape == (4000,) and y.dtype == np.int64
    assert x_test.shape == (1000, 40) and y_test.shape == (1000,)

    (x2, y2), (xt2, yt2) = load_mnist1d()
    assert calls == [1], "the cached file must be reused"
    assert (cache / files[0]).stat().st_mtime_ns == stamp
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(x_test, xt2) and np.array_equal(y_test, yt2)
    _assert_same_rng(before)


# ----------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_sizes_are_configurable() -> None:
    cfg = config(
        data={
            "name": "synthetic",
            "n_samples": 300,
            "n_features": 7,
            "n_classes": 3,
            "val_fraction": 0.2,
            "test_fraction": 0.1,
        }
    )
    dm = build_datamodule(cfg)
    assert _sizes(dm) == {"train": 210, "val": 60, "test": 30}
    assert dm.info == DataInfo((7,), "classification", 3)  # type: ignore[attr-defined]
    labels = torch.cat([y for _, y in dm.splits.values()])  # type: ignore[attr-defined]
    assert set(labels.tolist()) == {0, 1, 2}


def test_synthetic_is_deterministic_per_seed() -> None:
    def data(seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = config(
            data={"name": "synthetic", "n_samples": 200, "seed": seed, "label_noise": noise}
        )
        x, y = build_datamodule(cfg).splits["train"]  # type: ignore[attr-defined]
        return x, y

    a, b, c = data(0), data(0), data(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # Label noise changes labels, not inputs.
    clean = data(0, noise=0.0)
    assert torch.equal(clean[0], a[0])
    assert not torch.equal(clean[1], a[1])


# ----------------------------------------------------------------------------------------------
# CSV


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n")
    return path


def test_csv_classification_with_string_labels(tmp_path: Path) -> None:
    names = ["dog", "cat", "bird"]
    rows = [[i, i % 7 * 0.5, names[i % 3], -i] for i in range(60)]
    path = _write_csv(tmp_path / "animals.csv", ["a", "b", "kind", "c"], rows)

    x, y, k = load_csv(str(path), "kind", "classification")
    assert k == 3
    assert x.shape == (60, 3) and x.dtype == np.float32
    # Labels are numbered in sorted order: bird 0, cat 1, dog 2; the target column is dropped.
    expected = [{"bird": 0, "cat": 1, "dog": 2}[names[i % 3]] for i in range(60)]
    assert y.tolist() == expected
    assert x[:, 0].tolist() == [float(i) for i in range(60)]
    assert x[:, 2].tolist() == [float(-i) for i in range(60)]

    dm = build_datamodule(
        config(data={"name": "csv", "path": str(path), "target": "kind", "test_fraction": 0.0})
    )
    assert dm.info == DataInfo((3,), "classification", 3)  # type: ignore[attr-defined]
    assert _sizes(dm) == {"train": 48, "val": 12}
    # Features are standardized with the training split's statistics.
    x_train = dm.splits["train"][0]  # type: ignore[attr-defined]
    assert torch.allclose(x_train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x_train.std(0), torch.ones(3), atol=1e-5)


def test_csv_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [[i, label] for i, label in enumerate([10, 2, 2, 10, 1, 1])]
    path = _write_csv(tmp_path / "n.csv", ["x", "y"], rows)
    _, y, k = load_csv(str(path), "y", "classification")
    assert k == 3
    assert y.tolist() == [2, 1, 1, 2, 0, 0]


def test_csv_regression(tmp_path: Path) -> None:
    rows = [[i, 2 * i, 0.5 * i + 1] for i in range(50)]
    path = _write_csv(tmp_path / "r.csv", ["x1", "x2", "target"], rows)
    x, y, k = load_csv(str(path), "target", "regression")
    assert k is None and y.dtype == np.float32
    assert x.shape == (50, 2)
    assert y.tolist() == [0.5 * i + 1 for i in range(50)]
    dm = build_datamodule(
        config(data={"name": "csv", "path": str(path), "target": "target", "task": "regression"})
    )
    assert dm.info == DataInfo((2,), "regression", None)  # type: ignore[attr-defined]
    assert _sizes(dm) == {"train": 30, "val": 10, "test": 10}
    assert dm.splits["train"][1].dtype == torch.float32  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "target", "task", "match"),
    [
        ("a,b\n1,2\n3,4\n", "nope", "classification", r"^data\.target: column 'nope' not in"),
        ("a,b\n1,x\n3,4\n", "a", "classification", r"^data\.path: column 'b' .* not numeric"),
        ("a,b\n1,2\n3\n", "a", "classification", r"^data\.path: .* line 3 has 1 fields"),
        ("a,b\n", "a", "classification", r"^data\.path: .* needs a header row"),
        ("a,b\n1,cat\n2,dog\n", "b", "regression", r"^data\.target: .* must be numeric"),
    ],
)
def test_csv_errors_name_the_field(
    tmp_path: Path, text: str, target: str, task: str, match: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_csv(str(path), target, task)


def test_csv_missing_file(tmp_path: Path) -> None:
    cfg = config(data={"name": "csv", "path": str(tmp_path / "missing.csv"), "target": "y"})
    with pytest.raises(ConfigError, match=r"^data\.path: file .* does not exist"):
        build_datamodule(cfg)


# ----------------------------------------------------------------------------------------------
# the caller's random state


@pytest.mark.parametrize("name", ["digits", "synthetic", "mnist1d"])
def test_build_datamodule_leaves_global_rng_alone(name: str) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = _rng_state()
    dm = build_datamodule(config(data={"name": name, "train_subset": 50}))
    for _ in dm.train_dataloader():
        pass
    _assert_same_rng(before)


# ----------------------------------------------------------------------------------------------
# TensorLoader


def _epoch(loader: TensorLoader) -> list[torch.Tensor]:
    return [x.clone() for x, _ in loader]


def test_tensor_loader_batches_in_order_without_shuffle() -> None:
    x, y = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    loader = TensorLoader(x, y, batch_size=32)
    batches = list(loader)
    assert len(loader) == 4
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in batches)
    assert torch.equal(torch.cat([b[1] for b in loader]), y)  # every epoch the same


@pytest.mark.parametrize(("n", "batch_size"), [(100, 32), (64, 64), (10, 3), (5, 8)])
def test_tensor_loader_shuffled_epoch_covers_each_sample_once(n: int, batch_size: int) -> None:
    x, y = torch.arange(n).float().unsqueeze(1), torch.arange(n)
    loader = TensorLoader(x, y, batch_size, shuffle=True, seed=3)
    assert len(loader) == -(-n // batch_size)
    for _ in range(3):
        batches = list(loader)
        sizes = [len(b[1]) for b in batches]
        assert sizes == [batch_size] * (n // batch_size) + (
            [n % batch_size] if n % batch_size else []
        )
        seen = torch.cat([b[1] for b in batches])
        assert sorted(seen.tolist()) == list(range(n))
        # x and y stay paired.
        assert torch.equal(torch.cat([b[0] for b in batches]).squeeze(1).long(), seen)


def test_tensor_loader_shuffle_differs_between_epochs_and_is_reproducible() -> None:
    x, y = torch.randn(50, 2), torch.arange(50)

    def epochs(seed: int) -> list[list[int]]:
        loader = TensorLoader(x, y, 10, shuffle=True, seed=seed)
        return [torch.cat([b for _, b in loader]).tolist() for _ in range(3)]

    first = epochs(0)
    assert first[0] != first[1] != first[2] and first[0] != first[2]
    assert first != [list(range(50))] * 3
    assert epochs(0) == first  # reproducible from the seed
    assert epochs(1) != first
    # Shuffling leaves the global torch RNG alone.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    epochs(0)
    assert torch.equal(torch.get_rng_state(), state)


def test_tensor_loader_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        TensorLoader(torch.zeros(3, 1), torch.zeros(4), 2)


def test_datamodule_loaders_shuffle_only_training() -> None:
    dm = build_datamodule(config(data={"batch_size": 100}))
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train, TensorLoader) and isinstance(val, TensorLoader)
    assert train.shuffle and not val.shuffle
    assert train.batch_size == val.batch_size == 100
    assert len(train) == 11  # 1079 samples
    assert torch.equal(torch.cat([y for _, y in val]), dm.splits["val"][1])  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# users' DataModules


@pytest.fixture
def restore_rng() -> Iterator[None]:
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.mark.usefixtures("restore_rng")
def test_user_datamodule_by_import_path() -> None:
    cfg = config(
        data={
            "name": "datamodule",
            "datamodule": "tests.user_code.datamodules:BlobsDataModule",
            "kwargs": {"n": 120, "features": 5, "classes": 4, "batch_size": 16},
        }
    )
    dm = build_datamodule(cfg)
    assert isinstance(dm, BlobsDataModule)
    assert (dm.n, dm.features, dm.classes, dm.batch_size) == (120, 5, 4, 16)
    assert describe(dm) == DataInfo((5,), "classification", 4)


@pytest.mark.usefixtures("restore_rng")
@pytest.mark.parametrize(
    ("kwargs", "info"),
    [
        ({"features": 6, "classes": 3}, DataInfo((6,), "classification", 3)),
        (
            {"features": 6, "classes": 3, "declare_classes": True},
            DataInfo((6,), "classification", 3),
        ),
        ({"features": 2, "regression": True}, DataInfo((2,), "regression", None)),
    ],
)
def test_describe_infers_user_datamodule(kwargs: dict[str, Any], info: DataInfo) -> None:
    assert describe(BlobsDataModule(**kwargs)) == info


def test_describe_prefers_declared_num_classes() -> None:
    dm = BlobsDataModule(classes=3)
    dm.num_classes = 7  # e.g. classes that the training split happens to lack
    assert describe(dm).num_classes == 7


@pytest.mark.parametrize(
    ("datamodule", "kwargs", "match"),
    [
        ("tests.user_code.missing:Blobs", {}, r"^data\.datamodule: cannot import"),
        ("tests.user_code.datamodules:Missing", {}, r"^data\.datamodule: cannot import"),
        ("tests.user_code.models:UserMLP", {}, r"^data\.datamodule: .* is not a .*DataModule"),
        ("tests.user_code.datamodules:BlobsDataModule", {"bogus": 1}, r"^data\.kwargs: "),
    ],
)
def test_bad_user_datamodule_names_the_field(
    datamodule: str, kwargs: dict[str, Any], match: str
) -> None:
    cfg = config(data={"name": "datamodule", "datamodule": datamodule, "kwargs": kwargs})
    with pytest.raises(ConfigError, match=match):
        build_datamodule(cfg)
