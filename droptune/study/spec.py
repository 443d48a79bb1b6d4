"""Study specs: the YAML a user writes in ``studies/``, parsed and validated into a frozen object.

Top-level sections: ``study``, ``data``, ``model``, ``train``, ``regularization``, ``search``,
``sampler``, ``pruner``, ``storage``, ``tracking``, ``execution``, ``n_trials``, ``timeout``.
The fixed part (data, model, train, regularization) is a :class:`~droptune.config.TrainConfig`;
``search`` maps dotted config paths to distributions. Everything is checked here, before any
storage is touched: every error is a :class:`~droptune.exceptions.SpecError` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from pathlib import Path
import re
from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import field_validator
from pydantic import model_validator

from droptune._validation import StrictModel
from droptune._validation import check_document_size
from droptune._validation import short_repr
from droptune._validation import validate_model
from droptune.config import TrainConfig
from droptune.config import load_yaml_mapping
from droptune.config import why_not_a_file
from droptune.exceptions import ConfigError
from droptune.exceptions import SpecError
from droptune.records import OVERRIDES_ATTR
from droptune.records import SEED_ATTR
from droptune.records import SPEC_ATTR
from droptune.storage import STUDY_NAME_PATTERN


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
#: The most points a grid search may have (Optuna's GridSampler lists every combination).
MAX_GRID_POINTS = 1_000_000


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
                        f"got {short_repr(value)}"
                    )
                if isinstance(value, int) and abs(value) > 2**63 - 1:
                    # Samplers compute with choices as floats; storages keep 64-bit integers.
                    raise ValueError(
                        f"@choices: an integer choice must fit in 64 bits, got {short_repr(value)}"
                    )
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (a range) or choices (a list)")
        for name in ("low", "high", "step"):
            bound = getattr(self, name)
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"@{name}: must be a finite number, got {bound}")
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
        if self.type == "int" and self.step is not None and self.step != int(self.step):
            raise ValueError(f"@step: an int range needs an integer step, got {self.step}")
        return self

    def grid_size(self) -> int:
        """How many points a grid search visits on this dimension."""
        if self.choices is not None:
            return len(self.choices)
        assert self.low is not None and self.high is not None
        count = (self.high - self.low) / (self.step or 1)
        return int(count) + 1 if math.isfinite(count) and count < 2**62 else 2**62

    @property
    def is_categorical(self) -> bool:
        return self.choices is not None

    def contains(self, value: Any) -> bool:
        """Whether a trial of this dimension can take ``value`` (a choice, or a number in the
        range on its step)."""
        if self.choices is not None:
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        assert self.low is not None and self.high is not None
        if self.type == "int" and value != int(value):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return abs(steps - round(steps)) < 1e-9

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

    name: str
    metric: str | None = None
    direction: Literal["minimize", "maximize"] | None = None
    metrics: list[str] | None = None
    directions: list[Literal["minimize", "maximize"]] | None = None
    seed: int = 0
    #: Run the spec's fixed configuration as the study's first trial (Optuna's
    #: ``enqueue_trial``), so that the best trial is never worse on validation than the
    #: defaults and reports can compare tuned with default.
    baseline: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(STUDY_NAME_PATTERN, value):
            raise ValueError(
                "not a study name; use 1-200 letters, digits, '_', '.' or '-', starting with "
                "a letter or digit (it names the folder runs/<study>/)"
            )
        return value

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
    # NumPy seeds are 32-bit (each trial's stream is derived from it and the trial number).
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    n_startup_trials: int | None = Field(default=None, ge=0)


class PrunerSection(StrictModel):
    name: Literal["median", "asha", "successive_halving", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(default=5, ge=0)
    n_warmup_steps: int = Field(default=2, ge=0)
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)


class ConfirmSection(StrictModel):
    """``confirm``: at the end of ``run``, re-train the ``top_k`` best configs with ``seeds``
    seeds each and choose the best by the mean (``droptune confirm`` does it on demand)."""

    top_k: int = Field(default=5, ge=1, le=1000)
    seeds: int = Field(default=5, ge=1, le=1000)


class StartFromStudy(StrictModel):
    """``start_from.study``: the best ``top_k`` COMPLETE trials of another study."""

    name: str
    #: Its storage (default ``sqlite:///runs/<name>/droptune.db``, as every command's).
    storage: str | None = None
    top_k: int = Field(default=5, ge=1, le=1000)


class StartFromSection(StrictModel):
    """``start_from``: configs to try first, enqueued after the baseline when the study is
    created (Optuna's ``enqueue_trial``, Ray Tune's ``points_to_evaluate``): explicit
    ``{search path: value}`` sets and/or the top trials of another study. A value this
    study's search space cannot take is left to the sampler."""

    params: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    study: StartFromStudy | None = None


