"""``droptune train CONFIG``: outputs, overrides, exit codes and every shipped study spec."""

from __future__ import annotations

import json
import math
from pathlib import Path
import subprocess
import sys
from typing import Any

import pytest
import torch
import yaml

from droptune.cli import _load_train_config
from droptune.cli import main
from droptune.config import TrainConfig
from droptune.config import load_config
from droptune.models import RegularizedModule
import droptune.training
from droptune.training import FitResult
from tests.helpers import BASE
from tests.helpers import merge


ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
DIGITS = ROOT / "studies" / "digits-mlp.yaml"


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _printed(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


@pytest.fixture
def captured_fit(monkeypatch: pytest.MonkeyPatch) -> list[FitResult]:
    """Runs of droptune.training.fit made by the CLI, with their in-memory results."""
    results: list[FitResult] = []
    real = droptune.training.fit

    def spy(*args: Any, **kwargs: Any) -> FitResult:
        result = real(*args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(droptune.training, "fit", spy)
    return results


def test_train_writes_config_checkpoint_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], captured_fit: list[FitResult]
) -> None:
    out = tmp_path / "run"
    assert main(["train", str(DIGITS), "--max-epochs", "2", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out

    # config.yaml: the resolved config (spec sections dropped, overrides applied), loadable.
    expected = _load_train_config(DIGITS).with_overrides({"train.max_epochs": 2})
    assert load_config(out / "config.yaml") == expected
    assert expected.train.max_epochs == 2 and expected.data.train_subset == 400

    # metrics.json holds every final metric; stdout prints the val_/test_/best_ ones.
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_loss", "val_acc", "test_loss", "test_acc", "best_val_loss", "train_loss"} <= set(
        metrics
    )
    assert all(math.isfinite(v) for v in metrics.values())
    printed = _printed(stdout)
    shown = {k: v for k, v in metrics.items() if k.startswith(("val_", "test_", "best_"))}
    assert {k: printed[k] for k in shown} == {k: f"{v:.6g}" for k, v in shown.items()}
    assert "train_loss" not in printed and "lr" not in printed
    assert printed["epochs"] == "2"
    assert printed["output"] == str(out)

    # model.ckpt rebuilds itself from its saved hyperparameters, with identical outputs.
    assert len(captured_fit) == 1
    result = captured_fit[0]
    loaded = RegularizedModule.load_from_checkpoint(out / "model.ckpt")
    assert loaded.cfg == expected
    assert loaded.hparams["config"] == expected.to_dict()
    x = result.trainer.datamodule.splits["test"][0]  # type: ignore[attr-defined]
    trained = result.module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    assert metrics["val_loss"] == result.metrics["val_loss"]


def test_checkpoint_with_dropconnect_and_max_norm_rebuilds(
    tmp_path: Path, captured_fit: list[FitResult]
) -> None:
    cfg = merge(
        BASE,
        {
            "model": {"hidden": [16, 16], "norm": "batch"},
            "regularization": {
                "dropout": {"kind": "gaussian", "hidden_rate": 0.3, "weight_rate": 0.2},
                "max_norm": 2.0,
            },
            "data": {"train_subset": 200},
        },
    )
    out = tmp_path / "run"
    assert main(["train", str(_write(tmp_path / "c.yaml", cfg)), "--output", str(out)]) == 0
    loaded = RegularizedModule.load_from_checkpoint(out / "model.ckpt").eval()
    trained = captured_fit[0].module.eval()
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    x = captured_fit[0].trainer.datamodule.splits["val"][0]  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_devices_cpu_seed_and_default_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", str(DIGITS), "--max-epochs", "1", "--devices", "cpu"]
    assert main([*args, "--seed", "7"]) == 0
    runs = list((tmp_path / "runs").glob("train-*"))
    assert len(runs) == 1  # the default output directory: runs/train-<time>
    assert {p.name for p in runs[0].iterdir()} == {"config.yaml", "model.ckpt", "metrics.json"}
    cfg = load_config(runs[0] / "config.yaml")
    assert (cfg.train.accelerator, cfg.train.devices, cfg.train.seed) == ("cpu", 1, 7)
    assert cfg.train.max_epochs == 1

    def metrics(seed: int, name: str) -> dict[str, float]:
        out = tmp_path / name
        assert main([*args, "--seed", str(seed), "--output", str(out)]) == 0
        values = json.loads((out / "metrics.json").read_text())
        values.pop("epoch_time")
        return dict(values)

    first = json.loads((runs[0] / "metrics.json").read_text())
    first.pop("epoch_time")
    assert metrics(7, "again") == first  # same seed, same numbers
    assert metrics(8, "other")["val_loss"] != first["val_loss"]
    capsys.readouterr()


def test_devices_auto(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", str(DIGITS), "--max-epochs", "1", "--devices", "auto", "--output", str(out)]
    assert main(args) == 0
    cfg = load_config(out / "config.yaml")
    assert (cfg.train.accelerator, cfg.train.devices) == ("auto", "auto")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "gpu"], "--devices"),
        (["--devices", "0,x"], "--devices"),
        (["--devices", ","], "--devices"),
        (["--max-epochs", "0"], "--max-epochs"),
        (["--max-epochs", "two"], "--max-epochs"),
        (["--seed", "1.5"], "--seed"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert main(["train", str(DIGITS), *args, "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and str(missing) in err
    assert not (tmp_path / "run").exists()


def test_missing_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "Missing argument" in capsys.readouterr().err


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"model": {"hidden": [0]}}, "model.hidden[0]: must be >= 1, got 0"),
    (
        {"regularization": {"dropout": {"input_rate": 1.5}}},
        "regularization.dropout.input_rate: must be < 1.0, got 1.5",
    ),
    ({"regularization": {"dropout": {"kind": "bogus"}}}, "regularization.dropout.kind: must be"),
    ({"regularization": {"max_norm": 0}}, "regularization.max_norm: must be > 0"),
    ({"regularization": {"l2": {"strength": -1.0}}}, "regularization.l2.strength: must be >= 0"),
    (
        {"regularization": {"early_stopping": {"patience": 0}}},
        "regularization.early_stopping.patience: must be >= 1, got 0",
    ),
    ({"data": {"val_fraction": 0}}, "data.val_fraction: must be > 0"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "data.val_fraction: val_fraction +"),
    ({"data": {"batch_size": 0}}, "data.batch_size: must be >= 1, got 0"),
    ({"data": {"name": "csv"}}, "data.path: data.name csv needs data.path"),
    ({"data": {"name": "datamodule"}}, "data.datamodule: must be an import path"),
    ({"data": {"name": "imagenet"}}, "data.name: "),
    ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: "),
    ({"train": {"lr": -1}}, "train.lr: must be > 0"),
    ({"train": {"max_epochs": "ten"}}, "train.max_epochs: "),
    ({"model": {"foo": 1}}, "model.foo: unknown key"),
    ({"model": {"channels": [3]}}, "model.channels: only used when model.family is cnn"),
    ({"model": {"family": "custom", "hidden": None}}, "model.target: must be an import path"),
    (
        {"model": {"family": "transformer", "hidden": None, "d_model": 10, "heads": 4}},
        "model.d_model: must be divisible by model.heads (4), got 10",
    ),
    ({"bogus": {}}, "bogus: unknown key"),
]


