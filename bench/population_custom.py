"""Population mode for a user's own model: one batched program against one trial at a time and
against packed workers, side by side in one run (so machine load hits every mode alike).

The model is ``examples/user_model.py``'s ``UserNet`` (a user's LightningModule with its own
dropout, AdamW and StepLR; ``model.family: custom``), on digits. P configs draw their dropout
rates, L2 strength and seed at random (fixed seed), as a study's round would ask them.

Modes (each in its own process, so that its peak memory is its own):
  (a) one-at-a-time — ``droptune.training.fit(config)`` for each config in turn (what
      ``droptune train`` and a population's fallback run);
  (b) packed-K      — K processes, each fitting its share of the configs one at a time;
  (c) population-P  — ``train_population(configs)``: one ``torch.func`` population.
Every mode trains the same configs for the same epochs (no early stopping), with
``train.num_threads`` threads per process. Times are wall time of the training calls (imports
and data excluded, the population's build and trial run included). Memory: peak RSS of the
process minus its RSS before training (CPU) or the peak of ``torch.cuda.max_memory_allocated``
(CUDA), divided by the members trained at once.

Run: python bench/population_custom.py [--population 32] [--epochs 5] [--packed 2]
     [--threads 1] [--device cpu|cuda] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


ROOT = Path(__file__).resolve().parents[1]


def configs(size: int, epochs: int, threads: int, device: str, hidden: int) -> list[Any]:
    from droptune.config import TrainConfig

    base = TrainConfig.from_dict(
        {
            "data": {"name": "digits", "batch_size": 64},
            "model": {
                "family": "custom",
                "target": "examples.user_model:UserNet",
                "kwargs": {"in_features": 64, "hidden": hidden},
            },
            "train": {
                "max_epochs": epochs,
                "accelerator": "cuda" if device == "cuda" else "cpu",
                "num_threads": threads,
            },
            "regularization": {
                "dropout": {"kind": "standard"},
                "early_stopping": {"patience": None},
            },
        }
    )
    draw = random.Random(0)
    return [
        base.with_overrides(
            {
                "regularization.dropout.input_rate": round(draw.uniform(0.0, 0.3), 3),
                "regularization.dropout.hidden_rate": round(draw.uniform(0.0, 0.6), 3),
                "regularization.l2.strength": 10 ** draw.uniform(-6, -2),
                "train.seed": index,
            }
        )
        for index in range(size)
    ]


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """One mode's share of the work, in this process; prints one JSON line."""
    import logging
    import warnings

    import torch

    from droptune.data import build_datamodule

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "droptune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    every = configs(args.population, args.epochs, args.threads, args.device, args.hidden)
    mine = every[args.share :: args.shares]
    build_datamodule(mine[0])  # imports and data caches warm before the clock
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    started = time.perf_counter()
    if args.mode == "population":
        from droptune.population import train_population

        results = train_population(mine)
        best = [r.best for r in results]
        at_once = len(mine)
    else:
        from droptune.training import fit

        best = []
        for config in mine:
            fitted = fit(config, test=False)
            best.append(fitted.metrics["best_val_loss"])
        at_once = 1
    seconds = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_mb() - base
    print(
        json.dumps(
            {
                "seconds": seconds,
                "trials": len(mine),
                "best": best,
                "mb_per_member": memory / at_once,
            }
        )
    )


def run_mode(args: argparse.Namespace, mode: str, shares: int) -> dict[str, Any]:
    """Start ``shares`` processes of ``mode`` at once; wall time of the slowest."""
    command = [sys.executable, __file__, "--child", "--mode", mode, "--shares", str(shares)]
    for key in ("population", "epochs", "threads", "device", "hidden"):
        command += [f"--{key}", str(getattr(args, key))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen([*command, "--share", str(k)], stdout=subprocess.PIPE, text=True, env=env)
        for k in range(shares)
    ]
    outs = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{mode} failed (exit {proc.returncode})")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    seconds = max(o["seconds"] for o in outs)
    trials = sum(o["trials"] for o in outs)
    best = [b for o in outs for b in o["best"]]
    return {
        "seconds": seconds,
        "trials_per_min": 60 * trials / seconds,
        "best_val_loss": statistics.fmean(best),
        "mb_per_member": max(o["mb_per_member"] for o in outs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--packed", type=int, default=2, help="worker processes in mode (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hidden", type=int, default=128, help="UserNet's hidden width")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shares", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = {
        "one-at-a-time": run_mode(args, "single", 1),
        f"packed-{args.packed}": run_mode(args, "single", args.packed),
        f"population-{args.population}": run_mode(args, "population", 1),
    }
    baseline = rows["one-at-a-time"]["trials_per_min"]
    print(
        f"UserNet (examples/user_model.py, hidden {args.hidden}) on digits, {args.population} "
        f"configs x {args.epochs} epochs, {args.threads} thread(s) per process, {args.device}"
    )
    print(f"{'mode':<16}{'trials/min':>12}{'ratio':>8}{'MB/member':>11}{'best val_loss':>15}")
    for name, row in rows.items():
        print(
            f"{name:<16}{row['trials_per_min']:>12.1f}{row['trials_per_min'] / baseline:>7.2f}x"
            f"{row['mb_per_member']:>11.2f}{row['best_val_loss']:>15.4f}"
        )


if __name__ == "__main__":
    main()