class TrackingSection(StrictModel):
    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    #: Each epoch's metrics on the trial's run while it trains (else only when it ends).
    live: bool = True


class ExecutionSection(StrictModel):
    workers: int = Field(default=1, ge=0)
    devices: str = "auto"
    per_device: int = Field(default=1, ge=1)
    population: int | None = Field(default=None, ge=1)
    #: How a population's members get their initial weights: ``exact`` (each member starts
    #: from the weights a single run of its config and seed starts from: one CPU
    #: initialisation per member, ~10 ms per 1.8 M parameters) or ``fast`` (the same
    #: distributions drawn on the device at once: a different draw, equal in distribution).
    population_init: Literal["exact", "fast"] = "exact"
    heartbeat_interval: int = Field(default=10, ge=1)
    grace_period: int = Field(default=30, ge=2)
    max_consecutive_failures: int = Field(default=5, ge=1)
    #: On out-of-memory, retry the trial once at half the batch size (else it fails).
    oom_retry: bool = False

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str) -> str:
        if value in ("auto", "cpu"):
            return value
        ids = [part.strip() for part in value.split(",") if part.strip()]
        if not ids or not all(re.fullmatch(r"[0-9]+", part) for part in ids):
            raise ValueError("must be auto, cpu or GPU ids like 0,1")
        return value


