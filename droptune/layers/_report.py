"""What :func:`droptune.apply` did to a model: one :class:`Change` per site, and notes."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any


__all__ = ["ApplyReport", "Change"]


@dataclass(frozen=True)
class Change:
    """One modification: the module path, its site, the module (or setting) before/after, and
    what will actually happen there: the kind and rate in effect, and a note where it is not
    plain (a rate the library reads itself, a depth-scaled rate, a module never reached)."""

    path: str
    site: str
    before: str
    after: str
    kind: str = ""
    rate: float | None = None
    note: str = ""


@dataclass
class ApplyReport:
    """What :func:`apply` changed, in model order, and what it noticed but left alone."""

    changes: list[Change]
    #: Model-level remarks: a trace that failed, dropout-like modules apply does not know.
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Any:
        return iter(self.changes)

    def paths(self) -> list[str]:
        """The module paths that changed."""
        return [c.path for c in self.changes]

    def sites(self) -> dict[str, str]:
        """``{path: site}`` of every change."""
        return {c.path: c.site for c in self.changes}

    def __str__(self) -> str:
        if not self.changes:
            lines = ["droptune.apply: no changes (the model has no dropout sites)"]
        else:
            width = max(len(c.path) for c in self.changes)
            lines = [f"{'module':<{width}}  {'site':<9}  before -> after"]
            for c in self.changes:
                note = f"  # {c.note}" if c.note else ""
                lines.append(f"{c.path:<{width}}  {c.site:<9}  {c.before} -> {c.after}{note}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
