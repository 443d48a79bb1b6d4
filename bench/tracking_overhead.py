"""What MLflow tracking costs per trial: the same tiny study run twice in one process, one
worker, SQLite Optuna storage, with tracking off and on (a local SQLite MLflow store, or
``--tracking-uri`` for a server), interleaved in rounds so that machine load hits both alike.

Reports, per mode, the median wall time per trial (ask → tell, including storage) and, with
tracking on, the median of what each trial recorded in ``droptune.tracking_seconds`` (its
``create_run`` at the start plus the batched ``log_batch`` + ``set_terminated`` at the end).

Run: python bench/tracking_overhead.py [--trials 20] [--rounds 2] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import statistics
import tempfile
import time
from typing import Any
import warnings

import optuna

from droptune.study.runner import create_study
from droptune.study.spec import spec_from_dict
from droptune.study.worker import run_worker


SPEC: dict[str, Any] = {
    "study": {"name": "overhead", "metric": "val_loss", "direction": "minimize", "seed": 0},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 200},
    "model": {"family": "mlp", "hidden": [16]},
    "train": {"max_epochs": 3, "accelerator": "cpu", "num_threads": 1},
    "search": {
        "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    },
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "execution": {"workers": 1, "devices": "cpu"},
}


def _round(tmp: Path, index: int, trials: int, uri: str | None) -> dict[str, Any]:
    name = f"overhead-{index}-{'on' if uri else 'off'}"
    tracking = {"enabled": True, "uri": uri} if uri else {"enabled": False}
    spec = spec_from_dict({**SPEC, "tracking": tracking, "n_trials": trials})
    storage = f"sqlite:///{tmp / f'{name}.db'}"
    create_study(spec, storage, name, trials)
    started = time.perf_counter()
    run_worker(spec, storage, name)
    total = time.perf_counter() - started
    done = optuna.load_study(study_name=name, storage=storage).get_trials()
    per_trial = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in done
        if t.datetime_complete and t.datetime_start
    ]
    spent = [float(t.user_attrs.get("droptune.tracking_seconds", 0.0)) for t in done]
    return {"total": total, "per_trial": per_trial, "tracking": spent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    off: list[float] = []
    on: list[float] = []
    spent: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = args.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        for index in range(args.rounds):
            off += _round(root, index, args.trials, None)["per_trial"]
            result = _round(root, index, args.trials, uri)
            on += result["per_trial"]
            spent += result["tracking"]
    med_off, med_on = statistics.median(off), statistics.median(on)
    print(f"trials per mode: {len(off)} (tiny MLP on digits, 3 epochs, 1 thread, SQLite storage)")
    print(f"median seconds per trial, tracking off: {med_off:.3f}")
    print(f"median seconds per trial, tracking on:  {med_on:.3f}  (ratio {med_on / med_off:.3f})")
    print(
        f"tracking seconds recorded per trial: median {statistics.median(spent) * 1000:.0f} ms, "
        f"max {max(spent) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
