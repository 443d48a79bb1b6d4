"""Turn pydantic validation errors into droptune errors that name the dotted field path."""

from __future__ import annotations

from typing import Any
from typing import TypeVar

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import ValidationError

from droptune.exceptions import ConfigError


__all__ = ["StrictModel", "format_validation_error", "validate_model"]

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every validated config object: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


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
            text += f", got {error['input']!r}"
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
