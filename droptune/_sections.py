"""One way to read a regularization section, for every public function that takes one.

``apply`` needs the dropout section, ``param_groups`` / ``l2_penalty`` the L2 section,
``max_norm_`` the max-norm bound, the config builders the whole regularization section. Each of
them accepts, through :func:`read_section`:

* the whole section: a :class:`RegularizationConfig` or its dict form
  (``{"dropout": {...}, "l2": {...}, "max_norm": 3.0}``), from which it takes its part;
* its own part: a :class:`DropoutConfig` / :class:`L2Config` or its dict form
  (``{"kind": "standard", "hidden_rate": 0.3}``, ``{"strength": 1e-4, "mode": "decoupled"}``);
* the documented shorthand: a bare number for L2 (the strength λ; also ``l2: 1.0e-4`` in YAML,
  expanded by :class:`RegularizationConfig` itself) and for max-norm (the bound c), ``None`` for
  "the defaults" (max-norm ``None`` is off).

Whatever the form, the values are validated by the same pydantic models as a YAML spec, so a bad
value is a :class:`ConfigError` naming the dotted field (``regularization.l2.strength: must be
>= 0.0, got -1``) — never an ``AttributeError`` from deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Literal
from typing import overload

from pydantic import BaseModel

from droptune._validation import short_repr
from droptune.config import DropoutConfig
from droptune.config import L2Config
from droptune.config import RegularizationConfig
from droptune.exceptions import ConfigError


__all__ = ["read_section"]

Section = Literal["regularization", "dropout", "l2", "max_norm"]

_OWN_CLASS: dict[str, type[BaseModel]] = {"dropout": DropoutConfig, "l2": L2Config}
_FORMS = {
    "regularization": "a RegularizationConfig or its dict form",
    "dropout": "a RegularizationConfig, a DropoutConfig, or the dict form of either",
    "l2": "a RegularizationConfig, an L2Config, the dict form of either, or a strength (number)",
    "max_norm": "a RegularizationConfig or its dict form, a bound c > 0 (number), or None (off)",
}


@overload
def read_section(value: Any, section: Literal["regularization"]) -> RegularizationConfig: ...
@overload
def read_section(value: Any, section: Literal["dropout"]) -> DropoutConfig: ...
@overload
def read_section(value: Any, section: Literal["l2"]) -> L2Config: ...
@overload
def read_section(value: Any, section: Literal["max_norm"]) -> float | None: ...


def read_section(value: Any, section: Section) -> Any:
    """The validated ``section`` of ``value`` (see the module docstring for the forms).

    Raises:
        ConfigError: A value out of range, an unknown key, or a form the section does not take;
            the message names the dotted field.

    Example:
        >>> read_section({"strength": 1e-4, "mode": "coupled"}, "l2").mode
        'coupled'
        >>> read_section({"dropout": {"hidden_rate": 0.3}}, "dropout").hidden_rate
        0.3
        >>> read_section(3.0, "max_norm")
        3.0
    """
    whole = _as_whole(value, section)
    if whole is not None:
        return whole if section == "regularization" else getattr(whole, section)
    own = _OWN_CLASS.get(section)
    if own is not None and isinstance(value, own):
        # Checked again: ``model_construct`` (or a copy with ``update=``) skips validation.
        value = value.model_dump(mode="python")
    elif section == "l2" and _l2_like(value):
        value = {"strength": value.strength, "mode": value.mode}
    if value is None and section != "max_norm":
        value = {}
    # A bare number is the shorthand of l2 (the strength, expanded by RegularizationConfig
    # itself, so YAML gets it too) and of max_norm (the bound).
    shorthand = section in ("l2", "max_norm") and _is_number(value)
    off = section == "max_norm" and value is None
    if not (shorthand or off or isinstance(value, Mapping)):
        raise ConfigError(
            f"regularization.{section}: must be {_FORMS[section]}, got "
            f"{type(value).__name__} {short_repr(value)}"
        )
    return getattr(RegularizationConfig.from_dict({section: value}), section)


def _as_whole(value: Any, section: Section) -> RegularizationConfig | None:
    """``value`` read as the whole regularization section, or None when it is a part."""
    if isinstance(value, RegularizationConfig):
        return value
    if section == "regularization":
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(
                f"regularization: must be {_FORMS[section]}, got {type(value).__name__} "
                f"{short_repr(value)}"
            )
        return RegularizationConfig.from_dict(value)
    # A non-empty mapping whose keys are all section names is the whole section; any other
    # mapping is the part itself (the two sets of keys do not overlap).
    if (
        isinstance(value, Mapping)
        and value
        and set(value) <= set(RegularizationConfig.model_fields)
    ):
        return RegularizationConfig.from_dict(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _l2_like(value: Any) -> bool:
    """Not a mapping, but has ``strength`` and ``mode`` (an L2Config look-alike)."""
    return not isinstance(value, Mapping) and all(
        hasattr(value, name) for name in ("strength", "mode")
    )
