"""Lazy package exports (PEP 562): a package names what it exports and where it lives, and
the module is imported on first use. Commands that only read or watch a study (``droptune
status``, ``run``'s own process) so never import torch or PyTorch Lightning."""

from __future__ import annotations

from collections.abc import Callable
import importlib
import sys
from typing import Any


__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name in ``where`` is imported from the
    module ``where`` gives; any other name is tried as a submodule (``droptune.layers`` after a
    plain ``import droptune``, as when the package imported it eagerly)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = where.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
