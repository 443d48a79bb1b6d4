"""Study runner: YAML specs, the conditional search space, the objective, workers and runs."""

from droptune.study.objective import Objective
from droptune.study.objective import PruningCallback
from droptune.study.objective import trial_seed
from droptune.study.runner import create_study
from droptune.study.runner import run_study
from droptune.study.spec import StudySpec
from droptune.study.spec import load_spec
from droptune.study.spec import spec_from_dict
from droptune.study.worker import run_worker


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
