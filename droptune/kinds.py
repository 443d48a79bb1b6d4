"""The names of droptune's dropout kinds, without PyTorch: the spec and config layers validate
against them, and commands that only read a study (``status``, ``best``, ``run``'s own process)
never import torch. :mod:`droptune.layers` maps each name to its module class."""

from __future__ import annotations


__all__ = ["DROPOUT_KINDS", "ELEMENTWISE_KINDS"]

#: Every kind accepted by :func:`droptune.layers.make_dropout`, in a stable order.
DROPOUT_KINDS: tuple[str, ...] = (
    "none",
    "standard",
    "spatial",
    "variational",
    "gaussian",
    "alpha",
    "dropblock",
    "droppath",
    "embedding",
)

#: Kinds that act on single elements and therefore fit any site (dense, conv, sequence).
ELEMENTWISE_KINDS: tuple[str, ...] = ("none", "standard", "gaussian", "alpha")
