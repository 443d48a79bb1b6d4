"""Turn pydantic validation errors into droptune errors that name the dotted field path."""

from __future__ import annotations

import reprlib
from typing import Any
from typing import TypeVar

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import ValidationError

from droptune.exceptions import ConfigError


__all__ = [
    "MAX_DEPTH",
    "MAX_VALUES",
    "StrictModel",
    "check_document_size",
    "format_validation_error",
    "short_repr",
    "validate_model",
]

M = TypeVar("M", bound=BaseModel)

#: Limits of a parsed document (a spec or config): values once YAML aliases are expanded, and
#: nesting depth. A real spec has a few hundred values and 5 levels; an alias bomb ("billion
#: laughs") or a recursive alias would otherwise expand in validation and error messages.
MAX_VALUES = 100_000
MAX_DEPTH = 50

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 120
_repr.maxother = 120
_repr.maxlong = 60
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_repr, _name, 8)


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few hundred characters, in time bounded whatever ``value`` is
    (a huge, deeply nested or self-referencing structure)."""
    try:
        return _repr.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def check_document_size(data: Any, what: str, error: type[ConfigError] = ConfigError) -> None:
    """Refuse a parsed document with more than :data:`MAX_VALUES` values (counting every use
    of a YAML alias) or nested deeper than :data:`MAX_DEPTH`, or with a NUL character in a
    string (every path and URL API refuses it with a bare ValueError); the walk stops at the
    limit."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    count = 0
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise error(
                f"{what}: too large: more than {MAX_VALUES} values once YAML aliases are "
                "expanded (an alias bomb?)"
            )
        if depth > MAX_DEPTH:
            raise error(
                f"{what}: nested too deeply: more than {MAX_DEPTH} levels (or a recursive "
                "YAML alias)"
            )
        if isinstance(node, str) and "\x00" in node:
            raise error(
                f"{path or what}: holds a NUL character ({short_repr(node)}): no path, URL or "
                "name may contain one"
            )
        if isinstance(node, dict):
            stack.extend(
                (value, depth + 1, f"{path}.{key}" if path else str(key))
                for key, value in node.items()
            )
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend((value, depth + 1, f"{path}[{i}]") for i, value in enumerate(node))


class StrictModel(BaseModel):
    """Base of every validated config object: unknown keys and wrong types are errors."""

    # allow_inf_nan: a non-finite number (``lr: .inf``) fails every trial; refuse it here.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, validate_default=True, allow_inf_nan=False
    )


def _field_names(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys allowed at ``loc`` inside ``model`` (None if the walk leaves pydantic models)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        # Optional[Model] / Model | None: take the model member.
        for arg in getattr(current, "__args__", ()):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _message(error: Any, model: type[BaseModel]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _field_names(model, tuple(error["loc"][:-1]))
        return "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
    if kind == "missing":
        return "is required"
    bounds = {
        "less_than": f"must be < {ctx.get('lt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "greater_than": f"must be > {ctx.get('gt')}",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
    }
    if kind in bounds:
        return bounds[kind]
    msg = str(error["msg"])
    for prefix, replacement in (
        ("Value error, ", ""),
        ("Assertion failed, ", ""),
        ("Input should be", "must be"),
    ):
        if msg.startswith(prefix):
            msg = replacement + msg[len(prefix) :]
    return msg.strip()


def _join(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per error: ``path: rule, got value``.

    A validator may point at a field below the model it validates by starting its message with
    ``@<relative.path>: ``; the path is then extended and the offending value taken from there.
    """
    lines = []
    for error in exc.errors():
        loc: list[str | int] = [prefix] if prefix else []
        loc += list(error["loc"])
        message = _message(error, model)
        show_input = error["type"] not in ("extra_forbidden", "missing")
        if message.startswith("@") and ": " in message:
            extra, _, message = message[1:].partition(": ")
            loc += extra.split(".")
            show_input = False
        text = f"{_join(loc) or '<root>'}: {message}"
        if show_input:
            text += f", got {short_repr(error['input'])}"
        lines.append(text)
    return "\n".join(lines)


def validate_model(
    model: type[M], data: Any, prefix: str = "", error: type[ConfigError] = ConfigError
) -> M:
    """``model.model_validate(data)`` raising ``error`` with dotted paths instead of pydantic's."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(exc, model, prefix)) from None
