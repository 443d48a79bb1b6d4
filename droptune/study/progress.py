"""What ``droptune run`` shows while its workers train: a progress bar on a terminal, one line
per finished trial above it, and without a terminal those lines and a status line every
:data:`STATUS_EVERY_S` seconds."""

from __future__ import annotations

from collections import Counter
import subprocess
import time
from typing import TYPE_CHECKING
from typing import Any

import optuna

from droptune.records import BASELINE_ATTR
from droptune.records import DUPLICATE_ATTR
from droptune.records import EPOCHS_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.records import METRIC_ATTR
from droptune.records import PRUNED_AT_EPOCH_ATTR
from droptune.storage import trial_states
from droptune.study.space import short_name


if TYPE_CHECKING:
    from droptune.processes import SignalFlag

__all__ = ["STATUS_EVERY_S", "TRIAL_LINE_CHARS", "best_so_far", "watch"]


def best_so_far(study: optuna.Study) -> tuple[Any, dict[str, Any] | None]:
    """The best value and params so far (the Pareto front's values for several objectives)."""
    try:
        if len(study.directions) > 1:
            front = study.best_trials
            return [t.values for t in front], (front[0].params if front else None)
        return study.best_value, study.best_params
    except ValueError:
        return None, None


def watch(
    study: optuna.Study,
    procs: list[subprocess.Popen[bytes]],
    total: int,
    progress: bool,
    received: SignalFlag,
) -> None:
    """Poll the storage until every worker has exited: a progress bar on a terminal, one line
    per finished trial above it (or, without a terminal, those lines and a status line every
    :data:`STATUS_EVERY_S` seconds)."""
    from rich.console import Console
    from rich.progress import BarColumn
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress
    from rich.progress import TextColumn
    from rich.progress import TimeElapsedColumn

    console = Console(stderr=True, highlight=False)
    show = progress and console.is_terminal
    lines = _TrialLines(study, min(TRIAL_LINE_CHARS, console.width) if show else TRIAL_LINE_CHARS)
    last_status = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    ) as bar:
        task = bar.add_task(study.study_name, total=total)
        while True:
            received.check()
            alive = any(proc.poll() is None for proc in procs)
            states = trial_states(study)
            counts = Counter(states.values())
            done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
            best, _ = best_so_far(study)
            best_text = (
                "-"
                if best is None
                else (f"{best:.5g}" if isinstance(best, float) else str(best)[:30])
            )
            text = (
                f"done {counts.get('COMPLETE', 0)} pruned {counts.get('PRUNED', 0)} failed "
                f"{counts.get('FAIL', 0)} run {counts.get('RUNNING', 0)} best {best_text}"
            )
            bar.update(task, completed=min(done, total), description=text)
            if progress:
                for line in lines.new(states):
                    console.print(line, markup=False, soft_wrap=True)
                if not show and time.monotonic() - last_status >= STATUS_EVERY_S:
                    console.print(
                        f"{study.study_name}: {text} ({done}/{total})",
                        markup=False,
                        soft_wrap=True,
                    )
                    last_status = time.monotonic()
            if not alive:
                return
            for _ in range(5):
                time.sleep(0.2)
                received.check()


#: Without a terminal (CI logs, ``nohup``), a status line this often.
STATUS_EVERY_S = 30.0
#: The longest line ``run`` prints per finished trial.
TRIAL_LINE_CHARS = 100


class _TrialLines:
    """One line of at most :data:`TRIAL_LINE_CHARS` characters per trial that finished since
    the last call: number, state, value, epochs, sampled params under short names (a refused
    duplicate, which trained nothing, gets none)."""

    def __init__(self, study: optuna.Study, width: int = TRIAL_LINE_CHARS) -> None:
        self.study, self.width = study, width
        self.metric = str(study.user_attrs.get(METRIC_ATTR, "value"))
        self.seen = {
            n for n, state in trial_states(study).items() if state not in ("RUNNING", "WAITING")
        }

    def new(self, states: dict[int, str]) -> list[str]:
        """The lines of the trials that ended since the last call."""
        fresh = sorted(
            n for n, s in states.items() if s not in ("RUNNING", "WAITING") and n not in self.seen
        )
        if not fresh:
            return []
        self.seen.update(fresh)
        wanted = set(fresh)
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.number in wanted]
        return [line for t in trials if (line := self.line(t))]

    def line(self, trial: optuna.trial.FrozenTrial) -> str | None:
        attrs = trial.user_attrs
        if DUPLICATE_ATTR in attrs:
            return None
        state = trial.state.name
        head = f"#{trial.number:<4} {state:<8}"
        if state == "FAIL":
            return f"{head} {attrs.get(FAIL_REASON_ATTR, '')}"[: self.width]
        values = trial.values or []
        text = f"{head} {self.metric} " + (" ".join(f"{v:.4g}" for v in values) or "-")
        if PRUNED_AT_EPOCH_ATTR in attrs:
            text += f" ep{int(attrs[PRUNED_AT_EPOCH_ATTR]) + 1}"
        elif attrs.get(EPOCHS_ATTR) is not None:
            text += f" ep{int(attrs[EPOCHS_ATTR])}"
        if attrs.get(BASELINE_ATTR):
            text += " baseline"
        for name, param in trial.params.items():
            item = f"{short_name(name)}={_short_value(param)}"
            if len(text) + 1 + len(item) > self.width:
                break
            text = f"{text} {item}"
        return text


def _short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
