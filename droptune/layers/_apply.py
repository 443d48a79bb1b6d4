"""``droptune.apply``: put a :class:`RegularizationConfig` into a user's own model.

The walk (:mod:`droptune.layers._sites`) finds every dropout site of the model — by structure,
by the naming conventions of the ecosystem's model libraries (Hugging Face ``transformers``,
timm, torchvision) and, with ``example_input``, by one traced forward pass — and sets the
configured kind and rate there:

* dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
  ``FeatureAlphaDropout``, droptune's own) are replaced by ``make_dropout(kind, rate)`` for their
  site (input, hidden, conv, sequence, attention);
* stochastic depth (droptune's ``DropPath``, a library's ``*DropPath`` / ``StochasticDepth``) is
  the ``residual`` site: ``droptune_rate × old_i / max(old)``, so a schedule that grew with depth
  keeps its shape; a library's module keeps its own implementation, only its rate is set;
* float rates that a library reads itself (``T5Attention.dropout``,
  ``ViTSelfAttention.attention_dropout``, ``nn.MultiheadAttention.dropout``) are set in place;
  only standard dropout can happen there, so another kind for such a site is a ConfigError that
  names it, never silently ignored;
* ``nn.LSTM``/``nn.GRU`` become :class:`VariationalLSTM`/:class:`VariationalGRU` (same
  parameters) when a recurrent rate is set, and get DropConnect on ``weight_hh`` when a
  recurrent weight rate is set;
* ``nn.Linear`` layers get DropConnect when a weight rate is set; token embeddings (not position
  or type embeddings) become a :class:`DropoutEmbedding` when an embedding rate is set.

apply never inserts dropout where the model has none: put ``nn.Dropout(0.0)`` placeholders where
you want a site tuned. A model the trace cannot run (or structure the rules do not know) is not
an error: apply warns and falls back to registration order; the report says what it did.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any
import warnings

import torch
from torch import nn

from droptune._sections import read_section
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneWarning
from droptune.layers._factory import make_dropout
from droptune.layers._recurrent import VariationalGRU
from droptune.layers._recurrent import VariationalLSTM
from droptune.layers._report import ApplyReport
from droptune.layers._report import Change
from droptune.layers._sites import Site
from droptune.layers._sites import is_aux_embedding
from droptune.layers._sites import is_dropout_module
from droptune.layers._sites import rate_attributes
from droptune.layers._sites import unrecognised
from droptune.layers._sites import walk
from droptune.layers._structured import DropoutEmbedding
from droptune.layers._trace import Trace
from droptune.layers._trace import trace
from droptune.layers._weight import DropConnect
from droptune.layers._weight import add_weight_dropout


if TYPE_CHECKING:
    from droptune.config import DropoutConfig
    from droptune.config import RegularizationConfig

__all__ = ["ApplyReport", "Change", "apply"]

logger = logging.getLogger(__name__)

_RNN = (nn.LSTM, nn.GRU)
# Attribute set on an RNN whose between-layer dropout is a site (its original dropout was > 0).
_LAYER_SITE = "_droptune_layer_dropout"
# Attribute set on a stochastic-depth site: its share of the model's largest rate, remembered so
# that an apply with droppath_rate 0 (or kind none) does not erase the depth schedule.
_DEPTH_RATIO = "_droptune_depth_ratio"
#: ``sites={path: KEEP}`` leaves a site as it is.
KEEP = "keep"


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module reused at several places, like T5's
    shared embedding or one ``self.dropout`` called twice, is replaced everywhere)."""
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def _trace_or_warn(model: nn.Module, example_input: Any, notes: list[str]) -> Trace | None:
    if example_input is None:
        return None
    modules = dict(model.named_modules())
    watch: dict[str, tuple[str, ...]] = {
        path: ("p",) for path, m in modules.items() if is_dropout_module(m)
    }
    for path, names in rate_attributes(modules).items():
        watch[path] = (*watch.get(path, ()), *names)
    try:
        return trace(model, example_input, watch)
    except Exception as exc:
        message = (
            f"droptune.apply: the example forward failed ({type(exc).__name__}: {exc}); sites "
            "are decided from registration order instead"
        )
        warnings.warn(message, DroptuneWarning, stacklevel=3)
        notes.append(message)
        return None


