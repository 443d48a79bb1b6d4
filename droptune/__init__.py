"""droptune: find the regularization a PyTorch model needs.

The public API is small on purpose::

    import droptune
    model, report = droptune.apply(my_model, {"dropout": {"kind": "standard", "hidden_rate": 0.3}})

Layers, constraints and MC prediction live in :mod:`droptune.layers`; configuration objects in
:mod:`droptune.config`; errors in :mod:`droptune.exceptions`.
"""

from droptune.config import RegularizationConfig
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneError
from droptune.layers import DROPOUT_KINDS
from droptune.layers import apply
from droptune.layers import make_dropout
from droptune.layers import max_norm_
from droptune.layers import mc_predict
from droptune.layers import param_groups


__version__ = "0.1.0"

__all__ = [
    "DROPOUT_KINDS",
    "ConfigError",
    "DroptuneError",
    "RegularizationConfig",
    "__version__",
    "apply",
    "make_dropout",
    "max_norm_",
    "mc_predict",
    "param_groups",
]
