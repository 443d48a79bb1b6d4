"""Where the dropout of a model sits, read from its structure and the ecosystem's conventions.

A *site* is a place whose dropout :func:`droptune.apply` sets; its name picks the configured
rate (:meth:`DropoutConfig.for_site`). Three forms of site exist in the wild:

* a dropout **module** (``nn.Dropout``, ``Dropout1d/2d/3d``, alpha dropouts, droptune's own) —
  replaced by the configured kind. When a trace shows that the forward never calls it but reads
  its ``p`` (Hugging Face attention hands ``self.dropout.p`` to ``scaled_dot_product_attention``),
  only standard dropout with that rate can happen there;
* a **stochastic-depth module** written by a library (HF ``ConvNextDropPath`` with ``drop_prob``,
  timm-style ``DropPath``, torchvision ``StochasticDepth`` with ``p``) — its own implementation is
  kept and its rate set, scaled by depth the way the model scaled it;
* a float **rate attribute** that the library passes to a functional call
  (``T5Attention.dropout``, ``ViTSelfAttention.attention_dropout``, BART's
  ``activation_dropout``) — only standard dropout can happen there.

Which site a dropout module is, in this order:

1. stochastic depth → ``residual``; ``Dropout1d/2d/3d`` and ``FeatureAlphaDropout`` → ``conv``;
2. attention probabilities → ``attention``: when traced, a module whose input is a probability
   distribution (rank >= 3, non-negative, summing to 1 over the last axis); otherwise a name that
   says so (``attn_drop``, ``attn_dropout``, ``attention_dropout``) or the one dropout of an
   attention core (a class named ``*Attention`` with query/key/value children) registered before
   its output projection (HF BERT's ``attention.self.dropout``);
3. a dropout inside an ``*Embeddings`` module, named for positions / patches / embeddings
   (timm's ``pos_drop``), or right after a token embedding, in a model without RNNs →
   ``input`` (the same site as the built-in transformer's dropout after its embedding;
   ``embedding_rate`` stays word-type dropout on ``nn.Embedding`` itself);
4. otherwise the weight layer that runs before it (forward order when traced, else registration
   order): none → ``input``, unless the name says residual/projection/output (``resid_dropout``,
   ``proj_drop``, ``hidden_dropout``) → ``hidden``; a convolution with no flatten in between →
   ``conv``; an RNN, or an embedding in a model with an RNN → ``sequence``; anything else →
   ``hidden`` (classifier heads included). Position, token-type and relative-bias embeddings do
   not count as the layer before.
"""

from __future__ import annotations

from dataclasses import dataclass
import re
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from droptune.layers._base import DropoutBase
from droptune.layers._structured import DropoutEmbedding
from droptune.layers._structured import DropPath
from droptune.layers._trace import Trace


__all__ = [
    "Site",
    "droppath_attribute",
    "is_aux_embedding",
    "is_dropout_module",
    "rate_attributes",
    "unrecognised",
    "walk",
]

_TORCH_DROPOUT = (nn.modules.dropout._DropoutNd,)
_CHANNEL_TORCH = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)

_ATTENTION_WORDS = {"attn", "att", "attention", "probs"}
_HIDDEN_WORDS = {
    "resid", "residual", "proj", "out", "output", "hidden", "ffn", "mlp", "fc", "head",
    "classifier", "cls", "final", "activation", "act", "dense", "pooler", "summary",
}  # fmt: skip
_INPUT_WORDS = {
    "emb", "embed", "embedding", "embeddings", "input", "word", "token", "pos", "patch",
}  # fmt: skip
_QKV_NAMES = {
    "query", "key", "value", "q", "k", "v", "qkv", "q_proj", "k_proj", "v_proj", "qkv_proj",
    "in_proj", "c_attn", "to_q", "to_k", "to_v", "to_qkv", "wq", "wk", "wv", "wqkv",
    "query_key_value",
}  # fmt: skip
_OUT_NAMES = {
    "o",
    "out",
    "out_proj",
    "o_proj",
    "proj",
    "c_proj",
    "dense",
    "to_out",
    "wo",
    "output",
}
#: Float attributes that hold a dropout rate: ``dropout``, ``attention_dropout``,
#: ``activation_dropout``, ``attn_drop``, ``dropout_prob``, ...
_RATE_NAME = re.compile(
    r"^(?:(?P<prefix>[a-z0-9]+(?:_[a-z0-9]+)*)_)?drop(?:out)?(?:_(?:p|prob|rate))?$"
)
_DROPPATH_NAME = re.compile(r"^drop_?path(?:_(?:p|prob|rate))?$")
_DROPPATH_CLASS = re.compile(r"drop_?path|stochastic_?depth", re.IGNORECASE)
_DROPPATH_RATES = ("drop_prob", "p", "drop_rate", "drop_path_rate", "prob")
_AUX_EMBEDDING = re.compile(r"pos|wpe|type|segment|relative|bias")

_SCRIPTED = {
    "Linear": "dense", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "LSTM": "rnn",
    "GRU": "rnn", "Embedding": "embedding", "Flatten": "flatten",
}  # fmt: skip

