"""Population mode: P trials of one model family trained as one batched network.

``population_support(configs)`` says whether (and why not) a set of TrainConfigs can train
together; ``train_population(configs)`` trains them and returns one :class:`MemberResult` per
config; ``prepare_population(configs)`` builds (and, for a user's model, checks and trial-runs)
the population first, raising :class:`~droptune.exceptions.PopulationUnsupported` when it
cannot train as one. See ``docs/population.md``.

Names are imported on first use (PEP 562): ``population_support`` needs no torch, so
``droptune run``'s own process can say up front whether a spec trains as populations without
importing torch or PyTorch Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from droptune._lazy import lazy_exports


if TYPE_CHECKING:
    from droptune.population._functional import FunctionalPopulation
    from droptune.population._networks import PopulationNetwork
    from droptune.population._networks import build_population
    from droptune.population._support import population_support
    from droptune.population._train import MemberResult
    from droptune.population._train import OnEpoch
    from droptune.population._train import PreparedPopulation
    from droptune.population._train import prepare_population
    from droptune.population._train import train_population

if not TYPE_CHECKING:  # mypy sees the imports above, and flags a misspelled name
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "FunctionalPopulation": "droptune.population._functional",
            "PopulationNetwork": "droptune.population._networks",
            "build_population": "droptune.population._networks",
            "population_support": "droptune.population._support",
            "MemberResult": "droptune.population._train",
            "OnEpoch": "droptune.population._train",
            "PreparedPopulation": "droptune.population._train",
            "prepare_population": "droptune.population._train",
            "train_population": "droptune.population._train",
        },
    )


__all__ = [
    "FunctionalPopulation",
    "MemberResult",
    "OnEpoch",
    "PopulationNetwork",
    "PreparedPopulation",
    "build_population",
    "population_support",
    "prepare_population",
    "train_population",
]
