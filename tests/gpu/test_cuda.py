"""On a CUDA device (skipped elsewhere): population training gives the CPU's results, the fused
optimizer path is the element-wise one, bf16 and TF32 train, and ``droptune run --population``
works end to end. Run on a GPU machine with ``pytest tests/gpu``."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys
from typing import Any

import optuna
import pytest
import torch
import yaml

from droptune.config import TrainConfig
from droptune.population import train_population
from droptune.population._optim import StackedOptimizer
from tests.population._helpers import members


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[2]


def _cuda(configs: list[TrainConfig], **train: object) -> list[TrainConfig]:
    return [
        c.with_overrides(
            {"train.accelerator": "cuda", **{f"train.{k}": v for k, v in train.items()}}
        )
        for c in configs
    ]


def test_population_on_cuda_matches_the_cpu_without_dropout() -> None:
    """No dropout, full-precision matrix products: the same members trained on CPU and CUDA
    (the CUDA run through the fused Adam kernel) end within float32 rounding of each other."""
    configs = members(range(4), train={"max_epochs": 3}, regularization={"l2": {"strength": 1e-3}})
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        cpu = train_population(configs, device="cpu")
        gpu = train_population(_cuda(configs), device="cuda")
    finally:
        torch.set_float32_matmul_precision(previous)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.epochs == b.epochs == 3
        for key in ("train_loss", "val_loss", "val_acc"):
            assert b.metrics[key] == pytest.approx(a.metrics[key], rel=2e-3, abs=2e-3), key


@pytest.mark.parametrize("decoupled", [0.0, 0.05])
def test_fused_kernel_on_cuda_follows_the_elementwise_update(decoupled: float) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 64, 32), (16, 64)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    finals = []
    for fused in (True, False):
        params = [p.cuda().requires_grad_() for p in start]
        hyper = torch.full((16,), 1e-2, dtype=torch.float64, device="cuda")
        opt = StackedOptimizer(
            params,
            [True, False],
            kind="adam",
            lr=hyper,
            momentum=torch.zeros_like(hyper),
            decoupled=torch.full_like(hyper, decoupled),
            coupled=torch.zeros_like(hyper),
            fused=fused,
        )
        assert opt._fusable(torch.float32) == fused
        for step in grads:
            for param, grad in zip(params, step, strict=True):
                param.grad = grad.cuda()
            opt.step()
        finals.append([p.detach().cpu() for p in params])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("precision", "matmul"), [("bf16-mixed", None), ("32-true", "high")])
def test_reduced_precision_populations_learn(precision: str, matmul: str | None) -> None:
    configs = _cuda(
        members(
            range(8), train={"max_epochs": 4}, regularization={"dropout": {"hidden_rate": 0.2}}
        ),
        precision=precision,
        matmul_precision=matmul,
    )
    previous = torch.get_float32_matmul_precision()
    try:
        results = train_population(configs, init="fast")
    finally:
        torch.set_float32_matmul_precision(previous)
    accuracies = [r.metrics["val_acc"] for r in results]
    assert min(accuracies) > 0.8, accuracies  # digits: 10 classes, chance is 0.1


def test_cli_population_run_on_cuda(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'gpu.db'}"
    spec: dict[str, Any] = {
        "study": {"name": "gpu", "metric": "val_acc", "direction": "maximize", "seed": 0},
        "data": {"name": "digits", "batch_size": 64},
        "model": {"family": "mlp", "hidden": [64]},
        "train": {"max_epochs": 3, "accelerator": "gpu", "matmul_precision": "high"},
        "regularization": {"dropout": {"kind": "standard", "hidden_rate": 0.2}},
        "search": {"regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "storage": storage,
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "execution": {"population_init": "fast"},
        "n_trials": 16,
    }
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "droptune.cli",
        "run",
        str(path),
        "--population",
        "8",
        "--per-device",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="gpu", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 16, states
    assert all(t.user_attrs["droptune.population"] == 8 for t in study.trials)
    assert {t.user_attrs["droptune.device"] for t in study.trials} <= {"0"}
    assert min(float(t.value or 0.0) for t in study.trials) > 0.8


def test_apply_traces_a_cuda_model_and_leaves_its_random_state_alone() -> None:
    """apply's trace runs a CUDA model in training mode: the CUDA generator is forked, the
    BatchNorm statistics restored, the probability check runs on the device."""
    from torch import nn

    import droptune

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4), nn.Dropout(0.1),
    ).cuda()  # fmt: skip
    x = torch.randn(4, 3, 8, 8, device="cuda")
    model.eval()
    with torch.no_grad():
        before = model(x)
    stats = model[1].running_mean.clone()
    cuda_rng = torch.cuda.get_rng_state()
    _, report = droptune.apply(
        model,
        {"dropout": {"kind": "spatial", "conv_rate": 0.2, "hidden_rate": 0.3}},
        example_input=x,
    )
    assert report.sites() == {"3": "conv", "6": "hidden"}
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert torch.equal(model[1].running_mean, stats)
    with torch.no_grad():
        assert torch.equal(model(x), before)
        model.train()
        assert not torch.equal(model(x), model(x))
