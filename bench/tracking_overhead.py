"""What MLflow tracking costs per trial: the same tiny study run three times in one process,
one worker, SQLite Optuna storage — tracking off, on with metrics logged only when a trial ends
(``tracking.live: false``), and on with every epoch's metrics logged while it trains (the
default) — to a local SQLite MLflow store or ``--tracking-uri``, interleaved in rounds so that
machine load hits every mode alike.

Reports, per mode, the median wall time per trial (ask → tell, including storage) and, with
tracking on, the median of what each trial recorded in ``droptune.tracking_seconds`` (its
``create_run`` at the start plus the batched ``log_batch`` + ``set_terminated`` at the end; the
per-epoch writes happen on a background thread and show in the wall time only).

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
    "train": {"max_epochs": 10, "accelerator": "cpu", "num_threads": 1},
    "search": {
        "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    },
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "execution": {"workers": 1, "devices": "cpu"},
}


def _round(
    tmp: Path, index: int, trials: int, uri: str | None, live: bool = True
) -> dict[str, Any]:
    name = f"overhead-{index}-{'off' if not uri else 'live' if live else 'end'}"
    tracking = {"enabled": True, "uri": uri, "live": live} if uri else {"enabled": False}
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
    end: list[float] = []
    live: list[float] = []
    spent: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = args.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        for index in range(args.rounds):
            off += _round(root, index, args.trials, None)["per_trial"]
            end += _round(root, index, args.trials, uri, live=False)["per_trial"]
            result = _round(root, index, args.trials, uri, live=True)
            live += result["per_trial"]
            spent += result["tracking"]
    med_off, med_end, med_live = (statistics.median(v) for v in (off, end, live))
    print(f"trials per mode: {len(off)} (tiny MLP on digits, 10 epochs, 1 thread, SQLite storage)")
    print(f"median seconds per trial, tracking off:          {med_off:.3f}")
    print(
        f"median seconds per trial, tracking, metrics at end: {med_end:.3f}  "
        f"(ratio {med_end / med_off:.3f})"
    )
    print(
        f"median seconds per trial, tracking, live metrics:   {med_live:.3f}  "
        f"(ratio {med_live / med_off:.3f}; {(med_live - med_end) * 1000:+.0f} ms per trial "
        "for the per-epoch writes)"
    )
    print(
        f"tracking seconds recorded per trial: median {statistics.median(spent) * 1000:.0f} ms, "
        f"max {max(spent) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