def _bad(extra: dict[str, Any]) -> dict[str, Any]:
    data = merge(BASE, extra)
    if data["model"].get("hidden", []) is None:  # switching family: drop BASE's mlp widths
        del data["model"]["hidden"]
    return data


@pytest.mark.parametrize(("extra", "message"), BAD_CONFIGS)
def test_bad_config_is_rejected_by_from_dict(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(droptune.ConfigError) as info:
        TrainConfig.from_dict(_bad(extra))
    assert message in str(info.value)


@pytest.mark.parametrize(("extra", "message"), BAD_CONFIGS)
def test_bad_config_exits_2_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path / "bad.yaml", _bad(extra))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.startswith("error: ")
    assert not (out / "model.ckpt").exists()
    assert not out.exists()  # rejected before anything was written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"data": {"name": "mnist1d", "layout": "image"}}, "data.layout: image is only available"),
        ({"data": {"name": "csv", "path": "/no/such.csv", "target": "y"}}, "data.path: file"),
        (
            {"model": {"family": "custom", "hidden": None, "target": "tests.user_code.no:Model"}},
            "model.target: cannot import",
        ),
        (
            {"data": {"name": "datamodule", "datamodule": "tests.user_code.no:Data"}},
            "data.datamodule: cannot import",
        ),
    ],
)
def test_config_errors_found_while_building_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path / "bad.yaml", _bad(extra))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "model.ckpt").exists()
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)
def test_unreadable_yaml_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_runtime_failure_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> FitResult:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(droptune.training, "fit", broken)
    assert main(["train", str(DIGITS), "--output", str(tmp_path / "run")]) == 1
    assert "error: RuntimeError: out of memory" in capsys.readouterr().err


def test_every_study_spec_trains_one_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(STUDIES) >= 5
    for spec in STUDIES:
        out = tmp_path / spec.stem
        assert main(["train", str(spec), "--max-epochs", "1", "--output", str(out)]) == 0, spec
        metrics = json.loads((out / "metrics.json").read_text())
        assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["test_loss"]), spec
        cfg = load_config(out / "config.yaml")
        assert cfg == _load_train_config(spec).with_overrides({"train.max_epochs": 1})
        assert (out / "model.ckpt").is_file()
        printed = _printed(capsys.readouterr().out)
        assert printed["epochs"] == "1", spec
        assert {"val_loss", "test_loss"} <= set(printed)


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("droptune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "droptune.cli"]


def test_console_script_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    bad = _write(tmp_path / "bad.yaml", _bad({"model": {"hidden": [0]}}))
    done = subprocess.run(
        [*_console_script(), "train", str(DIGITS), "--max-epochs", "1", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    printed = _printed(done.stdout)
    assert {"val_loss", "val_acc", "test_loss", "test_acc", "best_val_loss"} <= set(printed)
    assert {p.name for p in out.iterdir()} == {"config.yaml", "model.ckpt", "metrics.json"}

    failed = subprocess.run(
        [*_console_script(), "train", str(bad), "--output", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert failed.returncode == 2
    assert "model.hidden[0]: must be >= 1, got 0" in failed.stderr
    assert failed.stdout == ""
    assert not (tmp_path / "bad").exists()