Form = Literal["module", "droppath", "attribute"]


@dataclass(frozen=True)
class Site:
    """One place whose dropout apply sets.

    Attributes:
        path: The module path; for an attribute site ``<module path>.<attribute>``.
        site: input, hidden, conv, sequence, attention or residual.
        form: ``module`` (a dropout module, replaced), ``droppath`` (a library's stochastic
            depth module, rate set in place) or ``attribute`` (a float rate, set in place).
        owner: The module path that holds the module or attribute.
        attribute: The attribute set: the module's name in its parent, the droppath module's
            rate attribute (``drop_prob``, ``p``) or the float rate attribute.
        reads_only: The library reads the rate itself; only standard dropout can happen here.
        note: What the report says about it beyond site, kind and rate.
        batch_first: The layout of the RNN before it (for variational dropout).
    """

    path: str
    site: str
    form: Form
    owner: str
    attribute: str
    reads_only: bool = False
    note: str = ""
    batch_first: bool = True


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z]+", name.lower()))


def is_dropout_module(module: nn.Module) -> bool:
    """torch's dropout modules and droptune's own."""
    return isinstance(module, (*_TORCH_DROPOUT, DropoutBase))


def droppath_attribute(module: nn.Module) -> str | None:
    """The rate attribute of a library's stochastic-depth module (``drop_prob``, ``p``), else
    None: a parameterless class named ``*DropPath*`` / ``*StochasticDepth*`` holding a float."""
    if isinstance(module, DropoutBase) or not _DROPPATH_CLASS.search(type(module).__name__):
        return None
    if any(True for _ in module.parameters()):
        return None
    for name in _DROPPATH_RATES:
        value = module.__dict__.get(name)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return name
    return None


def is_aux_embedding(path: str, module: nn.Module) -> bool:
    """An embedding of positions, token types or relative-position biases, not of tokens."""
    name = path.rpartition(".")[2].lower()
    return isinstance(module, nn.Embedding) and bool(_AUX_EMBEDDING.search(name))


def _foreign(module: nn.Module) -> bool:
    """A module written outside torch and droptune (a user's or a library's)."""
    return not type(module).__module__.startswith(("torch.", "droptune."))


def _attention_core(module: nn.Module | None) -> bool:
    """A class named ``*Attention``/``*Attn`` with query/key/value projections as children."""
    if module is None or not re.search(r"(attention|attn)$", type(module).__name__, re.I):
        return False
    return any(name.lower() in _QKV_NAMES for name in module._modules)


def _before_output_projection(parent: nn.Module, name: str) -> bool:
    for child in parent._modules:
        if child == name:
            return True
        if child.lower() in _OUT_NAMES:
            return False
    return True


def rate_attributes(modules: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """``{path: names}`` of float rate attributes on users' and libraries' modules."""
    found: dict[str, tuple[str, ...]] = {}
    for path, module in modules.items():
        if not _foreign(module) or "drop" in type(module).__name__.lower():
            continue
        names = tuple(
            name
            for name, value in vars(module).items()
            if isinstance(value, float)
            and 0.0 <= value < 1.0
            and (_RATE_NAME.match(name) or _DROPPATH_NAME.match(name))
        )
        if names:
            found[path] = names
    return found


def unrecognised(modules: dict[str, nn.Module]) -> list[str]:
    """Dropout-like modules apply does not know (timm ``DropBlock2d``, ...): left unchanged."""
    return [
        f"{path} ({type(module).__name__})"
        for path, module in modules.items()
        if "drop" in type(module).__name__.lower()
        and not is_dropout_module(module)
        and droppath_attribute(module) is None
        and _foreign(module)
    ]


def _attribute_site(owner: nn.Module, name: str) -> str:
    if _DROPPATH_NAME.match(name):
        return "residual"
    match = _RATE_NAME.match(name)
    prefix = _words(match.group("prefix") or "") if match else set()
    if prefix & _HIDDEN_WORDS:
        return "hidden"
    if prefix & _ATTENTION_WORDS:
        return "attention"
    if prefix & _INPUT_WORDS or "Embedding" in type(owner).__name__:
        return "input"
    return "attention" if _attention_core(owner) else "hidden"


def _owned_by_droptune(path: str, modules: dict[str, nn.Module]) -> bool:
    """Dropout modules inside droptune parents are set through their parent's own site: an
    embedding's row dropout and the DropConnect parametrizations of weights."""
    parent = modules.get(path.rpartition(".")[0])
    return isinstance(parent, DropoutEmbedding | parametrize.ParametrizationList)


def _weight_family(path: str, module: nn.Module) -> str | None:
    if isinstance(module, torch.jit.ScriptModule):  # scripted: only its original class name
        name = str(getattr(module, "original_name", ""))
        return _SCRIPTED.get(name)
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.RNNBase):
        return "rnn"
    if isinstance(module, nn.Embedding):
        return None if is_aux_embedding(path, module) else "embedding"
    # MultiheadAttention uses its out_proj weight functionally (out_proj's forward never runs).
    if isinstance(module, nn.Linear | nn.MultiheadAttention):
        return "dense"
    # Libraries' own dense layers (GPT-2's Conv1D): a 2-D weight and a forward of their own.
    weight = getattr(module, "weight", None)
    if _foreign(module) and isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return "dense"
    if isinstance(module, nn.Flatten):
        return "flatten"
    return None


