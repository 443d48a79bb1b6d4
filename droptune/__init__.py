"""droptune: find the regularization a PyTorch model needs.

The public API is small on purpose::

    import droptune

    model, report = droptune.apply(my_model, {"dropout": {"kind": "standard", "hidden_rate": 0.3}})
    config = droptune.load_best("digits-mlp", "sqlite:///runs/digits-mlp/droptune.db")
    trainer = config.build_trainer()

Layers, constraints and MC prediction live in :mod:`droptune.layers`; configuration objects in
:mod:`droptune.config`; errors in :mod:`droptune.exceptions`; the study runner in
:mod:`droptune.study`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from droptune.config import RegularizationConfig
from droptune.config import TrainConfig
from droptune.config import load_config
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneError
from droptune.exceptions import SpecError
from droptune.exceptions import StorageError
from droptune.export import load_best
from droptune.kinds import DROPOUT_KINDS


if TYPE_CHECKING:
    from droptune.layers import apply
    from droptune.layers import make_dropout
    from droptune.layers import max_norm_
    from droptune.layers import mc_predict
    from droptune.layers import param_groups

__version__ = "0.1.0"

#: Imported on first use (PEP 562): they need torch, which commands that only read a study
#: (``droptune status``, ``best``, ``run``'s own process) never import.
_LAYERS = ("apply", "make_dropout", "max_norm_", "mc_predict", "param_groups")


def __getattr__(name: str) -> Any:
    if name not in _LAYERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import droptune.layers

    value = getattr(droptune.layers, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAYERS])


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
    "load_best",
    "load_checkpoint",
    "load_config",
    "make_dropout",
    "max_norm_",
    "mc_predict",
    "param_groups",
]
