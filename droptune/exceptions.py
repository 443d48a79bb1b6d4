"""droptune's exception hierarchy.

Every error droptune raises on purpose is a :class:`DroptuneError`, so callers (and the CLI,
which maps them to exit code 2) can catch one class. Messages state the rule, the value received
and, where there is one, what to do instead.
"""

from __future__ import annotations


__all__ = [
    "ConfigError",
    "DroptuneError",
    "DroptuneWarning",
    "InputShapeError",
    "PopulationUnsupported",
    "SpecError",
    "StorageError",
    "StorageUnreachable",
    "TrackingError",
]


class DroptuneError(Exception):
    """Base class of every error droptune raises on purpose.

    ``exit_code`` is what the command line exits with (the one mapping, read by
    :func:`droptune.cli.main`): 2 when the user's input is wrong (a spec, an option, a path, an
    unknown study), 1 when the environment failed at run time (a database down).
    """

    exit_code = 2


class ConfigError(DroptuneError, ValueError):
    """A configuration value is invalid (a rate out of range, an unknown kind, a bad field).

    The message names the field (a dotted path such as ``regularization.dropout.input_rate``),
    the rule it breaks and the value received.
    """


class SpecError(ConfigError):
    """A study spec (YAML) is invalid: bad syntax, unknown section or key, bad search space."""


class PopulationUnsupported(ConfigError):
    """These configs, or the model they build, cannot train as one population (population mode):
    the message names the module or field and the reason. Raised before any member trains;
    callers train the trials one at a time instead, so batching never fails a trial."""


class InputShapeError(DroptuneError, ValueError):
    """A layer received a tensor whose shape it cannot handle (e.g. a 2-D input to spatial)."""


class StorageError(DroptuneError):
    """The Optuna storage or study named does not exist or cannot be used as asked."""


class StorageUnreachable(StorageError):
    """The storage's database cannot be reached (down, refused, timed out): the environment
    failed, not the input (exit code 1)."""

    exit_code = 1


class TrackingError(DroptuneError):
    """MLflow tracking failed in a way the caller must know about."""


class TrackingUnreachable(TrackingError):
    """The MLflow server or tracking database cannot be reached (the environment failed at run
    time: exit code 1)."""

    exit_code = 1


class DroptuneWarning(UserWarning):
    """Something droptune worked around and the user should know about (e.g. an example
    forward that failed, so :func:`droptune.apply` decided sites from registration order)."""
