"""Study runner: YAML specs, the conditional search space, the objective, workers and runs.

The names below are imported on first use (PEP 562): the objective and the worker need
PyTorch Lightning, which commands that only read a study (``droptune status``, ``best``,
``run``'s own process) never import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from droptune._lazy import lazy_exports


if TYPE_CHECKING:
    from droptune.study.objective import Objective
    from droptune.study.objective import PruningCallback
    from droptune.study.objective import trial_seed
    from droptune.study.runner import create_study
    from droptune.study.runner import run_study
    from droptune.study.spec import StudySpec
    from droptune.study.spec import load_spec
    from droptune.study.spec import spec_from_dict
    from droptune.study.worker import run_worker

if not TYPE_CHECKING:  # mypy sees the imports above, and flags a misspelled name
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "Objective": "droptune.study.objective",
            "PruningCallback": "droptune.study.objective",
            "trial_seed": "droptune.study.objective",
            "create_study": "droptune.study.runner",
            "run_study": "droptune.study.runner",
            "StudySpec": "droptune.study.spec",
            "load_spec": "droptune.study.spec",
            "spec_from_dict": "droptune.study.spec",
            "run_worker": "droptune.study.worker",
        },
    )


__all__ = [
    "Objective",
    "PruningCallback",
    "StudySpec",
    "create_study",
    "load_spec",
    "run_study",
    "run_worker",
    "spec_from_dict",
    "trial_seed",
]
