"""Population mode: P trials of one model family trained as one batched network.

``population_support(configs)`` says whether (and why not) a set of TrainConfigs can train
together; ``train_population(configs)`` trains them and returns one :class:`MemberResult` per
config. See ``docs/population.md``.
"""

from droptune.population._networks import PopulationNetwork
from droptune.population._networks import build_population
from droptune.population._support import population_support
from droptune.population._train import MemberResult
from droptune.population._train import OnEpoch
from droptune.population._train import train_population


__all__ = [
    "MemberResult",
    "OnEpoch",
    "PopulationNetwork",
    "build_population",
    "population_support",
    "train_population",
]
