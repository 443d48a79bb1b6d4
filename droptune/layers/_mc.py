"""Monte Carlo dropout prediction (Gal & Ghahramani, "Dropout as a Bayesian Approximation", 2016).

``model.train()`` would also switch BatchNorm to batch statistics and update its running
averages. Here the model goes to eval mode and only the modules that carry dropout go back to
training mode: droptune's and torch's dropout modules, multi-head attention (its dropout follows
its own ``training`` flag), transformer layers (whose eval fast path skips dropout), droptune's
variational RNNs and DropConnect parametrizations.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib

import torch
from torch import Tensor
from torch import nn

from droptune.exceptions import ConfigError
from droptune.layers._base import DropoutBase
from droptune.layers._recurrent import VariationalGRU
from droptune.layers._recurrent import VariationalLSTM


__all__ = ["mc_dropout", "mc_predict"]

_STOCHASTIC = (
    DropoutBase,
    nn.modules.dropout._DropoutNd,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    VariationalLSTM,
    VariationalGRU,
)


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` is in eval mode except its dropout-carrying modules.

    Every module's ``training`` flag is restored on exit.
    """
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for module in model.modules():
            if isinstance(module, _STOCHASTIC):
                module.train()
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


@torch.no_grad()
def mc_predict(
    model: nn.Module,
    x: Tensor,
    samples: int = 30,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance over ``samples`` stochastic forward passes.

    Args:
        model: Any module; its dropout stays stochastic, BatchNorm uses running statistics.
        x: The input batch.
        samples: Number of passes (30–100 is usual).
        transform: Applied to each output before averaging, e.g. ``lambda z: z.softmax(-1)``.

    Returns:
        ``(mean, variance)`` of the (transformed) outputs, each shaped like one output.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
        >>> mean, var = mc_predict(net, torch.randn(3, 4), samples=20)
        >>> mean.shape, bool((var > 0).all())
        (torch.Size([3, 2]), True)
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"mc_predict: samples must be an int >= 2, got {samples!r}")
    with mc_dropout(model):
        total: Tensor | None = None
        total_sq: Tensor | None = None
        dtype = torch.float32
        for _ in range(samples):
            out = model(x)
            out = transform(out) if transform is not None else out
            dtype = out.dtype
            out = out.double()  # sums of squares in float64: the variance is a difference
            total = out if total is None else total + out
            total_sq = out * out if total_sq is None else total_sq + out * out
    assert total is not None and total_sq is not None
    mean = total / samples
    var = (total_sq / samples - mean * mean).clamp(min=0.0) * samples / (samples - 1)
    return mean.to(dtype), var.to(dtype)
