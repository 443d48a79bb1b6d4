"""Validated configuration objects shared by layers, models, study specs and exported configs.

``RegularizationConfig`` is the one object that YAML specs, Optuna trials, exported best configs
and :func:`droptune.apply` all use::

    regularization:
      dropout: {kind: standard, input_rate: 0.1, hidden_rate: 0.3}
      l2: {strength: 1.0e-4, mode: decoupled}     # or the shorthand l2: 1.0e-4
      max_norm: 3.0
      early_stopping: {patience: 5, min_delta: 0.0, monitor: val_loss}

Every field is validated where it is parsed; errors name the dotted path
(``regularization.dropout.input_rate: must be < 1.0, got 1.5``).
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Annotated
from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import field_validator
from pydantic import model_validator
import yaml

from droptune._validation import StrictModel
from droptune._validation import check_document_size
from droptune._validation import validate_model
from droptune.exceptions import ConfigError
from droptune.kinds import DROPOUT_KINDS
from droptune.kinds import ELEMENTWISE_KINDS


__all__ = [
    "SITES",
    "DataConfig",
    "DropoutConfig",
    "EarlyStoppingConfig",
    "L2Config",
    "ModelConfig",
    "RegularizationConfig",
    "TrainConfig",
    "TrainSettings",
    "load_config",
]

#: Places in a network where dropout can sit; :meth:`DropoutConfig.for_site` maps each to a
#: (kind, rate) pair.
SITES = ("input", "hidden", "conv", "sequence", "attention", "residual", "embedding")
#: The most torch threads a config may ask for.
MAX_THREADS = 1024
#: The widest layer a config may ask for (a wider one only fails every trial allocating it).
MAX_WIDTH = 1 << 20
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]

_SITE_KINDS: dict[str, frozenset[str]] = {
    "input": frozenset(ELEMENTWISE_KINDS),
    "hidden": frozenset(ELEMENTWISE_KINDS),
    "conv": frozenset((*ELEMENTWISE_KINDS, "spatial", "dropblock")),
    "sequence": frozenset((*ELEMENTWISE_KINDS, "variational")),
}

_Rate = Field(default=0.0, ge=0.0, lt=1.0)


class DropoutConfig(StrictModel):
    """Dropout kind and the rate of every site.

    ``kind`` picks the family; each site uses it where it applies and ``standard`` where it does
    not (see :meth:`for_site`). ``kind: none`` turns every dropout off, whatever the rates.

    Attributes:
        kind: One of :data:`droptune.layers.DROPOUT_KINDS`.
        input_rate: Dropout on the network input (dense models).
        hidden_rate: Dropout after hidden dense layers and on recurrent layer outputs.
        conv_rate: Dropout after convolution blocks.
        recurrent_rate: Gal & Ghahramani mask on the hidden state fed back in RNNs.
        attention_rate: Dropout on attention probabilities.
        embedding_rate: Probability of dropping a whole token type from an embedding.
        weight_rate: DropConnect on the weights of ``nn.Linear`` layers.
        recurrent_weight_rate: DropConnect (AWD-LSTM weight drop) on RNN ``weight_hh``.
        droppath_rate: Stochastic depth on residual branches.
        block_size: Block side for ``dropblock``.
    """

    kind: str = "standard"
    input_rate: float = _Rate
    hidden_rate: float = _Rate
    conv_rate: float = _Rate
    recurrent_rate: float = _Rate
    attention_rate: float = _Rate
    embedding_rate: float = _Rate
    weight_rate: float = _Rate
    recurrent_weight_rate: float = _Rate
    droppath_rate: float = _Rate
    block_size: int = Field(default=3, ge=1)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in DROPOUT_KINDS:
            raise ValueError(f"must be one of {', '.join(DROPOUT_KINDS)}")
        return value

    def rate(self, name: str) -> float:
        """A rate by field name, 0 when the kind is ``none``."""
        return 0.0 if self.kind == "none" else float(getattr(self, name))

    def for_site(self, site: str) -> tuple[str, float, dict[str, Any]]:
        """The ``(kind, rate, options)`` to build with :func:`make_dropout` at ``site``.

        Example:
            >>> DropoutConfig(kind="spatial", conv_rate=0.2, hidden_rate=0.5).for_site("hidden")
            ('standard', 0.5, {})
        """
        if site not in SITES:
            raise ConfigError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
        if self.kind == "none":
            return "none", 0.0, {}
        fixed = {
            "attention": ("standard", "attention_rate"),
            "residual": ("droppath", "droppath_rate"),
            "embedding": ("embedding", "embedding_rate"),
        }
        if site in fixed:
            kind, field = fixed[site]
            return kind, self.rate(field), {}
        kind = self.kind if self.kind in _SITE_KINDS[site] else "standard"
        field = {"input": "input_rate", "conv": "conv_rate"}.get(site, "hidden_rate")
        options: dict[str, Any] = {}
        if kind == "dropblock":
            options["block_size"] = self.block_size
        elif kind == "alpha" and site == "conv":
            options["channel"] = True
        return kind, self.rate(field), options


class L2Config(StrictModel):
    """L2 regularization: strength λ and how it is applied.

    ``decoupled``: weight decay in the optimizer (AdamW-style), ``w ← w - lr·λ·w``.
    ``coupled``: the penalty ``λ·Σw²`` is added to the loss, so it flows through the gradient
    (and through Adam's normalisation). Biases and normalization parameters are never decayed.
    """

    strength: float = Field(default=0.0, ge=0.0)
    mode: Literal["decoupled", "coupled"] = "decoupled"


class EarlyStoppingConfig(StrictModel):
    """Early stopping on a validation metric (``patience: null`` turns it off)."""

    patience: int | None = Field(default=10, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)
    monitor: str = "val_loss"
    mode: Literal["min", "max", "auto"] = "auto"
    #: When early stopping is on, end training with the weights of the best epoch (the one a
    #: trial's value comes from), not those of the last one, ``patience`` epochs later (as
    #: Keras' ``restore_best_weights``).
    restore_best: bool = True

    @property
    def restores(self) -> bool:
        """Whether training ends with the best epoch's weights."""
        return self.restore_best and self.patience is not None

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        """``min`` for losses and errors, ``max`` for accuracies and scores, unless set."""
        if self.mode != "auto":
            return self.mode
        lowered = self.monitor.lower()
        return "max" if any(k in lowered for k in ("acc", "f1", "auc", "score", "r2")) else "min"


class RegularizationConfig(StrictModel):
    """Everything droptune tunes about a model's regularization.

    Example:
        >>> cfg = RegularizationConfig.from_dict({"dropout": {"hidden_rate": 0.3}})
        >>> cfg.dropout.for_site("hidden")
        ('standard', 0.3, {})
    """

    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    l2: L2Config = Field(default_factory=L2Config)
    max_norm: float | None = Field(default=None, gt=0.0)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)

    @model_validator(mode="before")
    @classmethod
    def _l2_shorthand(cls, data: Any) -> Any:
        """``l2: 1.0e-4`` means ``l2: {strength: 1.0e-4}``: the shorthand that
        :func:`droptune.param_groups` takes, accepted wherever the section is read."""
        l2 = data.get("l2") if isinstance(data, dict) else None
        if isinstance(l2, int | float) and not isinstance(l2, bool):
            return {**data, "l2": {"strength": l2}}
        return data

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "regularization") -> RegularizationConfig:
        """Validate a mapping (e.g. parsed YAML); errors name ``prefix.<field path>``."""
        return validate_model(cls, {} if data is None else data, prefix)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into an equal object."""
        return self.model_dump(mode="python")


# --------------------------------------------------------------------------------------------
# Training configuration: data + model + training settings + regularization.

_DATA_ONLY: dict[str, tuple[str, ...]] = {
    "synthetic": ("n_samples", "n_features", "n_classes", "label_noise", "teacher_hidden"),
    "csv": ("path", "target", "task"),
    "datamodule": ("datamodule", "kwargs"),
}

_MODEL_ONLY: dict[str, tuple[str, ...]] = {
    "mlp": ("hidden", "activation", "norm"),
    "cnn": ("channels", "kernel_size", "hidden", "activation", "norm"),
    "rnn": ("cell", "hidden_size", "num_layers", "bidirectional", "vocab_size", "embedding_dim"),
    "transformer": ("d_model", "heads", "depth", "ffn_mult", "vocab_size"),
    "custom": ("target", "kwargs", "loss"),
}

PositiveInt = Annotated[int, Field(ge=1)]


def _only_for(
    selector: str, value: str, owners: dict[str, tuple[str, ...]], model: StrictModel
) -> None:
    """Reject fields set to a non-default value that belong to another dataset / family."""
    for name in {n for names in owners.values() for n in names}:
        allowed = [owner for owner, names in owners.items() if name in names]
        if value in allowed or name not in model.model_fields_set:
            continue
        if getattr(model, name) != type(model).model_fields[name].get_default(
            call_default_factory=True
        ):
            raise ValueError(
                f"@{name}: only used when {selector} is {' or '.join(allowed)}, not {value!r}"
            )


def _relevant(
    model: StrictModel, selector: str, owners: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    """The model's fields without those that belong to other datasets / families."""
    value = getattr(model, selector)
    foreign = {n for names in owners.values() for n in names} - set(owners.get(value, ()))
    return {k: v for k, v in model.model_dump(mode="json").items() if k not in foreign}