#: The most trials one study may ask for (its slot table holds one row per trial).
MAX_TRIALS = 1_000_000


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
    confirm: ConfirmSection | None = None
    start_from: StartFromSection | None = None
    n_trials: int = Field(default=20, ge=1, le=MAX_TRIALS)
    timeout: float | None = Field(default=None, gt=0)
    #: The folder ``model.target`` and ``data.datamodule`` are imported from when the
    #: installed environment does not have them: relative to the spec file (default: the
    #: spec's own folder); :func:`load_spec` makes it absolute. Never the working directory.
    code_dir: str | None = None

    @property
    def base(self) -> TrainConfig:
        """The fixed part as a TrainConfig (validated when the spec was loaded)."""
        return TrainConfig.from_dict({k: getattr(self, k) for k in TRAIN_SECTIONS})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def spec_from_dict(data: Any, source: str = "spec", recorded: bool = False) -> StudySpec:
    """Validate a parsed spec; every problem is a SpecError naming its dotted path.

    ``recorded``: the spec stored with a study (read back by ``best``, ``export``, ``sync``,
    ...): the checks that depend on this machine or on rules newer than the study (the
    database driver, the tracking URI scheme, the logged metrics) are skipped, so that a study
    made elsewhere or by an earlier droptune can still be read."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    check_document_size(data, source, SpecError)
    spec = validate_model(StudySpec, data, error=SpecError)
    try:
        base = spec.base
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    from droptune.study.space import check_search_space

    check_search_space(spec, base)
    if not recorded:
        _check_metrics(spec, base)
        _check_tracking(spec)
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
    if spec.sampler.name == "grid":
        points = 1
        for path, dist in spec.search.items():
            points *= dist.grid_size()
            if points > MAX_GRID_POINTS:
                raise SpecError(
                    f"search.{path}: the grid has more than {MAX_GRID_POINTS} points; use a "
                    "larger step, fewer choices or another sampler"
                )
    if spec.confirm is not None and len(spec.study.objectives) > 1:
        raise SpecError(
            "confirm: ranks configs by one objective; a multi-objective study (study.metrics) "
            "cannot be confirmed"
        )
    if spec.storage is not None and not recorded:
        from droptune.storage import check_url

        check_url(spec.storage, "storage")
    if spec.start_from is not None:
        _check_start_from(spec, recorded)
    return spec


def _check_start_from(spec: StudySpec, recorded: bool) -> None:
    """Every explicit config names search paths with values their distributions take; a
    source study is single-objective like this one, and its name and storage are usable."""
    start = spec.start_from
    assert start is not None
    if len(start.params) + int(spec.study.baseline) > spec.n_trials:
        raise SpecError(
            f"start_from.params: {len(start.params)} configs"
            f"{' and the baseline' if spec.study.baseline else ''} do not fit in n_trials "
            f"{spec.n_trials}; give fewer or raise n_trials"
        )
    for i, params in enumerate(start.params):
        field = f"start_from.params[{i}]"
        if not params:
            raise SpecError(f"{field}: an empty config; give {{search path: value}} pairs")
        for path, value in params.items():
            if path not in spec.search:
                raise SpecError(
                    f"{field}: {path!r} is not searched; searched paths: "
                    f"{', '.join(spec.search) or 'none'}"
                )
            if not spec.search[path].contains(value):
                raise SpecError(
                    f"{field}: {path}={short_repr(value)} is outside its search distribution"
                )
    if start.study is not None:
        from droptune.storage import check_study_name
        from droptune.storage import check_url

        check_study_name(start.study.name, "start_from.study.name")
        if start.study.storage is not None and not recorded:
            check_url(start.study.storage, "start_from.study.storage")
        if len(spec.study.objectives) > 1:
            raise SpecError(
                "start_from.study: the top trials of a study rank by one objective; this "
                "study has several (study.metrics)"
            )


def _check_tracking(spec: StudySpec) -> None:
    if spec.tracking.uri is not None:
        from droptune.tracking._client import check_tracking_uri

        check_tracking_uri(spec.tracking.uri, "tracking.uri")


#: What droptune's own modules log every epoch (and derive), by task.
_LOGGED = {
    "classification": ("train_loss", "train_acc", "val_loss", "val_acc"),
    "regression": ("train_loss", "val_loss", "val_rmse"),
}


def _check_metrics(spec: StudySpec, base: TrainConfig) -> None:
    """Every objective is a metric the model logs. A user's own LightningModule or
    DataModule may log anything, so only droptune's own modules on its own data are known."""
    if base.model.family == "custom" or base.data.name == "datamodule":
        return
    logged = [*_LOGGED[base.data.task], "val_train_gap", "lr", "epoch_time"]
    for metric in spec.study.objectives:
        if metric not in logged:
            field = "study.metric" if spec.study.metrics is None else "study.metrics"
            raise SpecError(
                f"{field}: {metric!r} is never logged by model.family {base.model.family!r} "
                f"on {base.data.task} data; logged: {', '.join(logged)}"
            )


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec YAML file (safe loader only), and import the user classes
    it names (``data.datamodule``, ``model.target``: nothing else in a spec is code).

    Raises:
        SpecError: The file is missing, not valid YAML, any field is invalid, or a user class
            does not import.
    """
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"spec file {str(file)!r} {why_not_a_file(file)}")
    try:
        data = load_yaml_mapping(file.read_text(), what=str(file))
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    except UnicodeDecodeError:
        raise SpecError(f"spec file {str(file)!r} is not UTF-8 text") from None
    spec = spec_from_dict(data, str(file))
    _check_sampler_installed(spec)
    if names_user_code(spec.base):
        spec = spec.model_copy(update={"code_dir": str(code_folder(file, spec.code_dir))})
    _check_user_code(spec)
    try:
        check_data_source(spec.base.data)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    return spec


def check_data_source(data: Any) -> None:
    """Open the data a config names where that is cheap and decisive, so that a file every
    trial would fail on is an error before anything is created: a CSV file is read and its
    columns and values checked (ConfigError naming the field otherwise)."""
    if data.name == "csv":
        from droptune.data import load_csv

        load_csv(data.path, data.target, data.task)


#: Samplers that need a package droptune does not depend on.
_SAMPLER_PACKAGES = {"cmaes": "cmaes", "gp": "scipy", "qmc": "scipy"}


def _import(path: str, field: str, roots: Sequence[str]) -> Any:
    from droptune.data._build import import_object

    try:
        return import_object(path, field, roots)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    except (Exception, SystemExit) as exc:  # the user's module failed while being imported
        raise SpecError(
            f"{field}: importing {path!r} failed: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None


def _check_sampler_installed(spec: StudySpec) -> None:
    """Optuna imports these packages only when the sampler first samples (every trial after
    the first would fail): refuse the spec instead."""
    import importlib.util

    package = _SAMPLER_PACKAGES.get(spec.sampler.name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise SpecError(
            f"sampler.name: {spec.sampler.name} needs the {package!r} package, which is not "
            f"installed (pip install {package}); or use another sampler such as tpe or random"
        )


def code_folder(file: Path, code_dir: Any) -> Path:
    """The absolute folder user code is imported from for the spec or config ``file``:
    ``code_dir`` relative to the file's folder (default: that folder)."""
    if code_dir is not None and not isinstance(code_dir, str):
        raise SpecError(f"code_dir: must be a folder path, got {short_repr(code_dir)}")
    folder = (file.parent / (code_dir or ".")).resolve()
    if not folder.is_dir():
        raise SpecError(
            f"code_dir: {code_dir!r} (relative to {str(file)!r}) is not a folder: {str(folder)!r}"
        )
    return folder