def _current_rate(model: nn.Module, site: Site) -> float:
    holder = model.get_submodule(site.owner if site.form == "attribute" else site.path)
    value = getattr(holder, "p" if site.form == "module" else site.attribute)
    return float(value.max()) if isinstance(value, torch.Tensor) else float(value)


def _depth_ratios(model: nn.Module, residual: list[Site]) -> dict[str, float]:
    """Each stochastic-depth site's share of the largest rate (remembered from the first apply)."""
    rates = {s.path: _current_rate(model, s) for s in residual}
    top = max(rates.values(), default=0.0)
    ratios = {}
    for s in residual:
        holder = model.get_submodule(s.owner if s.form == "attribute" else s.path)
        key = _DEPTH_RATIO if s.form != "attribute" else f"{_DEPTH_RATIO}_{s.attribute}"
        stored = getattr(holder, key, None)
        ratios[s.path] = stored if stored is not None else (rates[s.path] / top if top else 1.0)
    return ratios


def _plan(
    found: list[Site], sites: dict[str, str], drop: DropoutConfig, ratios: dict[str, float]
) -> list[tuple[Site, str, str, float, dict[str, Any]]]:
    """``(site, site name, kind, rate, options)`` for every site to set, checked first."""
    plan = []
    options: dict[str, Any]
    for s in found:
        name = sites.get(s.path, s.site)
        if name == KEEP:
            continue
        if name == "residual":
            kind, rate, options = "droppath", drop.rate("droppath_rate") * ratios[s.path], {}
        else:
            kind, rate, options = drop.for_site(name)
        if kind == "variational":
            options["batch_first"] = s.batch_first
        if s.reads_only and kind not in ("standard", "none", "droppath"):
            raise ConfigError(
                f"regularization.dropout.kind: {kind!r} cannot take effect at {s.path!r} (site "
                f"{name}): the model reads its rate itself and applies standard dropout there "
                f"({s.note}). Use kind standard or none, or pass sites={{{s.path!r}: 'keep'}} "
                "to leave it as it is"
            )
        plan.append((s, name, kind, rate, options))
    return plan


def apply(
    model: nn.Module,
    regularization: RegularizationConfig | DropoutConfig | dict[str, Any],
    *,
    example_input: Any = None,
    sites: dict[str, str] | None = None,
) -> tuple[nn.Module, ApplyReport]:
    """Set the configured dropout kinds and rates on a user's own model, in place.

    Args:
        model: Any ``nn.Module`` or ``LightningModule`` (a Hugging Face model built from its
            config included).
        regularization: The regularization section in any form: a
            :class:`~droptune.config.RegularizationConfig`, a
            :class:`~droptune.config.DropoutConfig`, or the dict form of either.
        example_input: Optional input batch: a tensor, a tuple of positional inputs, or a dict
            of keyword inputs (``model(**example_input)``, e.g. a tokenizer's output). One
            forward pass (training mode, model state restored) then decides the sites from the
            execution order, the input ranks and which rates the library reads itself
            (recommended; a forward that fails falls back to registration order, with a
            warning).
        sites: ``{path: site}`` overrides (sites: input, hidden, conv, sequence, attention,
            residual, embedding; ``keep`` leaves the site as it is). An attribute site's path
            is ``<module path>.<attribute>``, as the report shows it.

    Returns:
        ``(model, report)``: the same model object, and what changed.

    Raises:
        ConfigError: A bad regularization value (naming the field), an unknown site, or a kind
            that cannot take effect at a site whose rate the library reads itself.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5))
        >>> net, report = apply(net, {"dropout": {"kind": "gaussian", "hidden_rate": 0.3}})
        >>> report.paths()
        ['0', '3']
    """
    from droptune.config import SITES

    drop = read_section(regularization, "dropout")
    sites = dict(sites or {})
    for path, site in sites.items():
        if site not in (*SITES, KEEP):
            raise ConfigError(
                f"sites[{path!r}]: must be one of {', '.join((*SITES, KEEP))}, got {site!r}"
            )
    notes: list[str] = []
    traced = _trace_or_warn(model, example_input, notes)
    found = walk(model, traced)
    unknown = [path for path in sites if path not in {s.path for s in found}]
    if unknown:
        raise ConfigError(
            f"sites[{unknown[0]!r}]: not a dropout module of the model; dropout modules: "
            f"{', '.join(s.path for s in found) or 'none'}"
        )
    modules = dict(model.named_modules())
    residual = [s for s in found if sites.get(s.path, s.site) == "residual"]
    ratios = _depth_ratios(model, residual)
    plan = _plan(found, sites, drop, ratios)
    others = unrecognised(modules)
    if others:
        notes.append(
            f"dropout-like modules apply does not know, left unchanged: {', '.join(others)}"
        )
        logger.warning("droptune.apply: %s", notes[-1])

    changes = [_set_site(model, modules, *entry, ratios) for entry in plan]
    attention_rate = drop.rate("attention_rate")
    for path, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            before = module.dropout
            module.dropout = attention_rate
            changes.append(
                Change(
                    path,
                    "attention",
                    f"dropout={before}",
                    f"dropout={attention_rate}",
                    "standard",
                    attention_rate,
                    "MultiheadAttention passes this float to its attention function",
                )
            )
    changes += _apply_recurrent(model, modules, drop)
    changes += _apply_weights(model, modules, drop, notes)
    return model, ApplyReport(changes, notes)