def _positional(
    modules: dict[str, nn.Module], order: list[tuple[str, int | None]]
) -> dict[str, tuple[str, bool]]:
    """``{path: (site, batch_first)}`` of every dropout module by the layer that runs before it."""
    has_rnn = any(isinstance(m, nn.RNNBase) for m in modules.values())
    sites: dict[str, tuple[str, bool]] = {}
    last: str | None = None
    batch_first = True
    for path, rank in order:
        module = modules[path]
        family = _weight_family(path, module)
        if family == "flatten":
            # Flattening ends a conv stack; before any weight layer it changes nothing.
            last = "dense" if last == "conv" else last
            continue
        if family is not None:
            last = family
            if isinstance(module, nn.RNNBase):
                batch_first = module.batch_first
            continue
        if path in sites or not is_dropout_module(module):
            continue
        if _owned_by_droptune(path, modules):
            continue
        if isinstance(module, _CHANNEL_TORCH):
            site = "conv"
        elif last is None:
            site = "input"
        elif last == "conv" and (rank is None or rank >= 3):
            site = "conv"
        elif last == "rnn" or (last == "embedding" and has_rnn):
            site = "sequence" if rank is None or rank >= 3 else "hidden"
        elif last == "embedding":
            site = "input"
        else:
            site = "hidden"
        sites[path] = (site, batch_first)
    return sites


def _module_site(
    path: str, positional: str, modules: dict[str, nn.Module], traced: Trace | None
) -> str:
    module = modules[path]
    if isinstance(module, DropPath):
        return "residual"
    if isinstance(module, _CHANNEL_TORCH):
        return "conv"
    parent_path, _, name = path.rpartition(".")
    parent = modules.get(parent_path)
    words = _words(name)
    named_attention = bool(words & _ATTENTION_WORDS) and not words & _HIDDEN_WORDS
    if traced is not None and traced.calls[path]:
        attention = path in traced.probabilities
    else:
        attention = named_attention or (
            _attention_core(parent)
            and not words & _HIDDEN_WORDS
            and parent is not None
            and _before_output_projection(parent, name)
        )
    if attention:
        return "attention"
    has_rnn = any(isinstance(m, nn.RNNBase) for m in modules.values())
    in_embedding = parent is not None and "Embedding" in type(parent).__name__
    if (in_embedding or words & _INPUT_WORDS) and not has_rnn:
        return "input"
    if positional == "input" and words & _HIDDEN_WORDS:
        return "hidden"
    return positional


def walk(model: nn.Module, traced: Trace | None) -> list[Site]:
    """Every site of ``model``, in registration order (see the module docstring for the rules)."""
    modules = dict(model.named_modules())
    positional = _positional(modules, [(path, None) for path in modules])
    scripted = any(isinstance(m, torch.jit.ScriptModule) for m in modules.values())
    if traced is not None and not scripted:
        # Forward order and real input ranks win; modules the forward never reached keep
        # their registration-order site. (Scripted code takes no hooks: with it in the model
        # the traced order has gaps, and registration order is the better guess.)
        positional.update(_positional(modules, traced.order))
    sites: list[Site] = []
    for path, module in modules.items():
        owner, _, name = path.rpartition(".")
        if not path:
            continue  # a model that is itself a dropout module has no parent to swap it in
        if path in positional:
            site = _module_site(path, positional[path][0], modules, traced)
            reads_only = False
            note = ""
            if traced is not None and not traced.calls[path]:
                reads_only = (path, "p") in traced.reads
                note = (
                    "the library reads p (fused attention / F.dropout): only standard dropout"
                    if reads_only
                    else "not reached by the example forward"
                )
            elif traced is not None and traced.calls[path] > 1:
                note = f"runs at {traced.calls[path]} places; its site is that of the first"
            sites.append(
                Site(path, site, "module", owner, name, reads_only, note, positional[path][1])
            )
        rate = droppath_attribute(module)
        if rate is not None:
            note = f"{type(module).__name__}.{rate} set; its own implementation kept"
            sites.append(Site(path, "residual", "droppath", path, rate, note=note))
    rates = rate_attributes(modules)
    for path, names in rates.items():
        module = modules[path]
        has_dropout_child = any(is_dropout_module(child) for child in module.children())
        for name in names:
            if traced is not None and (path, name) not in traced.reads:
                continue  # set in __init__ and never read again (a hyperparameter)
            if traced is None and has_dropout_child:
                continue  # the rate its dropout children were built with
            where = f"{path}.{name}" if path else name
            site = _attribute_site(module, name)
            note = (
                f"{type(module).__name__} passes this float to its attention function: only "
                "standard dropout"
                if site == "attention"
                else f"{type(module).__name__} passes this float to F.dropout: only standard "
                "dropout"
            )
            if site == "residual":
                note = f"{type(module).__name__} reads this float as its stochastic depth rate"
            sites.append(Site(where, site, "attribute", path, name, True, note))
    return sites