def names_user_code(config: TrainConfig) -> bool:
    """Whether a config names code of the user's to import (``model.target`` of the custom
    family, ``data.datamodule``)."""
    return (config.data.name == "datamodule" and config.data.datamodule is not None) or (
        config.model.family == "custom" and config.model.target is not None
    )


def _check_user_code(spec: StudySpec) -> None:
    """The user code of a spec, imported from the environment or ``spec.code_dir``."""
    roots = [spec.code_dir] if spec.code_dir and Path(spec.code_dir).is_dir() else []
    import_user_code(spec.base, roots)


def import_user_code(config: TrainConfig, roots: Sequence[str] = ()) -> None:
    """Import the user classes a config names (the only code a spec or config can name: its
    import paths) from the installed environment or ``roots`` (the spec's folder), so that a
    bad one is a SpecError before any study is created, not a failed trial, and so that a
    path to any other callable (``os:system``) is never called with the config's kwargs.
    The module's top-level code runs when it is imported: it is the user's code, by design.
    Lightning is imported only for a config that names user code (reading a study never
    needs it)."""
    base = config
    checks: list[tuple[str, str, type, str]] = []
    if base.data.name == "datamodule" and base.data.datamodule is not None:
        import pytorch_lightning as pl

        checks.append(
            (
                base.data.datamodule,
                "data.datamodule",
                pl.LightningDataModule,
                "pytorch_lightning.LightningDataModule",
            )
        )
    if base.model.family == "custom" and base.model.target is not None:
        from torch import nn

        checks.append(
            (
                base.model.target,
                "model.target",
                nn.Module,
                "torch.nn.Module (or pytorch_lightning.LightningModule)",
            )
        )
    for path, field, expected, what in checks:
        obj = _import(path, field, roots)
        if not (isinstance(obj, type) and issubclass(obj, expected)):
            kind = f"class {obj.__name__}" if isinstance(obj, type) else type(obj).__name__
            raise SpecError(f"{field}: {path!r} is a {kind}, not a subclass of {what}")


def trial_config(study: Any, trial: Any) -> TrainConfig:
    """The full TrainConfig one trial trained (spec defaults + its params + its seed)."""
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise ConfigError(
            f"study {study.study_name!r} was not created by droptune (no {SPEC_ATTR} attribute)"
        )
    base = spec_from_dict(raw, recorded=True).base
    overrides: dict[str, Any] = dict(trial.params)
    seed = trial.user_attrs.get(SEED_ATTR)
    if seed is not None:
        overrides["train.seed"] = int(seed)
    # What the trial changed itself, e.g. a halved batch size after running out of memory.
    overrides.update(trial.user_attrs.get(OVERRIDES_ATTR) or {})
    return base.with_overrides(overrides)
