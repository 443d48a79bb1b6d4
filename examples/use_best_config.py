"""Import a tuned regularization into your own training code.

Two ways, both shown here:
1. ``droptune.load_config(path)`` (or ``droptune.load_best(study, storage)``) gives the full
   training config of the best trial; ``build_datamodule/build_module/build_trainer`` rebuild
   exactly what the trial trained (early stopping with the tuned patience, max-norm, L2).
2. ``config.regularization`` with ``droptune.apply`` on *your* model, plus
   ``droptune.param_groups`` for your optimizer.

Run: python examples/use_best_config.py [best.yaml]
     python examples/use_best_config.py --study digits-mlp --storage sqlite:///runs/digits-mlp/droptune.db
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import sys
import warnings

import pytorch_lightning as pl
import torch

import droptune


sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_model import UserNet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "config", nargs="?", type=Path, default=Path(__file__).with_name("best-digits-mlp.yaml")
    )
    parser.add_argument("--study", default=None)
    parser.add_argument("--storage", default=None)
    parser.add_argument("--max-epochs", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.study:
        config = droptune.load_best(args.study, args.storage)
    else:
        config = droptune.load_config(args.config)
    config = config.with_overrides({"train.max_epochs": args.max_epochs})
    print("tuned regularization:", config.regularization.to_dict())

    # 1. Rebuild exactly what the study trained.
    datamodule = droptune.build_datamodule(config)
    module = droptune.build_module(config, datamodule)
    trainer = droptune.build_trainer(config)
    trainer.fit(module, datamodule=datamodule)
    print(f"droptune model: val_acc={float(trainer.callback_metrics['val_acc']):.3f}")

    # 2. Put the tuned regularization into your own LightningModule.
    pl.seed_everything(0, verbose=False)
    mine = UserNet(in_features=64)
    mine, report = droptune.apply(mine, config.regularization)
    print(report)
    l2 = config.regularization.l2

    def configure_optimizers() -> torch.optim.Optimizer:
        return torch.optim.AdamW(droptune.param_groups(mine, l2), lr=1e-3)

    mine.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    trainer = droptune.build_trainer(config)  # early stopping with the tuned patience, max-norm
    trainer.fit(mine, datamodule=datamodule)
    print(f"your model: val_acc={float(trainer.callback_metrics['val_acc']):.3f}")


if __name__ == "__main__":
    main()
