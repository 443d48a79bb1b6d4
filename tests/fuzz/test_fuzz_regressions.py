"""Crashes the fuzzing found outside the spec loader (the command line, the config builders):
each fixed, kept with its minimal input."""

from __future__ import annotations

from pathlib import Path

import pytest

from droptune.config import load_config
from droptune.exceptions import ConfigError
from droptune.training import build_datamodule
from droptune.training import build_module
from tests.fuzz.fuzzing import _check_cli
from tests.fuzz.fuzzing import _cli
from tests.fuzz.fuzzing import _cli_sandbox


# ----------------------------------------------------------------------------------------------
# Crashes the fuzzing found outside the spec loader (each fixed; kept as regressions).


@pytest.mark.parametrize(
    "value",
    ["x=[unclosed", "x=!!python/name:os.system", "x=" + "1" * 5000],
    ids=["yaml-error", "python-tag", "5000-digit-int"],
)
def test_worker_set_value_that_is_not_yaml_exits_2(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with _cli_sandbox() as tmp:
        argv = ["worker", "valid.yaml", "--storage", f"sqlite:///{tmp / 'f.db'}", "--set", value]
        code, out, err = _cli(argv, capsys)
        _check_cli(argv, code, out, err, tmp)


def test_run_with_bad_devices_creates_no_study(capsys: pytest.CaptureFixture[str]) -> None:
    with _cli_sandbox() as tmp:
        argv = ["run", "valid.yaml", "--storage", f"sqlite:///{tmp / 'f.db'}", "--devices", "xyz"]
        code, out, err = _cli(argv, capsys)
        assert code == 2, err
        _check_cli(argv, code, out, err, tmp)


@pytest.mark.parametrize(
    ("section", "field"), [("data", "datamodule"), ("model", "target")], ids=["data", "model"]
)
def test_config_import_path_to_other_callable_is_never_called(
    section: str, field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "datamodule" if section == "data" else "custom"
    key = "name" if section == "data" else "family"
    config = {section: {key: name, field: "os:mkdir", "kwargs": {"path": "PWNED"}}}
    if section == "model":
        config["data"] = {"name": "synthetic", "n_samples": 50}
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        cfg = load_config(config)
        build_module(cfg, build_datamodule(cfg))
    assert not (tmp_path / "PWNED").exists()