def _set_site(
    model: nn.Module,
    modules: dict[str, nn.Module],
    s: Site,
    name: str,
    kind: str,
    rate: float,
    options: dict[str, Any],
    ratios: dict[str, float],
) -> Change:
    """Set one planned site and say what happened."""
    note = s.note
    if name == "residual" and ratios[s.path] != 1.0:
        note = "; ".join(
            filter(None, [note, f"depth-scaled: {ratios[s.path]:.3g} x droppath_rate"])
        )
    if s.form == "module" or (s.form == "droppath" and name != "residual"):
        # A library's stochastic-depth module given another site becomes that site's dropout.
        old = modules[s.path]
        new = make_dropout(kind, rate, **options)
        new.train(old.training)
        _replace(model, old, new)
        if name == "residual":
            setattr(new, _DEPTH_RATIO, ratios[s.path])
        return Change(s.path, name, repr(old), repr(new), kind, rate, note)
    holder = modules[s.owner] if s.form == "attribute" else modules[s.path]
    before = getattr(holder, s.attribute)
    setattr(holder, s.attribute, rate)
    if name == "residual":
        key = _DEPTH_RATIO if s.form != "attribute" else f"{_DEPTH_RATIO}_{s.attribute}"
        holder.__dict__[key] = ratios[s.path]
    return Change(
        s.path, name, f"{s.attribute}={before}", f"{s.attribute}={rate}", kind, rate, note
    )


def _apply_recurrent(model: nn.Module, modules: dict[str, nn.Module], drop: Any) -> list[Change]:
    changes: list[Change] = []
    recurrent = drop.rate("recurrent_rate")
    hidden = drop.rate("hidden_rate")
    for path, module in modules.items():
        if not isinstance(module, _RNN):
            continue
        before = repr(module)
        rnn: nn.Module = module
        # Remember that the RNN has a between-layer dropout site, so that an apply with
        # hidden_rate 0 (or kind none) does not erase the site for the next apply.
        has_site = getattr(module, _LAYER_SITE, False) or (
            module.input_dropout > 0
            if isinstance(module, VariationalLSTM | VariationalGRU)
            else module.dropout > 0
        )
        setattr(module, _LAYER_SITE, has_site)
        if isinstance(module, VariationalLSTM | VariationalGRU):
            module.recurrent_dropout = recurrent
            module.input_dropout = hidden if has_site else 0.0
        elif recurrent > 0:
            cls = VariationalLSTM if isinstance(module, nn.LSTM) else VariationalGRU
            if isinstance(module, nn.LSTM) and module.proj_size:
                raise ConfigError(f"{path}: recurrent_rate needs an LSTM without proj_size")
            rnn = cls(
                module.input_size,
                module.hidden_size,
                module.num_layers,
                bias=module.bias,
                batch_first=module.batch_first,
                bidirectional=module.bidirectional,
                input_dropout=hidden if has_site else 0.0,
                recurrent_dropout=recurrent,
            )
            setattr(rnn, _LAYER_SITE, has_site)
            first = next(module.parameters())
            rnn.to(device=first.device, dtype=first.dtype)
            _copy_rnn(module, rnn, path)
            rnn.train(module.training)
            _replace(model, module, rnn)
        elif has_site:
            module.dropout = hidden
        else:
            continue
        changes.append(
            Change(path, "sequence", before, repr(rnn), "variational", recurrent, "")
            if isinstance(rnn, VariationalLSTM | VariationalGRU)
            else Change(path, "sequence", before, repr(rnn), "standard", hidden, "")
        )
    return changes


