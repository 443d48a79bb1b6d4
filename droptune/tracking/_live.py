"""Per-epoch metrics of running trials on their MLflow runs, while they train.

A trial's run gets every epoch's row (validation and training metrics, learning rate, epoch
time) shortly after the epoch, so the MLflow UI shows a long trial's curves while it runs; the
trial's end then logs only what is missing (its objective value on the last step). The rows go
through the worker's background writer, so training never waits for MLflow; a population round
batches them — every member's pending epochs in one ``log_batch`` per member at most every
``every_s`` seconds — so that P runs cost P writes per interval, not per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
import time
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from droptune.tracking._study import StudyTracking
    from droptune.tracking._writer import TrackingWriter

__all__ = ["LiveMetrics"]

#: Epoch rows as ``(step, {metric: value})``.
Rows = list[tuple[int, dict[str, float]]]

#: A population round's interval between writes of its members' epochs.
POPULATION_EVERY_S = 10.0


class LiveMetrics:
    """Collects epoch rows of running trials and hands them to the writer.

    ``run_id`` of :meth:`add` is a callable, read on the writer's thread when the rows are
    written: a population's runs are created by an earlier job on that thread.
    """

    def __init__(
        self, tracking: StudyTracking, writer: TrackingWriter, every_s: float = 0.0
    ) -> None:
        self.tracking, self.writer, self.every_s = tracking, writer, every_s
        self._pending: dict[
            int, tuple[Callable[[], str | None], list[tuple[int, dict[str, float]]]]
        ]
        self._pending = {}
        self._last = time.monotonic()

    def add(
        self, number: int, run_id: Callable[[], str | None], step: int, row: dict[str, float]
    ) -> None:
        """Epoch ``step``'s ``row`` of trial ``number``; written now or at the next interval."""
        self._pending.setdefault(number, (run_id, []))[1].append((step, dict(row)))
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Hand every pending row to the writer."""
        pending, self._pending = self._pending, {}
        self._last = time.monotonic()
        if not pending:
            return
        tracking = self.tracking

        def job() -> None:
            for number, (run_id, rows) in pending.items():
                resolved = run_id()
                if resolved:
                    tracking.log_epochs(number, resolved, rows)

        self.writer.submit(job)
