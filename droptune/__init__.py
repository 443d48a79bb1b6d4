"""droptune: find the regularization a PyTorch model needs.

The public API is small on purpose::

    import droptune

    model, report = droptune.apply(my_model, {"dropout": {"kind": "standard", "hidden_rate": 0.3}})
    config = droptune.load_best("digits-mlp")
    trainer = droptune.build_trainer(config)

Layers, constraints and MC prediction live in :mod:`droptune.layers`; configuration objects in
:mod:`droptune.config`; errors in :mod:`droptune.exceptions`; the study runner in
:mod:`droptune.study`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from droptune._lazy import lazy_exports
from droptune.config import RegularizationConfig
from droptune.config import TrainConfig
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneError
from droptune.exceptions import SpecError
from droptune.exceptions import StorageError
from droptune.export import load_best
from droptune.export import load_config
from droptune.kinds import DROPOUT_KINDS


if TYPE_CHECKING:
    from droptune.layers import apply
    from droptune.layers import make_dropout
    from droptune.layers import max_norm_
    from droptune.layers import mc_predict
    from droptune.layers import param_groups
    from droptune.study.api import run_study
    from droptune.training import build_datamodule
    from droptune.training import build_module
    from droptune.training import build_trainer

__version__ = "0.1.0"

if not TYPE_CHECKING:  # mypy sees the imports above, and flags a misspelled name
    # Imported on first use: they need torch, which commands that only read or watch a study
    # (``droptune status``, ``run``'s own process) never import.
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            **dict.fromkeys(
                ("apply", "make_dropout", "max_norm_", "mc_predict", "param_groups"),
                "droptune.layers",
            ),
            **dict.fromkeys(
                ("build_datamodule", "build_module", "build_trainer"), "droptune.training"
            ),
            "run_study": "droptune.study.api",
        },
    )


def load_checkpoint(path: str, map_location: object = None, module_class: object = None) -> object:
    """Load a ``droptune train`` checkpoint safely (``weights_only=True``); see
    :func:`droptune.training.load_checkpoint` (imported lazily: it needs Lightning)."""
    from droptune.training import load_checkpoint as load

    return load(path, map_location=map_location, module_class=module_class)


__all__ = [
    "DROPOUT_KINDS",
    "ConfigError",
    "DroptuneError",
    "RegularizationConfig",
    "SpecError",
    "StorageError",
    "TrainConfig",
    "__version__",
    "apply",
    "build_datamodule",
    "build_module",
    "build_trainer",
    "load_best",
    "load_checkpoint",
    "load_config",
    "make_dropout",
    "max_norm_",
    "mc_predict",
    "param_groups",
    "run_study",
]
