"""Does regularization help? MNIST-1D MLP without and with the regularization of a study spec.

Trains the MLP of ``studies/mnist1d-mlp.yaml`` (a) with no regularization at all (no dropout, no
L2, no max-norm, no early stopping: every epoch runs, the last weights are tested, as in the
MNIST-1D paper's baseline) and (b) with the spec's dropout + L2 + early stopping, for several
seeds each, and prints mean ± std test accuracy. The MNIST-1D paper's MLP baseline is 68% test
accuracy with 100% train accuracy: it overfits, which is where dropout should help.

Run: python bench/regularization_gain.py [--seeds 3] [--spec studies/mnist1d-mlp.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
import statistics
import time
import warnings

from droptune.cli import SPEC_ONLY_SECTIONS
from droptune.config import TrainConfig
from droptune.config import load_yaml_mapping
from droptune.training import fit


def _configs(spec: Path, epochs: int | None) -> dict[str, TrainConfig]:
    raw = load_yaml_mapping(spec.read_text(), what=str(spec))
    tuned = TrainConfig.from_dict({k: v for k, v in raw.items() if k not in SPEC_ONLY_SECTIONS})
    if epochs is not None:
        tuned = tuned.with_overrides({"train.max_epochs": epochs})
    plain = tuned.with_overrides(
        {
            "regularization.dropout.kind": "none",
            "regularization.l2.strength": 0.0,
            "regularization.max_norm": None,
            "regularization.early_stopping.patience": None,
        }
    )
    return {"no regularization": plain, "dropout + L2 + early stopping": tuned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("studies/mnist1d-mlp.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override train.max_epochs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results: dict[str, dict[str, list[float]]] = {}
    for label, cfg in _configs(args.spec, args.epochs).items():
        rows: dict[str, list[float]] = {
            "test_acc": [],
            "train_acc": [],
            "epochs": [],
            "seconds": [],
        }
        for seed in range(args.seeds):
            start = time.perf_counter()
            result = fit(cfg.with_overrides({"train.seed": seed}))
            rows["test_acc"].append(result.metrics["test_acc"])
            rows["train_acc"].append(result.metrics.get("train_acc", float("nan")))
            rows["epochs"].append(result.epochs)
            rows["seconds"].append(time.perf_counter() - start)
            print(
                f"{label:32s} seed {seed}: test_acc {result.metrics['test_acc']:.4f} "
                f"train_acc {rows['train_acc'][-1]:.4f} epochs {result.epochs}",
                flush=True,
            )
        results[label] = rows
    print()
    print(f"{'config':32s} {'test acc (mean ± std)':>24s} {'train acc':>10s} {'epochs':>7s}")
    for label, rows in results.items():
        acc = rows["test_acc"]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        train_acc, epochs = statistics.mean(rows["train_acc"]), statistics.mean(rows["epochs"])
        print(
            f"{label:32s} {statistics.mean(acc):>15.4f} ± {spread:.4f} "
            f"{train_acc:>10.4f} {epochs:>7.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
