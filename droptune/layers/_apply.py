"""``droptune.apply``: put a :class:`RegularizationConfig` into a user's own model.

The walk finds every dropout site of the model and sets the configured kind and rate there:

* torch dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
  ``FeatureAlphaDropout``) and droptune's own are replaced by ``make_dropout(kind, rate)`` for
  their site;
* ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``) gets the attention rate;
* ``nn.LSTM``/``nn.GRU`` become :class:`VariationalLSTM`/:class:`VariationalGRU` (same
  parameters) when a recurrent rate is set, and get DropConnect on ``weight_hh`` when a
  recurrent weight rate is set;
* ``nn.Linear`` layers get DropConnect when a weight rate is set; ``nn.Embedding`` becomes a
  :class:`DropoutEmbedding` when an embedding rate is set.

apply never inserts dropout where the model has none: put ``nn.Dropout(0.0)`` placeholders where
you want a site tuned.

Site rule for a dropout module: ``Dropout1d/2d/3d`` and ``FeatureAlphaDropout`` are ``conv``
sites. Otherwise look at the weight layer that runs before it (in forward order when
``example_input`` is given, else in registration order): none → ``input``; a convolution with no
``nn.Flatten`` in between (and, when traced, an input of rank ≥ 3) → ``conv``; an RNN, or an
embedding in a model with an RNN → ``sequence``; anything else → ``hidden``. Pass ``sites={path:
site}`` to override the rule for any module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from droptune.exceptions import ConfigError
from droptune.layers._attention import SelfAttention
from droptune.layers._base import DropoutBase
from droptune.layers._factory import make_dropout
from droptune.layers._recurrent import VariationalGRU
from droptune.layers._recurrent import VariationalLSTM
from droptune.layers._structured import DropoutEmbedding
from droptune.layers._structured import DropPath
from droptune.layers._weight import DropConnect
from droptune.layers._weight import add_weight_dropout


if TYPE_CHECKING:
    from droptune.config import RegularizationConfig

__all__ = ["ApplyReport", "Change", "apply"]

_TORCH_DROPOUT = (nn.modules.dropout._DropoutNd,)
_CHANNEL_TORCH = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
_RNN = (nn.LSTM, nn.GRU)
# Attribute set on an RNN whose between-layer dropout is a site (its original dropout was > 0).
_LAYER_SITE = "_droptune_layer_dropout"


@dataclass(frozen=True)
class Change:
    """One modification: the module path, its site, and the module (or setting) before/after."""

    path: str
    site: str
    before: str
    after: str


@dataclass
class ApplyReport:
    """What :func:`apply` changed, in model order."""

    changes: list[Change]

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Any:
        return iter(self.changes)

    def paths(self) -> list[str]:
        """The module paths that changed."""
        return [c.path for c in self.changes]

    def __str__(self) -> str:
        if not self.changes:
            return "droptune.apply: no changes (the model has no dropout sites)"
        width = max(len(c.path) for c in self.changes)
        lines = [f"{'module':<{width}}  {'site':<9}  before -> after"]
        lines += [f"{c.path:<{width}}  {c.site:<9}  {c.before} -> {c.after}" for c in self.changes]
        return "\n".join(lines)


def _weight_family(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.RNNBase):
        return "rnn"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # MultiheadAttention uses its out_proj weight functionally (out_proj's forward never runs).
    if isinstance(module, nn.Linear | nn.MultiheadAttention):
        return "dense"
    if isinstance(module, nn.Flatten):
        return "flatten"
    return None


def _trace(model: nn.Module, example_input: Any) -> list[tuple[str, int | None]]:
    """Module paths in forward order, each with the rank of its first input."""
    order: list[tuple[str, int | None]] = []
    handles = []
    for path, module in model.named_modules():

        def hook(_: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            first = args[0] if args else None
            order.append((path, first.dim() if isinstance(first, torch.Tensor) else None))

        handles.append(module.register_forward_pre_hook(hook))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # Grad stays on: under no_grad, eval-mode transformer layers take a fused fast path
        # that never calls their dropout children, which would then go unseen.
        with torch.enable_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    return order


def _infer_sites(model: nn.Module, example_input: Any) -> dict[str, tuple[str, bool]]:
    """``{path: (site, batch_first)}`` for every dropout module of the model."""
    modules = dict(model.named_modules())
    sites = _walk_sites(modules, [(path, None) for path in modules])
    if example_input is not None:
        # Forward order and real input ranks win; modules the forward never reached keep
        # their registration-order site.
        sites.update(_walk_sites(modules, _trace(model, example_input)))
    return sites


def _walk_sites(
    modules: dict[str, nn.Module], order: list[tuple[str, int | None]]
) -> dict[str, tuple[str, bool]]:
    has_rnn = any(isinstance(m, nn.RNNBase) for m in modules.values())
    sites: dict[str, tuple[str, bool]] = {}
    last: str | None = None
    batch_first = True
    for path, rank in order:
        module = modules[path]
        family = _weight_family(module)
        if family == "flatten":
            # Flattening ends a conv stack; before any weight layer it changes nothing.
            last = "dense" if last == "conv" else last
            continue
        if family is not None:
            last = family
            if isinstance(module, nn.RNNBase):
                batch_first = module.batch_first
            continue
        if path in sites or not isinstance(module, (*_TORCH_DROPOUT, DropoutBase)):
            continue
        if _owned_by_droptune(path, modules):
            continue
        parent = modules.get(path.rpartition(".")[0])
        if isinstance(module, DropPath):
            site = "residual"
        elif isinstance(parent, SelfAttention) and path.endswith("attn_drop"):
            site = "attention"
        elif isinstance(module, _CHANNEL_TORCH):
            site = "conv"
        elif last is None:
            site = "input"
        elif last == "conv" and (rank is None or rank >= 3):
            site = "conv"
        elif last == "rnn" or (last == "embedding" and has_rnn):
            site = "sequence" if rank is None or rank >= 3 else "hidden"
        else:
            site = "hidden"
        sites[path] = (site, batch_first)
    return sites


def _owned_by_droptune(path: str, modules: dict[str, nn.Module]) -> bool:
    """Dropout modules inside droptune parents are set through their parent's own site.

    That covers an embedding's row dropout and the DropConnect parametrizations of weights
    (``<module>.parametrizations.<weight>.<i>``), whose rates are the weight rates.
    """
    parent = modules.get(path.rpartition(".")[0])
    return isinstance(parent, DropoutEmbedding | parametrize.ParametrizationList)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def apply(
    model: nn.Module,
    regularization: RegularizationConfig | dict[str, Any],
    *,
    example_input: Any = None,
    sites: dict[str, str] | None = None,
) -> tuple[nn.Module, ApplyReport]:
    """Set the configured dropout kinds and rates on a user's own model, in place.

    Args:
        model: Any ``nn.Module`` or ``LightningModule``.
        regularization: A :class:`~droptune.config.RegularizationConfig` or its dict form.
        example_input: Optional input batch (or tuple of positional inputs); when given, one
            forward pass in eval mode decides each dropout module's site from the actual
            execution order and input ranks (recommended for CNNs that flatten functionally).
        sites: ``{module path: site}`` overrides (sites: input, hidden, conv, sequence,
            attention, residual, embedding).

    Returns:
        ``(model, report)``: the same model object, and what changed.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5))
        >>> net, report = apply(net, {"dropout": {"kind": "gaussian", "hidden_rate": 0.3}})
        >>> report.paths()
        ['0', '3']
    """
    from droptune.config import SITES
    from droptune.config import RegularizationConfig

    cfg = RegularizationConfig.from_dict(regularization)
    drop = cfg.dropout
    for path, site in (sites or {}).items():
        if site not in SITES:
            raise ConfigError(f"sites[{path!r}]: must be one of {', '.join(SITES)}, got {site!r}")
    changes: list[Change] = []
    inferred = _infer_sites(model, example_input)
    unknown = [path for path in sites or {} if path not in inferred]
    if unknown:
        raise ConfigError(
            f"sites[{unknown[0]!r}]: not a dropout module of the model; dropout modules: "
            f"{', '.join(inferred) or 'none'}"
        )
    modules = dict(model.named_modules())
    for path, (site, batch_first) in inferred.items():
        site = (sites or {}).get(path, site)
        old = modules[path]
        kind, rate, options = drop.for_site(site)
        if kind == "variational":
            options["batch_first"] = batch_first
        new = make_dropout(kind, rate, **options)
        new.train(old.training)
        _set_module(model, path, new)
        changes.append(Change(path, site, repr(old), repr(new)))

    attention_rate = drop.rate("attention_rate")
    for path, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            before = module.dropout
            module.dropout = attention_rate
            changes.append(
                Change(path, "attention", f"dropout={before}", f"dropout={attention_rate}")
            )
    changes += _apply_recurrent(model, modules, drop)
    changes += _apply_weights(model, modules, drop)
    return model, ApplyReport(changes)


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
            _set_module(model, path, rnn)
        elif has_site:
            module.dropout = hidden
        else:
            continue
        changes.append(Change(path, "sequence", before, repr(rnn)))
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


def _apply_weights(model: nn.Module, modules: dict[str, nn.Module], drop: Any) -> list[Change]:
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
    current = dict(model.named_modules())  # after RNN swaps
    for path, module in current.items():
        # A weight that already carries DropConnect gets the new rate even when it is 0, so a
        # second apply (or kind none) leaves no stale mask behind.
        if isinstance(module, nn.RNNBase) and (recurrent_weight > 0 or _has_dropconnect(module)):
            add_weight_dropout(module, recurrent_weight)
            changes.append(
                Change(
                    path,
                    "recurrent",
                    "weight_hh",
                    f"DropConnect(p={recurrent_weight}) on weight_hh",
                )
            )
        elif (
            isinstance(module, nn.Linear)
            and (weight > 0 or _has_dropconnect(module))
            and path not in inside_attention
        ):
            add_weight_dropout(module, weight)
            changes.append(Change(path, "weight", "weight", f"DropConnect(p={weight}) on weight"))
        elif isinstance(module, DropoutEmbedding):
            before = repr(module)
            module.row_dropout.set_rate(embedding)
            changes.append(Change(path, "embedding", before, repr(module)))
        elif isinstance(module, nn.Embedding) and embedding > 0:
            new = DropoutEmbedding.from_embedding(module, embedding)
            _set_module(model, path, new)
            changes.append(Change(path, "embedding", repr(module), repr(new)))
    return changes