def _copy_rnn(old: nn.Module, new: nn.Module, path: str) -> None:
    """Copy ``old``'s raw parameters into ``new`` (DropConnect is re-added by the weight pass)."""
    state: dict[str, torch.Tensor] = {}
    for name, value in old.state_dict().items():
        if name.startswith("parametrizations."):
            weight, _, leaf = name.removeprefix("parametrizations.").partition(".")
            plist: Any = old.parametrizations[weight]  # type: ignore[index]
            if leaf != "original" or not all(isinstance(p, DropConnect) for p in plist):
                raise ConfigError(
                    f"{path}: recurrent_rate cannot replace an RNN whose {weight} carries a "
                    "parametrization other than droptune's DropConnect"
                )
            name = weight
        state[name] = value
    new.load_state_dict(state)


def _has_dropconnect(module: nn.Module) -> bool:
    return any(isinstance(m, DropConnect) for m in module.modules())


def _apply_weights(
    model: nn.Module, modules: dict[str, nn.Module], drop: Any, notes: list[str]
) -> list[Change]:
    changes: list[Change] = []
    weight = drop.rate("weight_rate")
    recurrent_weight = drop.rate("recurrent_weight_rate")
    embedding = drop.rate("embedding_rate")
    inside_attention = {
        f"{path}.{sub}"
        for path, m in modules.items()
        if isinstance(m, nn.MultiheadAttention)
        for sub, _ in m.named_modules()
        if sub
    }
    skipped: list[str] = []
    current = dict(model.named_modules())  # after RNN swaps
    for path, module in current.items():
        # A weight that already carries DropConnect gets the new rate even when it is 0, so a
        # second apply (or kind none) leaves no stale mask behind.
        if isinstance(module, nn.RNNBase) and (recurrent_weight > 0 or _has_dropconnect(module)):
            add_weight_dropout(module, recurrent_weight)
            after = f"DropConnect(p={recurrent_weight}) on weight_hh"
            changes.append(
                Change(path, "recurrent", "weight_hh", after, "dropconnect", recurrent_weight)
            )
        elif (
            isinstance(module, nn.Linear)
            and (weight > 0 or _has_dropconnect(module))
            and path not in inside_attention
        ):
            add_weight_dropout(module, weight)
            after = f"DropConnect(p={weight}) on weight"
            changes.append(Change(path, "weight", "weight", after, "dropconnect", weight))
        elif isinstance(module, DropoutEmbedding):
            before = repr(module)
            module.row_dropout.set_rate(embedding)
            changes.append(Change(path, "embedding", before, repr(module), "embedding", embedding))
        elif isinstance(module, nn.Embedding) and embedding > 0:
            if is_aux_embedding(path, module):
                skipped.append(path)
                continue
            new = DropoutEmbedding.from_embedding(module, embedding)
            _replace(model, module, new)
            changes.append(
                Change(path, "embedding", repr(module), repr(new), "embedding", embedding)
            )
    if skipped:
        notes.append(
            "embedding_rate drops token types only; position / type / relative-bias embeddings "
            f"left as they are: {', '.join(skipped)}"
        )
    return changes
