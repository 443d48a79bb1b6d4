"""``make_dropout(kind, p, **options)``: one entry point for every activation dropout kind."""

from __future__ import annotations

import inspect
from typing import Any

from droptune.exceptions import ConfigError
from droptune.kinds import DROPOUT_KINDS
from droptune.kinds import ELEMENTWISE_KINDS
from droptune.layers._base import DropoutBase
from droptune.layers._base import Rate
from droptune.layers._elementwise import AlphaDropout
from droptune.layers._elementwise import Dropout
from droptune.layers._elementwise import GaussianDropout
from droptune.layers._elementwise import NoDropout
from droptune.layers._structured import DropBlock
from droptune.layers._structured import DropPath
from droptune.layers._structured import EmbeddingDropout
from droptune.layers._structured import LockedDropout
from droptune.layers._structured import SpatialDropout


__all__ = ["DROPOUT_KINDS", "ELEMENTWISE_KINDS", "make_dropout"]

_CLASSES: dict[str, type[DropoutBase]] = {
    cls.kind: cls
    for cls in (
        NoDropout,
        Dropout,
        SpatialDropout,
        LockedDropout,
        GaussianDropout,
        AlphaDropout,
        DropBlock,
        DropPath,
        EmbeddingDropout,
    )
}

if tuple(_CLASSES) != DROPOUT_KINDS:  # the names the config validates against, without torch
    raise ImportError(f"droptune.kinds.DROPOUT_KINDS {DROPOUT_KINDS} != classes {tuple(_CLASSES)}")


def _options(cls: type[DropoutBase]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [name for name in params if name not in ("self", "p")]


def make_dropout(kind: str, p: Rate = 0.0, **options: Any) -> DropoutBase:
    """Build the dropout module of ``kind`` with rate ``p``.

    Args:
        kind: One of :data:`DROPOUT_KINDS`: ``none``, ``standard``, ``spatial``,
            ``variational``, ``gaussian``, ``alpha``, ``dropblock``, ``droppath``,
            ``embedding``.
        p: Drop rate in ``[0, 1)``, or a ``[P]`` tensor of rates for a population.
        **options: Kind-specific settings: ``batch_first`` (variational), ``channel`` (alpha),
            ``block_size`` and ``couple_channels`` (dropblock).

    Raises:
        ConfigError: Unknown kind, rate outside ``[0, 1)``, or an option the kind does not take.

    Example:
        >>> make_dropout("dropblock", 0.1, block_size=5)
        DropBlock(p=0.1, block_size=5, couple_channels=True)
    """
    cls = _CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(
            f"unknown dropout kind {kind!r}; allowed kinds: {', '.join(DROPOUT_KINDS)}"
        )
    allowed = _options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{kind} dropout: unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(allowed) if allowed else 'none'}"
        )
    return cls(p, **options)
