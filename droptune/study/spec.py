"""Study specs: the YAML a user writes in ``studies/``, parsed and validated into a frozen object.

Top-level sections: ``study``, ``data``, ``model``, ``train``, ``regularization``, ``search``,
``sampler``, ``pruner``, ``storage``, ``tracking``, ``execution``, ``n_trials``, ``timeout``.
The fixed part (data, model, train, regularization) is a :class:`~droptune.config.TrainConfig`;
``search`` maps dotted config paths to distributions. Everything is checked here, before any
storage is touched: every error is a :class:`~droptune.exceptions.SpecError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import model_validator

from droptune._validation import StrictModel
from droptune._validation import validate_model
from droptune.config import TrainConfig
from droptune.config import load_yaml_mapping
from droptune.exceptions import ConfigError
from droptune.exceptions import SpecError


__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "Distribution",
    "StudySpec",
    "load_spec",
    "spec_from_dict",
]

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "grid", "nsgaii")
PRUNERS = ("median", "asha", "successive_halving", "hyperband", "none")
TRAIN_SECTIONS = ("data", "model", "train", "regularization")


class Distribution(StrictModel):
    """One search dimension: ``{low, high[, log][, step][, type]}`` or ``{choices: [...]}``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Distribution:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("@choices: must not be empty")
            for value in self.choices:
                if not (value is None or isinstance(value, bool | int | float | str)):
                    raise ValueError(
                        f"@choices: each choice must be a number, string, bool or null, "
                        f"got {value!r}"
                    )
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (a range) or choices (a list)")
        if self.low > self.high:
            raise ValueError(f"@low: low <= high must hold, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"@low: must be > 0 when log is true, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("@step: cannot be combined with log: true")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(
                f"@low: an int range needs integer bounds, got {self.low}..{self.high}"
            )
        return self

    @property
    def is_categorical(self) -> bool:
        return self.choices is not None

    def candidates(self) -> list[Any]:
        """The values to check against the config: the choices, or the two bounds."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class StudySection(StrictModel):
    """``study``: name and objective(s)."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    metric: str | None = None
    direction: Literal["minimize", "maximize"] | None = None
    metrics: list[str] | None = None
    directions: list[Literal["minimize", "maximize"]] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _objectives(self) -> StudySection:
        if self.metrics is not None:
            if self.metric is not None or self.direction is not None:
                raise ValueError("give either metric/direction or metrics/directions, not both")
            if not self.metrics or self.directions is None:
                raise ValueError("@directions: metrics needs one direction per metric")
            if len(self.metrics) != len(self.directions):
                raise ValueError(
                    f"@directions: {len(self.metrics)} metrics need {len(self.metrics)} "
                    f"directions, got {len(self.directions)}"
                )
        elif self.directions is not None:
            raise ValueError("@metrics: directions needs metrics")
        return self

    @property
    def objectives(self) -> list[str]:
        if self.metrics is not None:
            return list(self.metrics)
        return [self.metric or "val_loss"]

    @property
    def study_directions(self) -> list[str]:
        if self.directions is not None:
            return list(self.directions)
        if self.direction is not None:
            return [self.direction]
        metric = self.objectives[0]
        return ["maximize" if any(k in metric for k in ("acc", "f1", "auc")) else "minimize"]


class SamplerSection(StrictModel):
    name: Literal["tpe", "random", "cmaes", "gp", "qmc", "grid", "nsgaii"] = "tpe"
    seed: int | None = None
    n_startup_trials: int | None = Field(default=None, ge=0)


class PrunerSection(StrictModel):
    name: Literal["median", "asha", "successive_halving", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(default=5, ge=0)
    n_warmup_steps: int = Field(default=2, ge=0)
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)


class TrackingSection(StrictModel):
    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None


class ExecutionSection(StrictModel):
    workers: int = Field(default=1, ge=0)
    devices: str = "auto"
    per_device: int = Field(default=1, ge=1)
    population: int | None = Field(default=None, ge=1)
    heartbeat_interval: int = Field(default=10, ge=1)
    grace_period: int = Field(default=30, ge=2)
    max_consecutive_failures: int = Field(default=5, ge=1)
    #: On out-of-memory, retry the trial once at half the batch size (else it fails).
    oom_retry: bool = False


class StudySpec(StrictModel):
    """A validated study spec. ``base`` is the fixed training config the search varies."""

    study: StudySection
    data: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    regularization: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Distribution] = Field(default_factory=dict)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    pruner: PrunerSection = Field(default_factory=PrunerSection)
    storage: str | None = None
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)
    n_trials: int = Field(default=20, ge=1)
    timeout: float | None = Field(default=None, gt=0)

    @property
    def base(self) -> TrainConfig:
        """The fixed part as a TrainConfig (validated when the spec was loaded)."""
        return TrainConfig.from_dict({k: getattr(self, k) for k in TRAIN_SECTIONS})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def spec_from_dict(data: Any, source: str = "spec") -> StudySpec:
    """Validate a parsed spec; every problem is a SpecError naming its dotted path."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    spec = validate_model(StudySpec, data, error=SpecError)
    try:
        base = spec.base
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    from droptune.study.space import check_search_space

    check_search_space(spec, base)
    if spec.sampler.name == "nsgaii" and len(spec.study.objectives) < 2:
        raise SpecError(
            "sampler.name: nsgaii is for multi-objective studies (study.metrics); "
            "single-objective samplers: tpe, random, cmaes, gp, qmc, grid"
        )
    if spec.sampler.name == "grid" and any(
        not d.is_categorical and d.step is None and d.type == "float" for d in spec.search.values()
    ):
        raise SpecError(
            "sampler.name: grid needs choices, int ranges or a step for every search dimension"
        )
    if spec.storage is not None:
        from droptune.storage import check_url

        check_url(spec.storage, "storage")
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec YAML file (safe loader only).

    Raises:
        SpecError: The file is missing, not valid YAML, or any field is invalid.
    """
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"spec file {str(file)!r} does not exist")
    try:
        data = load_yaml_mapping(file.read_text(), what=str(file))
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    except UnicodeDecodeError:
        raise SpecError(f"spec file {str(file)!r} is not UTF-8 text") from None
    return spec_from_dict(data, str(file))