class DataConfig(StrictModel):
    """Which data to train on and how to split and shape it.

    Built-in datasets: ``digits`` (scikit-learn's 8x8 digits), ``mnist1d`` (generated offline),
    ``synthetic`` (a teacher network with label noise), ``csv`` (a user's file) and
    ``datamodule`` (a user ``LightningDataModule`` given as ``package.module:Class``).
    ``layout`` shapes the inputs: ``vector`` (N, F), ``image``/``signal`` (N, 1, ...),
    ``sequence`` (N, T, F); ``auto`` picks the one the model family needs.
    """

    name: Literal["digits", "mnist1d", "synthetic", "csv", "datamodule"] = "digits"
    layout: Literal["auto", "vector", "image", "signal", "sequence"] = "auto"
    batch_size: PositiveInt = 64
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    train_subset: PositiveInt | None = None
    seed: int = 0
    on_device: bool = True
    # synthetic
    n_samples: PositiveInt = 2000
    n_features: PositiveInt = 20
    n_classes: int = Field(default=4, ge=2)
    label_noise: float = Field(default=0.1, ge=0.0, lt=1.0)
    teacher_hidden: Width = 32
    # csv
    path: str | None = None
    target: str | None = None
    task: Literal["classification", "regression"] = "classification"
    # datamodule
    datamodule: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        _only_for("data.name", self.name, _DATA_ONLY, self)
        if self.name == "csv" and (self.path is None or self.target is None):
            raise ValueError(
                "@path: data.name csv needs data.path (a file) and data.target (a column)"
            )
        if self.name == "datamodule" and not _is_import_path(self.datamodule):
            raise ValueError(
                "@datamodule: must be an import path 'package.module:Class' when data.name is "
                f"datamodule, got {self.datamodule!r}"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"@val_fraction: val_fraction + test_fraction must be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        return self


class ModelConfig(StrictModel):
    """The model family and its architecture.

    Families: ``mlp``, ``cnn`` (1-D or 2-D by the data), ``rnn`` (LSTM/GRU), ``transformer``
    and ``custom`` (the user's ``LightningModule`` or ``nn.Module`` as ``package.module:Class``).
    """

    family: Literal["mlp", "cnn", "rnn", "transformer", "custom"] = "mlp"
    hidden: list[Width] = Field(default_factory=lambda: [256, 256])
    activation: Literal["relu", "gelu", "tanh", "selu", "elu"] = "relu"
    norm: Literal["none", "batch", "layer"] = "none"
    channels: list[Width] = Field(default_factory=lambda: [32, 64])
    kernel_size: PositiveInt = 3
    cell: Literal["lstm", "gru"] = "gru"
    hidden_size: Width = 64
    num_layers: PositiveInt = 1
    bidirectional: bool = False
    vocab_size: PositiveInt | None = None
    embedding_dim: PositiveInt = 32
    d_model: Width = 64
    heads: PositiveInt = 4
    depth: PositiveInt = 2
    ffn_mult: PositiveInt = 2
    target: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    loss: Literal["auto", "cross_entropy", "mse"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        _only_for("model.family", self.family, _MODEL_ONLY, self)
        if self.family == "custom" and not _is_import_path(self.target):
            raise ValueError(
                "@target: must be an import path 'package.module:Class' when model.family is "
                f"custom, got {self.target!r}"
            )
        if self.family == "transformer" and self.d_model % self.heads:
            raise ValueError(
                f"@d_model: must be divisible by model.heads ({self.heads}), got {self.d_model}"
            )
        return self


class TrainSettings(StrictModel):
    """Optimizer and Trainer settings."""

    max_epochs: PositiveInt = 20
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | str | list[int] = 1
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "64-true"] = "32-true"
    gradient_clip: float | None = Field(default=None, gt=0.0)
    deterministic: bool = False
    #: torch's intra-op threads (bounded: torch refuses absurd counts in every trial).
    num_threads: int | None = Field(default=None, ge=1, le=MAX_THREADS)
    #: ``torch.set_float32_matmul_precision`` for float32 training: ``high`` lets CUDA matrix
    #: products use TF32 tensor cores (as Lightning's start-up hint suggests), ``medium`` bf16;
    #: null leaves torch's setting (``highest``) alone.
    matmul_precision: Literal["highest", "high", "medium"] | None = None


class TrainConfig(StrictModel):
    """Everything needed to train one model: what a trial, an exported best config and a user's
    own code all build from.

    Example:
        >>> cfg = TrainConfig.from_dict({"data": {"name": "digits"}, "model": {"hidden": [64]}})
        >>> cfg.model.family, cfg.regularization.dropout.kind
        ('mlp', 'standard')
    """

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "") -> TrainConfig:
        """Validate a mapping; errors name the dotted path of the bad field."""
        return validate_model(cls, {} if data is None else data, prefix)

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        """Parse YAML text (safe loader only) into a validated config."""
        return cls.from_dict(load_yaml_mapping(text, what="config"))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into an equal object.

        Fields that belong to other datasets or model families are left out.
        """
        return {
            "data": _relevant(self.data, "name", _DATA_ONLY),
            "model": _relevant(self.model, "family", _MODEL_ONLY),
            "train": self.train.model_dump(mode="json"),
            "regularization": self.regularization.model_dump(mode="json"),
        }

    def to_yaml(self) -> str:
        """The full config as YAML (every field, defaults included)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, flat: dict[str, Any]) -> TrainConfig:
        """A new config with dotted-path values laid over this one (trial params, CLI flags)."""
        merged = self.to_dict()
        for path, value in flat.items():
            set_path(merged, path, value)
        return TrainConfig.from_dict(merged)

    # Building belongs to the layers that own data, models and training; these methods stay
    # one release for code written against them.
    def build_datamodule(self) -> Any:
        """Deprecated: use :func:`droptune.build_datamodule` (``droptune.training``)."""
        return _deprecated("build_datamodule")(self)

    def build_module(self, datamodule: Any = None) -> Any:
        """Deprecated: use :func:`droptune.build_module` (``droptune.training``)."""
        return _deprecated("build_module")(self, datamodule)

    def build_trainer(self, **overrides: Any) -> Any:
        """Deprecated: use :func:`droptune.build_trainer` (``droptune.training``)."""
        return _deprecated("build_trainer")(self, **overrides)


