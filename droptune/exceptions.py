"""droptune's exception hierarchy.

Every error droptune raises on purpose is a :class:`DroptuneError`, so callers (and the CLI,
which maps them to exit code 2) can catch one class. Messages state the rule, the value received
and, where there is one, what to do instead.
"""

from __future__ import annotations


__all__ = [
    "ConfigError",
    "DroptuneError",
    "InputShapeError",
    "SpecError",
    "StorageError",
    "TrackingError",
]


class DroptuneError(Exception):
    """Base class of every error droptune raises on purpose."""


class ConfigError(DroptuneError, ValueError):
    """A configuration value is invalid (a rate out of range, an unknown kind, a bad field).

    The message names the field (a dotted path such as ``regularization.dropout.input_rate``),
    the rule it breaks and the value received.
    """


class SpecError(ConfigError):
    """A study spec (YAML) is invalid: bad syntax, unknown section or key, bad search space."""


class InputShapeError(DroptuneError, ValueError):
    """A layer received a tensor whose shape it cannot handle (e.g. a 2-D input to spatial)."""


class StorageError(DroptuneError):
    """The Optuna storage cannot be reached or used."""


class TrackingError(DroptuneError):
    """MLflow tracking failed in a way the caller must know about."""
