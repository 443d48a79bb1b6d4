"""Trials per minute: naive Optuna + Lightning against droptune's process, packed and population
modes, on one workload, in one run (so machine load hits every mode alike).

Modes:
  (a) naive   — the yardstick, written here: an Optuna study (in-memory) whose objective builds
                a plain ``pytorch_lightning.Trainer`` and an MLP ``LightningModule`` and fits it
                over a ``DataLoader`` of CPU tensors (what a tutorial does);
  (b) run-1   — ``droptune run`` with 1 worker (SQLite storage, MLflow tracking on);
  (c) packed  — ``droptune run`` with K workers (``--per-device K`` on a GPU, ``--workers K``
                on the CPU), same storage and tracking;
  (d) pop-P   — ``droptune run --population P`` with 1 worker, for each P given, and with W
                workers per device (``--pop-workers 1,W``: W processes share the GPU, so one
                worker's bookkeeping overlaps another's training).
Every droptune mode is timed from the command's start to its end (process start, imports,
storage and tracking included). The table shows trials/min, the ratio to (a) and the
distribution of the best validation accuracy per mode (quality must not drop); on a GPU, the
mean GPU utilisation sampled by ``nvidia-smi`` while the mode ran.

On a GPU every mode (the naive baseline too) runs with ``train.matmul_precision: high`` (TF32
matrix products) and the population modes with ``execution.population_init: fast``.

Workloads: ``--scale reference`` is the issue's study (synthetic teacher task 50,000 x 784,
10 classes, MLP 784-1024-1024-10, input + hidden dropout, AdamW decay, 5 epochs, batch 256; for
a GPU); ``--scale cpu`` (default) shrinks it to finish in a few minutes on two cores;
``--scale tiny`` trains next to nothing, so what it measures is droptune's per-trial bookkeeping
(with ``--pruner median``, pruning's too): a CPU proxy for the population modes on a GPU.

Run: python bench/throughput.py [--scale cpu|tiny|reference] [--populations 8,32] [--packed 2]
     [--pop-workers 1] [--pruner none|median] [--trials N] [--device cpu|gpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import yaml

from droptune.timing import CATEGORIES
from droptune.timing import summarize


SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        # Small model, many small steps: per-trial and per-step overhead dominate, as in the
        # reference study on a GPU.
        "data": {"n_samples": 20000, "n_features": 64, "n_classes": 10, "teacher_hidden": 64},
        "hidden": [64, 64],
        "max_epochs": 3,
        "batch_size": 64,
        "trials": {"naive": 6, "run": 8, "packed": 8, "population": 96},
    },
    "tiny": {
        # Training next to nothing: what is left is droptune's per-trial bookkeeping (asks,
        # tells, reports, pruning, tracking), the part a GPU does not speed up. A CPU proxy for
        # the population modes on a GPU.
        "data": {"n_samples": 2000, "n_features": 16, "n_classes": 4, "teacher_hidden": 16},
        "hidden": [16],
        "max_epochs": 3,
        "batch_size": 512,
        "trials": {"naive": 6, "run": 8, "packed": 8, "population": 256},
    },
    "reference": {
        "data": {"n_samples": 62500, "n_features": 784, "n_classes": 10, "teacher_hidden": 256},
        "hidden": [1024, 1024],
        "max_epochs": 5,
        "batch_size": 256,
        "trials": {"naive": 6, "run": 8, "packed": 24, "population": 512},
    },
}


def make_spec(
    scale: str,
    name: str,
    n_trials: int,
    device: str,
    tmp: Path,
    pruner: str = "none",
    precision: str | None = None,
) -> dict[str, Any]:
    """The study spec shared by every droptune mode (and mirrored by the naive baseline);
    ``precision`` sets ``train.precision`` (``bf16-mixed`` for the bf16 rows)."""
    s = SCALES[scale]
    pruning = {"name": "median", "n_startup_trials": 8, "n_warmup_steps": 1}
    spec: dict[str, Any] = {
        "study": {"name": name, "metric": "val_acc", "direction": "maximize", "seed": 0},
        "data": {
            "name": "synthetic",
            **s["data"],
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "label_noise": 0.05,
            "batch_size": s["batch_size"],
        },
        "model": {"family": "mlp", "hidden": s["hidden"]},
        "train": {
            "max_epochs": s["max_epochs"],
            "optimizer": "adamw",
            "lr": 1.0e-3,
            "accelerator": device,
            "num_threads": 1 if device == "cpu" else None,
            "matmul_precision": None if device == "cpu" else "high",
        },
        "regularization": {
            "dropout": {"kind": "standard", "input_rate": 0.1, "hidden_rate": 0.3},
            "l2": {"strength": 1.0e-4, "mode": "decoupled"},
            "early_stopping": {"patience": None},
        },
        "search": {
            "regularization.dropout.input_rate": {"low": 0.0, "high": 0.3},
            "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.6},
            "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": pruning if pruner == "median" else {"name": "none"},
        "storage": f"sqlite:///{tmp / name / 'droptune.db'}",
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp / name / 'mlflow.db'}"},
        "execution": {
            "workers": 1,
            "devices": "cpu" if device == "cpu" else "auto",
            "population_init": "exact" if device == "cpu" else "fast",
        },
        "n_trials": n_trials,
    }
    if precision is not None:
        spec["train"]["precision"] = precision
    return spec


def naive(scale: str, n_trials: int, device: str) -> dict[str, Any]:
    """(a): Optuna + a plain Lightning Trainer over a DataLoader of CPU tensors."""
    import warnings

    import optuna
    import pytorch_lightning as pl
    import torch
    from torch import nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torch.utils.data import TensorDataset

    from droptune.config import TrainConfig
    from droptune.training import build_datamodule

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = make_spec(scale, "naive", n_trials, device, Path("."))
    if device == "cpu":
        torch.set_num_threads(1)
    else:
        torch.set_float32_matmul_precision(spec["train"]["matmul_precision"])
    base = TrainConfig.from_dict({k: spec[k] for k in ("data", "model", "train")})
    dm = build_datamodule(base)
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    train = DataLoader(TensorDataset(xt, yt), batch_size=spec["data"]["batch_size"], shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=spec["data"]["batch_size"])
    hidden = spec["model"]["hidden"]

    class MLP(pl.LightningModule):
        def __init__(self, p_in: float, p_h: float, wd: float) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Dropout(p_in)]
            width = xt.shape[1]
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(p_h)]
                width = h
            layers.append(nn.Linear(width, int(yt.max()) + 1))
            self.net = nn.Sequential(*layers)
            self.wd = wd

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=self.wd)

    def objective(trial: optuna.Trial) -> float:
        p_in = trial.suggest_float("regularization.dropout.input_rate", 0.0, 0.3)
        p_h = trial.suggest_float("regularization.dropout.hidden_rate", 0.0, 0.6)
        wd = trial.suggest_float("regularization.l2.strength", 1e-6, 1e-2, log=True)
        trainer = pl.Trainer(
            max_epochs=spec["train"]["max_epochs"],
            accelerator="gpu" if device == "gpu" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(MLP(p_in, p_h, wd), train, val)
        return float(trainer.callback_metrics["val_acc"])

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    wall = time.perf_counter() - start
    return {
        "trials": n_trials,
        "wall": wall,
        "busy": wall,
        "acc": [t.value for t in study.trials],
    }


def droptune_mode(
    scale: str,
    name: str,
    n_trials: int,
    device: str,
    tmp: Path,
    args: list[str],
    pruner: str = "none",
    workers: int = 1,
    precision: str | None = None,
) -> dict[str, Any]:
    """(b)-(d): ``droptune run`` in a subprocess, timed end to end, with the mean time per
    trial by category that the trials recorded (``droptune.timing``)."""
    import optuna

    spec = make_spec(scale, name, n_trials, device, tmp, pruner, precision)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "droptune.cli", "run", str(path), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=_env(device))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=spec["storage"])
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    acc = [float(t.value) for t in done if t.value is not None]
    tracking = [float(t.user_attrs.get("droptune.tracking_seconds", 0.0)) for t in done]
    spent = summarize(t.user_attrs for t in done)
    first = min(t.datetime_start for t in done if t.datetime_start)
    last = max(t.datetime_complete for t in done if t.datetime_complete)
    return {
        "trials": len(done),
        "wall": wall,
        "busy": (last - first).total_seconds(),
        "acc": acc,
        "tracking": tracking,
        "timing": spent,
        "workers": workers,
    }


def pure(scale: str, size: int, device: str) -> dict[str, Any]:
    """(e): ``train_population`` of ``size`` members in this process, with no storage, no
    tracking and no process start: the training loop's own ceiling (one warm-up run first)."""
    import random

    from droptune.config import TrainConfig
    from droptune.population import train_population
    from droptune.training import build_datamodule

    spec = make_spec(scale, "pure", size, device, Path("."))
    base = TrainConfig.from_dict(
        {k: spec[k] for k in ("data", "model", "train", "regularization")}
    )
    data = build_datamodule(base)
    rng = random.Random(0)

    def members() -> list[TrainConfig]:
        return [
            base.with_overrides(
                {
                    "train.seed": i,
                    "regularization.dropout.input_rate": rng.uniform(0.0, 0.3),
                    "regularization.dropout.hidden_rate": rng.uniform(0.0, 0.6),
                    "regularization.l2.strength": 10 ** rng.uniform(-6, -2),
                }
            )
            for i in range(size)
        ]

    init = spec["execution"]["population_init"]
    train_population(members(), datamodule=data, init=init)  # warm-up: CUDA context, kernels
    start = time.perf_counter()
    results = train_population(members(), datamodule=data, init=init)
    wall = time.perf_counter() - start
    acc = [max(row["val_acc"] for row in r.history) for r in results]
    return {"trials": size, "wall": wall, "busy": wall, "acc": acc}