def _deprecated(name: str) -> Any:
    """``droptune.training.<name>``, with the DeprecationWarning of ``TrainConfig.<name>``."""
    import warnings

    import droptune.training  # the one import up the layers (see docs/design.md)

    warnings.warn(
        f"TrainConfig.{name}() is deprecated and will be removed in droptune 0.3; use "
        f"droptune.{name}(config, ...)",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(droptune.training, name)


def _is_import_path(value: str | None) -> bool:
    if not value or value.count(":") != 1:
        return False
    module, _, attr = value.partition(":")
    return all(part.isidentifier() for part in [*module.split("."), *attr.split(".")])


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set ``tree["a"]["b"]["c"] = value`` for ``path = "a.b.c"``, creating mappings."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {part} is not a section")
        node = child
    node[leaf] = value


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a float like YAML 1.2 does (YAML 1.1, and so
    plain ``yaml.safe_load``, needs a dot: ``1.0e-4``; otherwise it is the string "1e-4").

    A scalar its constructor cannot read (``2020-13-45``, ``!!int x``, ``!!bool maybe``, an
    integer of more than 4300 digits) is a YAML error at its line, not a ValueError."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        # YAML lets the last of two equal keys win silently; a spec with both is a mistake.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:
            if isinstance(node.value, str):
                value = node.value if len(node.value) <= 40 else node.value[:37] + "..."
                what = f"{value!r} as {node.tag}"
            else:
                what = f"a {type(node).__name__} as {node.tag}"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what}: {exc}", node.start_mark
            ) from None


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_value(text: str, what: str = "value") -> Any:
    """Any YAML value, read safely (no object construction, no alias bombs): a syntax error,
    an unreadable scalar, a Python tag or a document too large is a ConfigError naming
    ``what`` (e.g. a ``--set path=value`` override)."""
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass: no objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if "constructor for the tag" in problem:
            problem += (
                "; YAML is read with the safe loader: Python objects (!!python/...) and "
                "custom tags are not allowed"
            )
        raise ConfigError(f"invalid YAML in {what}{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"invalid YAML in {what}: nested too deeply") from None
    except Exception as exc:  # PyYAML's constructors raise a few plain errors too
        raise ConfigError(f"invalid YAML in {what}: {type(exc).__name__}: {exc}") from None
    check_document_size(data, what)
    return data


def load_yaml_mapping(text: str, what: str = "document") -> dict[str, Any]:
    """Safe YAML loading (no object construction) that insists on a mapping at the top and
    reports syntax errors with their line and column."""
    data = load_yaml_value(text, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: the top level must be a mapping, got {type(data).__name__}")
    return data


#: Artifact URI schemes ``load_config`` fetches through MLflow.
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def why_not_a_file(path: Path) -> str:
    """Why ``path`` is not a file one can read, for an error message."""
    if path.is_dir():
        return "is a folder, not a YAML file"
    return "does not exist" if not path.exists() else "is not a regular file"


def load_config(source: str | Path | dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a dict or a YAML file; an MLflow artifact URI is fetched
    by :func:`droptune.export.load_config` (``droptune.load_config``)."""
    if isinstance(source, dict):
        return TrainConfig.from_dict(source)
    if isinstance(source, str) and source.startswith(MLFLOW_SCHEMES):
        from droptune.export import load_config as from_mlflow  # up the layers: docs/design.md

        return from_mlflow(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} {why_not_a_file(path)}")
    data = load_yaml_mapping(path.read_text(), what=str(path))
    data.pop("code_dir", None)  # where `droptune train` imports user code from (an export's)
    return TrainConfig.from_dict(data)
