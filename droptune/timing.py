"""Where a trial's time goes: setup, training, storage, MLflow and the rest.

Every thread is in exactly one category at any moment (``other`` unless told) and keeps the
seconds it spent in each. A trial's objective sets the base category as it goes (:func:`phase`:
``setup`` until Lightning starts training, ``train`` until it stops); calls wrapped in
:func:`timed` (every storage call through ``droptune.storage.retry_outage``, every MLflow call
of ``StudyTracking``) count for their own category while they last and not for the one they
interrupted. The accounting is exclusive: the categories of a window add up to its wall time.
A trial's timing is the difference of two :func:`snapshot` of its thread (:func:`since`).

A population round shares its time between its members: each member records the round's
totals divided by the number of members (the MLflow writer thread's time is off the round's
path and is not in it, except the time the round waits for that thread).

Recorded on each trial as ``droptune.timing`` (seconds, written before the trial is told, so
the tell itself is not in it) and summarised by ``droptune run`` and ``droptune status``.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
import contextlib
import threading
import time
from typing import Any

from droptune.records import TIMING_ATTR


__all__ = [
    "CATEGORIES",
    "TIMING_ATTR",
    "add",
    "phase",
    "since",
    "snapshot",
    "summarize",
    "summary_line",
    "timed",
]

#: The categories, in report order.
CATEGORIES = ("setup", "train", "storage", "tracking", "other")

_LABELS = {"tracking": "MLflow"}


class _Clock(threading.local):
    def __init__(self) -> None:
        self.current = "other"
        self.since = time.perf_counter()
        self.totals = dict.fromkeys(CATEGORIES, 0.0)


_clock = _Clock()


def _switch(category: str) -> str:
    """Charge the time since the last switch to the current category; make ``category``
    current; return the one it replaced."""
    if category not in _clock.totals:
        raise ValueError(f"timing category {category!r}: allowed: {', '.join(CATEGORIES)}")
    now = time.perf_counter()
    clock = _clock
    clock.totals[clock.current] += now - clock.since
    previous, clock.current, clock.since = clock.current, category, now
    return previous


def phase(category: str) -> None:
    """Set this thread's base category (a trial's ``setup``, ``train``, ``other``)."""
    _switch(category)


@contextlib.contextmanager
def timed(category: str) -> Iterator[None]:
    """Count the block's time for ``category`` (and not for the category it interrupts)."""
    previous = _switch(category)
    try:
        yield
    finally:
        _switch(previous)


def snapshot() -> dict[str, float]:
    """This thread's seconds per category so far."""
    clock = _clock
    totals = dict(clock.totals)
    totals[clock.current] += time.perf_counter() - clock.since
    return totals


def since(start: dict[str, float], share: int = 1) -> dict[str, float]:
    """Seconds per category since ``start`` (a :func:`snapshot`), and their ``total``,
    divided by ``share`` (the members of a population round); rounded to 0.1 ms."""
    now = snapshot()
    spent = {key: max(0.0, now[key] - start.get(key, 0.0)) / share for key in CATEGORIES}
    spent["total"] = sum(spent.values())
    return {key: round(value, 4) for key, value in spent.items()}


def add(*timings: dict[str, float]) -> dict[str, float]:
    """Category-wise sum of timings (``total`` included)."""
    keys = (*CATEGORIES, "total")
    return {key: round(sum(float(t.get(key, 0.0)) for t in timings), 4) for key in keys}


def summarize(attrs: Iterable[dict[str, Any]]) -> dict[str, float] | None:
    """Mean seconds per category over the trials' user attributes that hold a timing, with
    ``trials`` (how many did); None when none does."""
    rows = [a[TIMING_ATTR] for a in attrs if isinstance(a.get(TIMING_ATTR), dict)]
    if not rows:
        return None
    keys = (*CATEGORIES, "total")
    mean = {key: sum(float(r.get(key, 0.0)) for r in rows) / len(rows) for key in keys}
    mean["trials"] = float(len(rows))
    return mean


def summary_line(attrs: Iterable[dict[str, Any]]) -> str | None:
    """``time per trial (mean of N): 1.5 s =`` and, on a second line, ``setup 12 ms · train
    1.2 s · storage ... · MLflow ... · other ...``."""
    mean = summarize(attrs)
    if mean is None:
        return None
    parts = [f"{_LABELS.get(key, key)} {_human(mean[key])}" for key in CATEGORIES]
    head = f"time per trial (mean of {int(mean['trials'])}): {_human(mean['total'])} ="
    return f"{head}\n  " + " · ".join(parts)  # two lines: each fits 80 columns


def _human(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms"