class GpuSampler:
    """Mean GPU utilisation (``nvidia-smi``, every 0.5 s) while a mode runs; None off a GPU."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            with contextlib.suppress(ValueError, IndexError):
                self.samples.append(float(out.split()[0]))

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def _env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The markdown table: rates, ratios to (a), accuracy and GPU utilisation per mode."""
    base = rows.get(NAIVE)
    base_rate = 60 * base["trials"] / base["busy"] if base else None
    lines = [
        "trials/min: from the first trial's start to the last trial's end (steady state); "
        "end to end: the whole command (start-up, imports, study creation, study plots)",
        "",
        "| mode | trials | trials/min | × naive | end to end /min | best val_acc ± std "
        "| GPU util |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    # by letter, then in the order the modes ran (P and workers ascending)
    ordered = sorted(enumerate(rows.items()), key=lambda item: (item[1][0][:3], item[0]))
    for _, (mode, row) in ordered:
        rate = 60 * row["trials"] / row["busy"]
        total = 60 * row["trials"] / row["wall"]
        acc = row["acc"]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ratio = f"{rate / base_rate:.2f}" if base_rate else "-"
        util = row.get("gpu_util")
        lines.append(
            f"| {mode} | {row['trials']} | {rate:.1f} | {ratio} | {total:.1f} | "
            f"{statistics.mean(acc):.4f} ± {spread:.4f} | "
            f"{'-' if util is None else f'{util:.0f}%'} |"
        )
    return "\n".join([*lines, "", *overhead_table(rows)])


def overhead_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per-trial time of the droptune modes by category (what each trial recorded in
    ``droptune.timing``; a population's time shared among its members), against the wall
    time per trial of one worker (busy time × workers / trials): the rest is the worker's
    loop outside the trials (claiming slots, Optuna's ask in process mode, the tell)."""
    timed = [(mode, row) for mode, row in rows.items() if row.get("timing")]
    if not timed:
        return []
    keys = (*CATEGORIES, "total")
    head = ["setup", "train", "storage", "MLflow", "other", "in trial"]
    lines = [
        "ms per trial, mean (a population's time shared among its members); per worker: "
        "busy time × workers / trials; outside: the worker's loop between trials (slots, "
        "ask, tell)",
        "",
        "| mode | per worker | " + " | ".join(head) + " | outside |",
        "|---|" + "---:|" * (len(head) + 2),
    ]
    for mode, row in sorted(timed, key=lambda item: item[0][:3]):
        spent = row["timing"]
        per_worker = 1000 * row["busy"] * row.get("workers", 1) / row["trials"]
        cells = [f"{1000 * spent[key]:.1f}" for key in keys]
        outside = per_worker - 1000 * spent["total"]
        lines.append(f"| {mode} | {per_worker:.1f} | " + " | ".join(cells) + f" | {outside:.1f} |")
    return lines


NAIVE = "(a) naive Optuna + Lightning"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--populations", default="8,32", help="comma-separated P values")
    parser.add_argument("--packed", type=int, default=2, help="workers (per GPU) in mode (c)")
    parser.add_argument(
        "--pop-workers", default="1", help="comma-separated workers (per GPU) for mode (d)"
    )
    parser.add_argument(
        "--pure", type=int, default=0, help="also time train_population alone at this P"
    )
    parser.add_argument(
        "--bf16",
        default="",
        help="comma-separated P values: population rows (1 worker) with train.precision "
        "bf16-mixed (autocast), next to the TF32/fp32 rows",
    )
    parser.add_argument("--trials", type=int, default=None, help="override every trial count")
    parser.add_argument(
        "--pruner",
        choices=["none", "median"],
        default="none",
        help="median: the droptune modes prune (to measure pruning's bookkeeping; the naive "
        "baseline does not prune, so ratios to it are no longer like for like)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args()
    counts = dict(SCALES[args.scale]["trials"])
    if args.trials:
        counts = dict.fromkeys(counts, args.trials)
    populations = [int(p) for p in args.populations.split(",") if p]
    pop_workers = [int(w) for w in args.pop_workers.split(",") if w]
    gpu = args.device == "gpu"

    def spread(workers: int) -> list[str]:
        return ["--per-device", str(workers)] if gpu else ["--workers", str(workers)]

    def population(size: int, workers: int) -> list[str]:
        return ["--population", str(size), *spread(workers)]

    # the rows the targets compare first (baseline, best packed, populations), so that a run
    # cut short still has them; the 1-worker row last
    # (label, name, trials, CLI args (None: the naive baseline), workers, train.precision)
    plan: list[tuple[str, str, int, list[str] | None, int, str | None]] = [
        (NAIVE, "naive", counts["naive"], None, 1, None),
        (
            f"(c) droptune run, {args.packed} packed workers",
            "packed",
            counts["packed"],
            spread(args.packed),
            args.packed,
            None,
        ),
    ]
    for p in populations:
        for w in pop_workers:
            # at least two rounds per worker, so that the steady state is measured
            n = max(counts["population"], 2 * p * w)
            label = f"(d) droptune run --population {p}" + (f", {w} workers" if w > 1 else "")
            plan.append((label, f"pop{p}w{w}", n, population(p, w), w, None))
    for p in [int(p) for p in args.bf16.split(",") if p]:
        label = f"(d) droptune run --population {p}, bf16 autocast"
        n = max(counts["population"], 2 * p)
        plan.append((label, f"pop{p}bf16", n, population(p, 1), 1, "bf16-mixed"))
    if args.pure:
        label = f"(e) train_population alone, P={args.pure} (no storage, no tracking)"
        plan.append((label, "pure", args.pure, [], 1, None))
    run1 = ["--workers", "1"]  # one worker whatever the GPUs
    plan.append(("(b) droptune run, 1 worker", "run1", counts["run"], run1, 1, None))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"scale {args.scale}, device {args.device}", flush=True)
        for label, name, n, cli, workers, precision in plan:
            with GpuSampler(gpu) as sampler:
                if cli is None:
                    row = naive(args.scale, n, args.device)
                elif name == "pure":
                    row = pure(args.scale, n, args.device)
                else:
                    row = droptune_mode(
                        args.scale,
                        name,
                        n,
                        args.device,
                        tmp,
                        cli,
                        args.pruner,
                        workers,
                        precision,
                    )
            row["gpu_util"] = sampler.mean
            rows[label] = row
            rate = 60 * row["trials"] / row["busy"]
            print(f"  {label}: {row['trials']} trials, {rate:.1f}/min", flush=True)
            if args.out is not None:  # after every mode: a run cut short keeps what it measured
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))
                (args.out / "table.md").write_text(table(rows) + "\n")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
