"""Which TrainConfigs can train together as one population, and why not when they cannot.

A population is P networks of one architecture trained as one batched network on one data
stream. So everything that changes shapes, the data or the device must be equal; members may
differ in what only scales numbers: dropout rates, L2, max-norm, early stopping, seed, learning
rate, momentum, gradient clipping and the number of epochs.

This is the static check (no torch): a ``custom`` or ``transformer`` model is also checked and
trial-run when its population is built (``prepare_population``), which may still refuse it with
:class:`~droptune.exceptions.PopulationUnsupported`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from droptune.config import TrainConfig


__all__ = [
    "DATA_NAMES",
    "FAMILIES",
    "PRECISIONS",
    "VARYING_TRAIN",
    "monitors_for",
    "population_support",
]

#: Model families with a population network (hand-written stacked layers for mlp, cnn and rnn;
#: built with ``torch.func`` from the members' own modules for transformer and custom).
FAMILIES = ("mlp", "cnn", "rnn", "transformer", "custom")

#: Data sources a population can train on (in-memory tensors built by droptune).
DATA_NAMES = ("digits", "mnist1d", "synthetic", "csv")

#: ``train.precision`` values a population supports (16-mixed needs one loss scale per member).
PRECISIONS = ("32-true", "bf16-mixed", "64-true")

#: ``train`` fields that may differ between members.
VARYING_TRAIN = ("seed", "lr", "momentum", "max_epochs", "gradient_clip", "optimizer")

#: Optimizers that are one and the same update in droptune: Adam with droptune's decoupled L2
#: step is AdamW (see ``RegularizationCallback``), so members may mix them.
_ADAM_LIKE = ("adam", "adamw")

_ALLOWED_DEVICES = (1, "1", "auto")

_VARY_NOTE = (
    "members of a population may differ only in dropout rates, L2, max_norm, early stopping and "
    f"train.{', train.'.join(VARYING_TRAIN)}"
)


def monitors_for(config: TrainConfig) -> tuple[str, ...]:
    """The metrics a population logs every epoch and can monitor for early stopping."""
    regression = config.data.name == "csv" and config.data.task == "regression"
    return ("val_loss", "val_rmse") if regression else ("val_loss", "val_acc")


def _distinct(values: Sequence[Any]) -> list[str]:
    seen: list[str] = []
    for value in values:
        text = str(value)
        if text not in seen:
            seen.append(text)
    return seen


def _first_difference(
    dumps: Sequence[dict[str, Any]], prefix: str, skip: Sequence[str] = ()
) -> str | None:
    """The dotted name of the first field whose values differ between members, with them."""
    for name in dumps[0]:
        if name in skip:
            continue
        values = [dump[name] for dump in dumps]
        if any(value != values[0] for value in values[1:]):
            return f"{prefix}.{name} differs between members: {', '.join(_distinct(values))}"
    return None


def _member_reason(config: TrainConfig) -> str | None:
    """Why one config alone has no population mode (None if it has one)."""
    family = config.model.family
    if family not in FAMILIES:
        return f"model.family {family!r} has no population mode; allowed: {', '.join(FAMILIES)}"
    if config.data.name not in DATA_NAMES:
        return (
            f"data.name {config.data.name!r} has no population mode (a user DataModule's "
            f"batches cannot be shared); allowed: {', '.join(DATA_NAMES)}"
        )
    if config.train.precision not in PRECISIONS:
        return (
            f"train.precision {config.train.precision!r} has no population mode (fp16 loss "
            f"scaling would skip every member's step when one overflows); allowed: "
            f"{', '.join(PRECISIONS)}"
        )
    devices = config.train.devices
    one_list = isinstance(devices, list) and len(devices) == 1
    if not one_list and devices not in _ALLOWED_DEVICES:
        return (
            f"train.devices {devices!r}: a population trains on one device; allowed: 1, auto "
            "or a list of one device id"
        )
    if family == "rnn" and config.model.vocab_size is not None:
        return (
            "model.vocab_size (a token embedding) has no population mode for model.family rnn; "
            "allowed: null (feature sequences)"
        )
    monitor = config.regularization.early_stopping.monitor
    allowed = monitors_for(config)
    if monitor not in allowed:
        return (
            f"regularization.early_stopping.monitor {monitor!r} is not logged by a population; "
            f"allowed: {', '.join(allowed)}"
        )
    return None


def population_support(configs: Sequence[TrainConfig]) -> str | None:
    """``None`` if ``configs`` can train as one population, else a message saying why not.

    The message names the field and, where the field has a fixed set, the allowed values, e.g.
    ``model.family 'transformer' has no population mode; allowed: mlp, cnn, rnn`` or
    ``regularization.dropout.kind differs between members: standard, gaussian; ...``.

    Example:
        >>> a = TrainConfig.from_dict({"regularization": {"dropout": {"hidden_rate": 0.1}}})
        >>> b = a.with_overrides({"regularization.dropout.hidden_rate": 0.5, "train.seed": 3})
        >>> population_support([a, b]) is None
        True
        >>> population_support([a, a.with_overrides({"model.hidden": [8]})])[:39]
        'model.hidden differs between members: ['
    """
    if not configs:
        return "no configs: a population needs at least one member"
    for config in configs:
        reason = _member_reason(config)
        if reason is not None:
            return reason
    if len(configs) == 1:
        return None
    for section in ("data", "model"):
        dumps = [getattr(c, section).model_dump(mode="json") for c in configs]
        reason = _first_difference(dumps, section)
        if reason is not None:
            return f"{reason}; {_VARY_NOTE}"
    train = [c.train.model_dump(mode="json") for c in configs]
    reason = _first_difference(train, "train", skip=VARYING_TRAIN)
    if reason is not None:
        return f"{reason}; {_VARY_NOTE}"
    optimizers = [c.train.optimizer for c in configs]
    if len(set(optimizers)) > 1 and not set(optimizers) <= set(_ADAM_LIKE):
        return (
            f"train.optimizer differs between members: {', '.join(_distinct(optimizers))}; "
            f"members may mix only {' and '.join(_ADAM_LIKE)} (the same update in droptune)"
        )
    kinds = [c.regularization.dropout.kind for c in configs]
    if len(set(kinds)) > 1:
        return (
            f"regularization.dropout.kind differs between members: {', '.join(_distinct(kinds))}"
            "; a population shares one dropout kind (group the trials by kind)"
        )
    if kinds[0] == "dropblock" and configs[0].model.family == "cnn":
        sizes = [c.regularization.dropout.block_size for c in configs]
        if len(set(sizes)) > 1:
            return (
                "regularization.dropout.block_size differs between members: "
                f"{', '.join(_distinct(sizes))}; a dropblock population shares one block size"
            )
    return None
