"""Max-norm weight constraint and L2 regularization groups.

Max-norm (Srivastava et al. 2014, section 5.1): after every optimizer step, project the incoming
weight vector of each unit onto the ball ``‖w‖₂ ≤ c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Literal
from typing import Protocol

import torch
from torch import Tensor
from torch import nn
from torch.nn.utils import parametrize

from droptune._sections import read_section
from droptune.config import RegularizationConfig
from droptune.exceptions import ConfigError


__all__ = [
    "L2Like",
    "L2Section",
    "MaxNormSection",
    "decay_split",
    "l2_penalty",
    "max_norm_",
    "param_groups",
]

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


#: Every form of the L2 section (see :func:`droptune._sections.read_section`): an L2Config, a
#: RegularizationConfig, the dict form of either, or a bare strength λ.
L2Section = L2Like | RegularizationConfig | Mapping[str, Any] | float
#: Every form of the max-norm bound: a number c > 0, ``None`` (off), or a whole
#: RegularizationConfig (or its dict form) whose ``max_norm`` is used.
MaxNormSection = float | RegularizationConfig | Mapping[str, Any] | None


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
def max_norm_(module: nn.Module, max_norm: MaxNormSection) -> int:
    """Clip each unit's incoming weight vector to L2 norm ``<= max_norm``, in place.

    Covers every ``nn.Linear`` (rows of ``weight``), ``nn.Conv1d/2d/3d`` (one filter per output
    channel) and transposed convolution (incoming weights of an output channel lie along axis 1)
    under ``module``. Weights already inside the ball are left untouched. Call it after every
    optimizer step.

    Args:
        module: The model (every Linear and convolution under it is visited).
        max_norm: The bound c > 0, or a whole :class:`~droptune.config.RegularizationConfig`
            (or its dict form) whose ``max_norm`` is used; ``None`` (max-norm off) visits
            nothing.

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
    bound = read_section(max_norm, "max_norm")
    if bound is None:
        return 0
    visited = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.modules.conv._ConvNd):
            dim = 1 if isinstance(sub, nn.modules.conv._ConvTransposeNd) else 0
            weight = _weight(sub)
            if weight is not None:
                weight.copy_(torch.renorm(weight, p=2, dim=dim, maxnorm=bound))
            elif parametrize.is_parametrized(sub, "weight"):
                _renorm_parametrized(sub, dim, bound)
            else:
                continue
            visited += 1
    return visited


def _is_norm(module: nn.Module) -> bool:
    """torch's normalization layers, and those libraries write themselves (HF ``T5LayerNorm``,
    ``LlamaRMSNorm``, ``ConvNextLayerNorm``): a class named ``*Norm*`` holding only 1-D
    parameters (a scale and a shift per feature)."""
    if isinstance(module, _NORM_TYPES):
        return True
    params = list(module.parameters(recurse=False))
    return "Norm" in type(module).__name__ and bool(params) and all(p.dim() == 1 for p in params)


def _decayed(owner: nn.Module, name: str, rank: int, is_norm: bool) -> bool:
    """Whether weight decay / the L2 penalty applies to ``owner.<name>``.

    Not decayed: biases (``bias``, ``bias_ih_l0``, ``in_proj_bias``), normalization parameters,
    every other 1-D parameter (layer scales, per-channel gains: timm's rule) and the weight of an
    embedding with a ``padding_idx``. An optimizer's weight decay acts on whole tensors, so it
    would shrink the padding row that ``nn.Embedding`` keeps fixed (its gradient is always 0).
    """
    if is_norm or name.startswith("bias") or name.endswith("_bias") or rank <= 1:
        return False
    return not (isinstance(owner, nn.Embedding) and owner.padding_idx is not None)


def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters into (decayed, not decayed).

    Not decayed: every bias (names starting with ``bias`` or ending in ``_bias``, including RNN
    ``bias_ih_l0`` and attention ``in_proj_bias``), every parameter of a normalization layer
    (BatchNorm, LayerNorm, GroupNorm, RMSNorm, and library norms such as ``T5LayerNorm``), every
    other 1-D parameter, and embeddings with a padding row (``padding_idx``). Everything else —
    weights of linear, conv, recurrent and embedding layers — is decayed. Parameters under a
    parametrization (e.g. DropConnect) count as their parent's.

    Example:
        >>> emb = nn.Embedding(10, 4, padding_idx=0)
        >>> decay, no_decay = decay_split(nn.Sequential(nn.Linear(4, 4), emb))
        >>> len(decay), len(no_decay)
        (1, 2)
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for owner in model.modules():
        is_norm = _is_norm(owner)
        for name, param in owner.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if _decayed(owner, name, param.dim(), is_norm) else no_decay).append(param)
        # Parametrized tensors live in `owner.parametrizations.<name>.original`.
        if parametrize.is_parametrized(owner):
            # Several originals (``original0``, ``original1``, ... e.g. weight_norm) when a
            # parametrization splits the tensor; each counts as the parametrized tensor's.
            for name, plist in owner.parametrizations.items():  # type: ignore[union-attr, operator]
                for param in plist.parameters(recurse=False):
                    if not param.requires_grad or id(param) in seen:
                        continue
                    seen.add(id(param))
                    # The parametrized tensor's rank decides (that of its largest original), not
                    # that of a split original such as weight_norm's magnitude.
                    rank = max(p.dim() for p in plist.parameters(recurse=False))
                    decayed = _decayed(owner, name, rank, is_norm)
                    (decay if decayed else no_decay).append(param)
    return decay, no_decay


def _resolve(l2: L2Section, mode: str | None) -> tuple[float, Literal["decoupled", "coupled"]]:
    """(strength, mode) from any form of the L2 section, ``mode`` overriding its mode."""
    cfg = read_section(l2, "l2")
    if mode is not None:
        cfg = read_section({"strength": cfg.strength, "mode": mode}, "l2")
    return cfg.strength, cfg.mode


def param_groups(model: nn.Module, l2: L2Section, mode: str | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups implementing L2 regularization of strength λ.

    ``decoupled``: the decayed group gets ``weight_decay=λ`` (use an optimizer with decoupled
    decay such as AdamW; with SGD it equals coupled L2 up to a factor of 2). ``coupled``: both
    groups get ``weight_decay=0`` and the training step must add :func:`l2_penalty` to the loss.
    Biases and normalization parameters are never decayed in either mode.

    Args:
        model: The model whose parameters to group.
        l2: The L2 section in any form: an :class:`~droptune.config.L2Config`, a whole
            :class:`~droptune.config.RegularizationConfig`, the dict form of either
            (``{"strength": 1e-4, "mode": "decoupled"}``), or a bare strength λ.
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


def l2_penalty(model: nn.Module, l2: L2Section, mode: str | None = None) -> Tensor:
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
