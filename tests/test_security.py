"""Security properties: checkpoints load with ``weights_only=True`` (a tampered checkpoint
cannot run code), and specs are YAML data only (no tag reaches Python)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import droptune
from droptune.config import TrainConfig
from droptune.exceptions import ConfigError
from droptune.exceptions import SpecError
from droptune.study.spec import load_spec
from droptune.training import fit


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_droptune_checkpoints_load_with_weights_only_and_give_the_same_outputs(
    tmp_path: Path,
) -> None:
    cfg = TrainConfig.from_dict(
        {
            "data": {"name": "digits", "train_subset": 128},
            "model": {"family": "mlp", "hidden": [16]},
            "train": {"max_epochs": 1, "accelerator": "cpu"},
            "regularization": {"dropout": {"kind": "standard", "hidden_rate": 0.2}},
        }
    )
    result = fit(cfg, test=False, checkpoint=tmp_path / "model.ckpt")
    loaded = droptune.load_checkpoint(str(tmp_path / "model.ckpt"))
    x = torch.randn(5, 64)
    result.module.eval()
    loaded.eval()  # type: ignore[attr-defined]
    assert torch.equal(result.module(x), loaded(x))  # type: ignore[operator]


def test_a_tampered_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, path)
    with pytest.raises(ConfigError, match=r"evil\.ckpt.*weights_only=True"):
        droptune.load_checkpoint(str(path))
    assert not marker.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        droptune.load_checkpoint(str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/object/new:os.system ['touch {marker}']",
    ],
)
def test_spec_python_tags_are_refused_and_never_run(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "PWNED"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"study: {{name: x}}\nmodel: {tag.format(marker=marker)}\n")
    with pytest.raises(SpecError):
        load_spec(spec)
    assert not marker.exists()
