"""Search space: spec ``search`` → ``trial.suggest_*`` calls → a flat ``{config path: value}``.

Conditional rule — a parameter is sampled only where it exists:

* ``regularization.dropout.kind`` is sampled first (when searched);
* with kind ``none`` no dropout parameter is sampled (no rates, no block size);
* ``block_size`` only when the kind is ``dropblock``;
* ``conv_rate`` only for ``cnn``; ``recurrent_rate`` / ``recurrent_weight_rate`` only for
  ``rnn``; ``attention_rate`` / ``droppath_rate`` only for ``transformer``; ``embedding_rate`` for
  ``rnn``/``transformer``; a ``custom`` model may take all of them;
* the kinds a family accepts: ``spatial``/``dropblock`` need convolutions (``cnn``),
  ``variational`` needs sequences (``rnn``); element-wise kinds fit everywhere. This holds for
  the fixed ``regularization.dropout.kind`` of a spec too (when the kind is not searched).

A search path that can never apply to the spec's model family, or a kind choice the family
cannot take, is a spec error rather than a silently ignored dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from droptune.exceptions import ConfigError
from droptune.exceptions import SpecError
from droptune.kinds import DROPOUT_KINDS
from droptune.kinds import ELEMENTWISE_KINDS
from droptune.records import BASELINE_ATTR


if TYPE_CHECKING:
    import optuna

    from droptune.config import TrainConfig
    from droptune.study.spec import StudySpec

__all__ = [
    "BASELINE_ATTR",
    "FAMILY_KINDS",
    "applicable",
    "baseline_gaps",
    "baseline_params",
    "check_search_space",
    "short_name",
    "suggest",
]

KIND_PATH = "regularization.dropout.kind"

FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "mlp": ELEMENTWISE_KINDS,
    "cnn": (*ELEMENTWISE_KINDS, "spatial", "dropblock"),
    "rnn": (*ELEMENTWISE_KINDS, "variational"),
    "transformer": ELEMENTWISE_KINDS,
    "custom": (*ELEMENTWISE_KINDS, "spatial", "dropblock", "variational"),
}

_FIELD_FAMILIES: dict[str, tuple[str, ...]] = {
    "conv_rate": ("cnn", "custom"),
    "recurrent_rate": ("rnn", "custom"),
    "recurrent_weight_rate": ("rnn", "custom"),
    "attention_rate": ("transformer", "custom"),
    "droppath_rate": ("transformer", "custom"),
    "embedding_rate": ("rnn", "transformer", "custom"),
}


def _families_for(path: str) -> tuple[str, ...] | None:
    if path.startswith("regularization.dropout."):
        return _FIELD_FAMILIES.get(path.rsplit(".", 1)[1])
    return None


def applicable(path: str, family: str, kind: str) -> bool:
    """Whether ``path`` is sampled for this family once the dropout kind is known."""
    if path.startswith("regularization.dropout.") and path != KIND_PATH:
        if kind == "none":
            return False
        if path.endswith(".block_size") and kind != "dropblock":
            return False
    families = _families_for(path)
    return families is None or family in families


def _exists(tree: dict[str, Any], path: str) -> bool:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict | list)


def check_search_space(spec: StudySpec, base: TrainConfig) -> None:
    """Every search path exists, applies to the model family, and every candidate validates."""
    family = base.model.family
    full = base.model_dump(mode="json")
    allowed = FAMILY_KINDS[family]
    if KIND_PATH not in spec.search and base.regularization.dropout.kind not in allowed:
        raise SpecError(
            f"{KIND_PATH}: kind {base.regularization.dropout.kind!r} does not fit model.family "
            f"{family!r}; allowed: {', '.join(allowed)}"
        )
    for path, dist in spec.search.items():
        where = f"search.{path}"
        if not _exists(full, path):
            raise SpecError(
                f"{where}: no such config field; search paths are dotted fields of the "
                "sections data, model, train, regularization (e.g. "
                "regularization.dropout.hidden_rate)"
            )
        families = _families_for(path)
        if families is not None and family not in families:
            raise SpecError(
                f"{where}: only applies to model.family {' or '.join(families)}, not {family!r}"
            )
        if path == KIND_PATH:
            for kind in dist.candidates():
                if kind not in allowed:
                    problem = (
                        "is not a dropout kind"
                        if kind not in DROPOUT_KINDS
                        else "does not fit model.family " + repr(family)
                    )
                    raise SpecError(
                        f"{where}: kind {kind!r} {problem}; allowed: {', '.join(allowed)}"
                    )
        for value in dist.candidates():
            try:
                base.with_overrides({path: value})
            except ConfigError as exc:
                raise SpecError(f"{where}: candidate {value!r} is invalid: {exc}") from None
        missing = _missing_site(path, base)
        if missing:
            raise SpecError(f"{where}: {missing}")


def _missing_site(path: str, base: TrainConfig) -> str | None:
    """Why the model has no layer this rate could act on (None if it has one)."""
    family = base.model.family
    if path.endswith(".hidden_rate") and family == "mlp" and not base.model.hidden:
        return "model.hidden is empty: the MLP has no hidden layer for this rate to act on"
    if path.endswith(".conv_rate") and family == "cnn" and not base.model.channels:
        return "model.channels is empty: the CNN has no convolution for this rate to act on"
    return None


def _value_at(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[part]
    return node


def baseline_params(spec: StudySpec, base: TrainConfig) -> dict[str, Any]:
    """The spec's fixed configuration as trial params: for each search path that applies to
    it, its value, where the search distribution can take it. A value it cannot take (a
    ``max_norm: null`` searched as a range, a default outside the range) is left out: the
    baseline trial does not sample that path, so its config keeps the spec's value."""
    family = base.model.family
    kind = base.regularization.dropout.kind
    full = base.model_dump(mode="json")
    params: dict[str, Any] = {}
    for path, dist in spec.search.items():
        if path != KIND_PATH and not applicable(path, family, kind):
            continue
        value = _value_at(full, path)
        if dist.contains(value):
            params[path] = value
    return params


