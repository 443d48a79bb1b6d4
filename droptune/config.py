"""Validated configuration objects shared by layers, models, study specs and exported configs.

``RegularizationConfig`` is the one object that YAML specs, Optuna trials, exported best configs
and :func:`droptune.apply` all use::

    regularization:
      dropout: {kind: standard, input_rate: 0.1, hidden_rate: 0.3}
      l2: {strength: 1.0e-4, mode: decoupled}
      max_norm: 3.0
      early_stopping: {patience: 5, min_delta: 0.0, monitor: val_loss}

Every field is validated where it is parsed; errors name the dotted path
(``regularization.dropout.input_rate: must be < 1.0, got 1.5``).
"""

from __future__ import annotations

from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import field_validator

from droptune._validation import StrictModel
from droptune._validation import validate_model
from droptune.layers._factory import DROPOUT_KINDS
from droptune.layers._factory import ELEMENTWISE_KINDS


__all__ = [
    "SITES",
    "DropoutConfig",
    "EarlyStoppingConfig",
    "L2Config",
    "RegularizationConfig",
]

#: Places in a network where dropout can sit; :meth:`DropoutConfig.for_site` maps each to a
#: (kind, rate) pair.
SITES = ("input", "hidden", "conv", "sequence", "attention", "residual", "embedding")

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
            raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
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

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "regularization") -> RegularizationConfig:
        """Validate a mapping (e.g. parsed YAML); errors name ``prefix.<field path>``."""
        return validate_model(cls, {} if data is None else data, prefix)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into an equal object."""
        return self.model_dump(mode="python")
