"""One forward pass of a user's model with an example input, recording what the walk needs.

:func:`droptune.apply` decides most sites from structure alone; a traced pass adds what only
running the model shows:

* the order in which modules run, with the rank of each one's first input (a CNN that flattens
  inside ``forward``, a dropout after a functional reshape);
* which dropout modules run, and which are never called although their rate ``p`` is read:
  Hugging Face attention passes ``self.dropout.p`` to ``scaled_dot_product_attention`` (or to
  ``F.dropout``) itself, so only standard dropout with that rate can happen there;
* which dropout modules receive a probability distribution (non-negative, summing to 1 over the
  last axis): attention probabilities, whatever the module is called;
* which float rate attributes (``self.attention_dropout = 0.1`` read by the library's attention
  function, ``self.dropout = 0.1`` passed to ``F.dropout``) the forward actually reads.

The pass runs in training mode — libraries read attention rates only while training — with
normalization layers kept in eval mode (a one-sample batch must not fail), every buffer restored
afterwards and the random number generators forked, so the model and the user's random streams
are exactly as they were. A model that cannot run with the example (a wrong input, a forward
that needs more arguments) is not an error: the caller falls back to registration order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from collections.abc import Mapping
import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import torch
from torch import nn


__all__ = ["Trace", "call_model", "trace"]

#: (id(module), attribute) pairs read while a probe is active.
_READS: ContextVar[set[tuple[int, str]] | None] = ContextVar("_droptune_reads", default=None)
_PROBE_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class Trace:
    """What one forward pass showed (paths as ``model.named_modules()`` gives them)."""

    #: Every module call in forward order, with the rank of its first tensor input.
    order: list[tuple[str, int | None]] = field(default_factory=list)
    #: How many times each module ran.
    calls: Counter[str] = field(default_factory=Counter)
    #: Modules whose first input was a probability distribution over its last axis.
    probabilities: set[str] = field(default_factory=set)
    #: ``(path, attribute)`` of watched attributes the forward read.
    reads: set[tuple[str, str]] = field(default_factory=set)


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(**x)`` for a mapping (keyword inputs such as a tokenizer's output),
    ``model(*x)`` for a tuple of positional inputs, else ``model(x)``."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _is_distribution(x: torch.Tensor) -> bool:
    """Softmax output: rank >= 3 (batch, [heads,] queries, keys), >= 0, rows summing to 1."""
    if x.dim() < 3 or not x.is_floating_point() or x.numel() == 0:
        return False
    with torch.no_grad():
        probs = x.detach().float()
        sums = probs.sum(dim=-1)
        return bool((probs >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums)))


def _recording_property(name: str) -> property:
    def get(self: nn.Module) -> Any:
        reads = _READS.get()
        if reads is not None:
            reads.add((id(self), name))
        if name in self.__dict__:
            return self.__dict__[name]
        return nn.Module.__getattr__(self, name)  # a buffer (population rates)

    def set_(self: nn.Module, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set_)


def _probe_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``names`` are properties that record each read."""
    key = (cls, names)
    if key not in _PROBE_CLASSES:
        namespace: dict[str, Any] = {name: _recording_property(name) for name in names}
        namespace["__module__"] = cls.__module__
        namespace["__qualname__"] = cls.__qualname__
        _PROBE_CLASSES[key] = type(cls.__name__, (cls,), namespace)
    return _PROBE_CLASSES[key]


@contextlib.contextmanager
def _probes(modules: dict[str, nn.Module], watch: dict[str, tuple[str, ...]]) -> Iterator[None]:
    """Swap each watched module's class for its recording subclass, and back."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for path, names in watch.items():
            module = modules[path]
            cls = type(module)
            try:
                module.__class__ = _probe_class(cls, names)
            except (TypeError, AttributeError):  # cannot be subclassed or swapped: unwatched
                continue
            swapped.append((module, cls))
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _devices(model: nn.Module) -> list[int]:
    return sorted(
        {t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda}
    )


def trace(model: nn.Module, example_input: Any, watch: dict[str, tuple[str, ...]]) -> Trace:
    """Run ``model`` once on ``example_input`` and record a :class:`Trace`.

    Args:
        model: The model; its parameters, buffers, training flags and the global random state
            are the same afterwards.
        example_input: A tensor, a tuple of positional inputs, or a mapping of keyword inputs.
        watch: ``{module path: attribute names}`` whose reads to record.

    Raises:
        Exception: Whatever the model's forward raises with this input.
    """
    modules = dict(model.named_modules())
    paths = {id(m): p for p, m in modules.items()}
    result = Trace()
    handles = []
    flags = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    reads: set[tuple[int, str]] = set()
    token = _READS.set(reads)
    try:
        for path, module in modules.items():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # no hooks on compiled code: its insides stay unseen

            def hook(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str = path
            ) -> None:
                first = _first_tensor(args, kwargs)
                result.order.append((path, first.dim() if first is not None else None))
                result.calls[path] += 1
                if first is not None and _is_distribution(first):
                    result.probabilities.add(path)

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        model.train()
        for module in model.modules():
            if isinstance(module, _NORMS):
                module.eval()
        with (
            torch.random.fork_rng(devices=_devices(model)),
            torch.enable_grad(),
            _probes(modules, watch),
        ):
            call_model(model, example_input)
    finally:
        _READS.reset(token)
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    result.reads = {(paths[owner], name) for owner, name in reads if owner in paths}
    return result