def baseline_gaps(spec: StudySpec, base: TrainConfig) -> list[str]:
    """The search paths a trial of the spec's own config would sample but the baseline trial
    cannot (their spec values lie outside the search distributions)."""
    family = base.model.family
    kind = base.regularization.dropout.kind
    taken = baseline_params(spec, base)
    return [
        path
        for path in spec.search
        if (path == KIND_PATH or applicable(path, family, kind)) and path not in taken
    ]


def suggest(trial: optuna.Trial, spec: StudySpec, base: TrainConfig) -> dict[str, Any]:
    """Ask the trial for every applicable search dimension; returns ``{config path: value}``.

    The baseline trial (:data:`BASELINE_ATTR`) asks only for the paths it was enqueued with
    (:func:`baseline_params` when the study was created); every other path keeps the spec's
    value."""
    params: dict[str, Any] = {}
    family = base.model.family
    kind = base.regularization.dropout.kind
    only = None
    if trial.user_attrs.get(BASELINE_ATTR):
        from droptune.storage import fixed_params

        only = fixed_params(trial)
    ordered = sorted(spec.search.items(), key=lambda item: item[0] != KIND_PATH)
    for path, dist in ordered:
        if path != KIND_PATH and not applicable(path, family, kind):
            continue
        if only is not None and path not in only:
            continue
        if dist.choices is not None:
            value = trial.suggest_categorical(path, dist.choices)
        elif dist.type == "int":
            assert dist.low is not None and dist.high is not None
            value = trial.suggest_int(
                path, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log
            )
        else:
            assert dist.low is not None and dist.high is not None
            value = trial.suggest_float(path, dist.low, dist.high, step=dist.step, log=dist.log)
        params[path] = value
        if path == KIND_PATH:
            kind = str(value)
    return params


def short_name(path: str) -> str:
    """A search path without the sections every reader knows: ``regularization.dropout.
    hidden_rate`` → ``hidden``, ``regularization.l2.strength`` → ``l2``,
    ``regularization.early_stopping.patience`` → ``patience``."""
    short = path.removeprefix("regularization.").removeprefix("dropout.")
    short = short.removesuffix(".strength").removesuffix("_rate")
    return short.removeprefix("early_stopping.").removeprefix("train.")
