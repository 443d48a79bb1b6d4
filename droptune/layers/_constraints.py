"""Max-norm weight constraint and L2 regularization groups.

Max-norm (Srivastava et al. 2014, section 5.1): after every optimizer step, project the incoming
weight vector of each unit onto the ball ``‖w‖₂ ≤ c``.
"""

from __future__ import annotations

from typing import Any
from typing import Literal
from typing import Protocol

import torch
from torch import Tensor
from torch import nn
from torch.nn.utils import parametrize

from droptune.exceptions import ConfigError


__all__ = ["L2Like", "decay_split", "l2_penalty", "max_norm_", "param_groups"]

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


class L2Like(Protocol):
    """Anything with ``strength`` and ``mode`` (e.g. :class:`droptune.config.L2Config`)."""

    @property
    def strength(self) -> float: ...

    @property
    def mode(self) -> str: ...


def _weight(module: nn.Module) -> Tensor | None:
    """The raw (trainable) weight tensor of a module, looking through parametrizations.

    ``None`` when there is no weight, or when a parametrization splits it into several
    originals (e.g. ``weight_norm``'s magnitude and direction).
    """
    if parametrize.is_parametrized(module, "weight"):
        plist: Any = module.parametrizations["weight"]  # type: ignore[index]
        return plist.original if plist.is_tensor else None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _renorm_parametrized(module: nn.Module, dim: int, max_norm: float) -> None:
    """Max-norm for a weight stored as several originals: project the effective weight.

    The weight is evaluated with every stochastic parametrization (DropConnect) in eval mode,
    projected, and written back through the parametrizations' ``right_inverse``.
    """
    plist: Any = module.parametrizations["weight"]  # type: ignore[index]
    flags = [(sub, sub.training) for sub in plist.modules()]
    plist.eval()
    try:
        weight: Tensor = module.weight  # type: ignore[assignment]
        projected = torch.renorm(weight, p=2, dim=dim, maxnorm=max_norm)
        if not torch.equal(projected, weight):
            try:
                module.weight = projected
            except RuntimeError as err:  # a parametrization without right_inverse
                raise ConfigError(
                    f"max_norm: cannot write the projected weight of {type(module).__name__} "
                    f"back through its parametrizations: {err}"
                ) from err
    finally:
        for sub, flag in flags:
            sub.training = flag


@torch.no_grad()
def max_norm_(module: nn.Module, max_norm: float) -> int:
    """Clip each unit's incoming weight vector to L2 norm ``<= max_norm``, in place.

    Covers every ``nn.Linear`` (rows of ``weight``), ``nn.Conv1d/2d/3d`` (one filter per output
    channel) and transposed convolution (incoming weights of an output channel lie along axis 1)
    under ``module``. Weights already inside the ball are left untouched. Call it after every
    optimizer step.

    Returns:
        The number of weight tensors visited.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> _ = layer.weight.data.mul_(100)
        >>> max_norm_(layer, 3.0)
        1
        >>> bool(layer.weight.norm(dim=1).max() <= 3.0 + 1e-5)
        True
    """
    if not max_norm > 0:
        raise ConfigError(f"max_norm must be > 0, got {max_norm!r}")
    visited = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.modules.conv._ConvNd):
            dim = 1 if isinstance(sub, nn.modules.conv._ConvTransposeNd) else 0
            weight = _weight(sub)
            if weight is not None:
                weight.copy_(torch.renorm(weight, p=2, dim=dim, maxnorm=max_norm))
            elif parametrize.is_parametrized(sub, "weight"):
                _renorm_parametrized(sub, dim, max_norm)
            else:
                continue
            visited += 1
    return visited


def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters into (decayed, not decayed).

    Not decayed: every bias (names starting with ``bias``, including RNN ``bias_ih_l0``) and every
    parameter of a normalization layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...).
    Everything else — weights of linear, conv, recurrent and embedding layers — is decayed.
    Parameters under a parametrization (e.g. DropConnect) count as their parent's.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for owner in model.modules():
        for name, param in owner.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_norm = isinstance(owner, _NORM_TYPES)
            (no_decay if is_norm or name.startswith("bias") else decay).append(param)
        # Parametrized tensors live in `owner.parametrizations.<name>.original`.
        if parametrize.is_parametrized(owner):
            # Several originals (``original0``, ``original1``, ... e.g. weight_norm) when a
            # parametrization splits the tensor; each counts as the parametrized tensor's.
            for name, plist in owner.parametrizations.items():  # type: ignore[union-attr, operator]
                for param in plist.parameters(recurse=False):
                    if not param.requires_grad or id(param) in seen:
                        continue
                    seen.add(id(param))
                    is_norm = isinstance(owner, _NORM_TYPES)
                    (no_decay if is_norm or name.startswith("bias") else decay).append(param)
    return decay, no_decay


def _resolve(
    l2: L2Like | float, mode: str | None
) -> tuple[float, Literal["decoupled", "coupled"]]:
    if isinstance(l2, bool):
        raise ConfigError(f"l2.strength: must be a number >= 0, got {l2!r}")
    if isinstance(l2, int | float):
        strength, chosen = float(l2), mode or "decoupled"
    else:
        strength, chosen = float(l2.strength), mode or l2.mode
    if chosen not in ("decoupled", "coupled"):
        raise ConfigError(f"l2.mode: must be one of decoupled, coupled, got {chosen!r}")
    if not strength >= 0:
        raise ConfigError(f"l2.strength: must be >= 0, got {strength!r}")
    return strength, chosen  # type: ignore[return-value]


def param_groups(
    model: nn.Module, l2: L2Like | float, mode: str | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups implementing L2 regularization of strength λ.

    ``decoupled``: the decayed group gets ``weight_decay=λ`` (use an optimizer with decoupled
    decay such as AdamW; with SGD it equals coupled L2 up to a factor of 2). ``coupled``: both
    groups get ``weight_decay=0`` and the training step must add :func:`l2_penalty` to the loss.
    Biases and normalization parameters are never decayed in either mode.

    Args:
        model: The model whose parameters to group.
        l2: An :class:`~droptune.config.L2Config` or a bare strength λ.
        mode: Overrides ``l2.mode`` (``decoupled`` or ``coupled``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> groups = param_groups(model, 1e-4)
        >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
        ([1, 3], [0.0001, 0.0])
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    strength, chosen = _resolve(l2, mode)
    decay, no_decay = decay_split(model)
    weight_decay = strength if chosen == "decoupled" else 0.0
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def l2_penalty(model: nn.Module, l2: L2Like | float, mode: str | None = None) -> Tensor:
    """The coupled L2 penalty ``λ·Σw²`` over the decayed parameters (0 in decoupled mode).

    Example:
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> _ = nn.init.ones_(layer.weight)
        >>> float(l2_penalty(layer, 0.5, mode="coupled"))
        1.0
    """
    strength, chosen = _resolve(l2, mode)
    decay, _ = decay_split(model)
    if chosen == "decoupled" or strength == 0.0 or not decay:
        device = decay[0].device if decay else None
        return torch.zeros((), device=device)
    return strength * torch.stack([p.pow(2).sum() for p in decay]).sum()
