"""Fuzzing (hypothesis) of the spec loader and the command line with bad input.

Contract: whatever a YAML file or an argument list holds, ``load_spec`` returns a ``StudySpec``
or raises a ``SpecError``, and ``droptune.cli.main`` returns 0 or 2 (a usage or spec error),
never a traceback, and never leaves a study behind in the storage. Python YAML tags are never
executed. The crashes the fuzzing found in the command line and the config builders stay at
the end as regression tests, each with its minimal input.

Every hypothesis test runs a fixed number of examples, derandomized and without an example
database, so CI sees the same inputs on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import copy
import math
from pathlib import Path
import re
import sqlite3
import string
import sys
import tempfile
import time
import typing
from typing import Any
from typing import Literal

from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import currently_in_test_context
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import optuna
import pytest
import typer
import yaml

from droptune.cli import app
from droptune.cli import main
from droptune.config import DataConfig
from droptune.config import DropoutConfig
from droptune.config import EarlyStoppingConfig
from droptune.config import L2Config
from droptune.config import ModelConfig
from droptune.config import RegularizationConfig
from droptune.config import TrainConfig
from droptune.config import TrainSettings
from droptune.config import load_config
from droptune.config import load_yaml_mapping
from droptune.config import load_yaml_value
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneError
from droptune.exceptions import SpecError
from droptune.layers import DROPOUT_KINDS
from droptune.study.factories import make_pruner
from droptune.study.factories import make_sampler
from droptune.study.runner import plan_workers
from droptune.study.space import suggest
from droptune.study.spec import SAMPLERS
from droptune.study.spec import Distribution
from droptune.study.spec import ExecutionSection
from droptune.study.spec import PrunerSection
from droptune.study.spec import SamplerSection
from droptune.study.spec import StudySection
from droptune.study.spec import StudySpec
from droptune.study.spec import TrackingSection
from droptune.study.spec import load_spec
from droptune.study.spec import spec_from_dict
from droptune.training import build_datamodule
from droptune.training import build_module
from tests.study.helpers import TINY


def _fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# ----------------------------------------------------------------------------------------------
# Helpers.


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A fresh temporary directory that is also the working directory (one per example)."""
    with (
        tempfile.TemporaryDirectory(prefix="droptune-fuzz-") as tmp,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.chdir(tmp)
        yield Path(tmp)


def _load_text(text: str | bytes, folder: Path) -> StudySpec | SpecError:
    """``load_spec`` on a file holding ``text``: the spec, or the SpecError it raised. Any other
    exception propagates (and fails the test that called this)."""
    path = folder / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        return load_spec(path)
    except SpecError as exc:
        return exc


def _check_result(result: StudySpec | SpecError) -> None:
    """The contract of a loaded spec: a SpecError says something (briefly). A spec must get
    through what ``droptune run`` does with it before any training: its recorded form (what
    the study stores) validates again, its device plan, sampler and pruner build, and a first
    trial samples every search dimension (the sampled config may still be invalid, e.g. heads
    that do not divide d_model, but only as a DroptuneError)."""
    if currently_in_test_context():  # see --hypothesis-show-statistics
        event("loaded" if isinstance(result, StudySpec) else "SpecError")
    if isinstance(result, SpecError):
        message = str(result)
        assert message.strip(), "a SpecError without a message"
        assert len(message) < 20_000, f"a {len(message)}-character error message"
        return
    assert isinstance(result, StudySpec)
    again = spec_from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()
    try:
        plan_workers(result.execution.devices, 1, result.execution.per_device)
    except SpecError as exc:  # GPU ids this machine does not have: refused, and said so
        assert "--devices: GPU" in str(exc), exc
    study = optuna.create_study(
        sampler=make_sampler(result),
        pruner=make_pruner(result),
        directions=result.study.study_directions,  # type: ignore[arg-type]
    )
    base = result.base

    def objective(trial: optuna.Trial) -> list[float]:
        params = suggest(trial, result, base)
        with contextlib.suppress(DroptuneError):
            base.with_overrides(params)
        return [0.0] * len(result.study.objectives)

    # Two trials: the second one is the first that most samplers sample themselves.
    study.optimize(objective, n_trials=2)


class _Dumper(yaml.SafeDumper):
    """Quotes the strings droptune's loader reads as floats (``1e-4``, YAML 1.2 style), so that
    a dumped document loads back as the same data."""


_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _set(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``tree`` with ``value`` at the dotted ``path`` (sections created or
    replaced on the way)."""
    out = copy.deepcopy(tree)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return out


def _leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    out: list[str] = []
    for key, value in tree.items():
        out += _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return out


#: Every field path of a full spec (defaults included) and of its training config.
_FULL_SPEC = spec_from_dict(TINY).to_dict()
_FULL_SPEC.pop("search")
SPEC_PATHS = sorted(set(_leaf_paths(_FULL_SPEC)) | set(_leaf_paths(TINY)))
CONFIG_PATHS = sorted(_leaf_paths(TrainConfig().model_dump(mode="json")))
RATES = sorted(name for name in DropoutConfig.model_fields if name.endswith("_rate"))

# ----------------------------------------------------------------------------------------------
# Strategies.

WORDS = sorted(
    {
        *(part for path in SPEC_PATHS for part in path.split(".")),
        *DROPOUT_KINDS,
        "auto",
        "cpu",
        "0,1",
        "tpe",
        "grid",
        "datamodule",
        "custom",
        "1e-4",
        "~",
        "null",
        "yes",
        "",
    }
)
text_values = st.text(st.characters(codec="utf-8"), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    text_values,
)
keys = st.one_of(st.sampled_from(WORDS), text_values, st.integers(-3, 3), st.booleans())
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=16,
)
#: Characters that mean something to YAML, so random text reaches the parser's corners.
YAML_ALPHABET = st.one_of(
    st.sampled_from(list(":-?[]{},&*!|>'\"%@`#\n\t ")),
    st.sampled_from(list(string.ascii_letters + string.digits + ".")),
    st.characters(codec="utf-8"),
)
YAML_TOKENS = [
    "!!python/object/apply:os.system",
    "!!python/name:os.system",
    "!!binary",
    "!!set",
    "!!omap",
    "!!timestamp",
    "!!int",
    "!!float",
    "!!bool",
    "!!str",
    "!!map",
    "!!seq",
    "!local",
    "&a",
    "*a",
    "<<:",
    "---",
    "...",
    "%YAML 1.1",
    "%TAG ! tag:x,2000:",
    "? ",
    ": ",
    "- ",
    "|",
    ">-",
    "study:",
    "  name: x",
    "search:",
    "2020-13-45",
    "1e999",
    ".nan",
    "0x" + "f" * 40,
    "9" * 5000,
    "0o7",
    "1_000",
    "190:20:30",
]
yaml_like = st.lists(
    st.one_of(st.sampled_from(YAML_TOKENS), st.text(YAML_ALPHABET, max_size=8)), max_size=16
).map(" ".join)
tiny_yaml_lines = _dump(TINY).splitlines()


@st.composite
def corrupted_tiny(draw: st.DrawFn) -> str:
    """The valid TINY spec as YAML with a few lines replaced, inserted or cut."""
    lines = list(tiny_yaml_lines)
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(lines)))
        token = draw(st.one_of(st.sampled_from(YAML_TOKENS), yaml_like))
        action = draw(st.sampled_from(["insert", "replace", "append", "cut"]))
        if action == "insert" or index == len(lines):
            lines.insert(index, token)
        elif action == "replace":
            lines[index] = lines[index].split(":")[0] + ": " + token
        elif action == "append":
            lines[index] += " " + token
        else:
            lines = lines[:index]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# 1. Arbitrary YAML documents.


@_fuzz(150)
@given(doc=documents)
def test_arbitrary_yaml_documents(doc: Any) -> None:
    with _scratch() as tmp:
        _check_result(_load_text(_dump(doc), tmp))


@_fuzz(100)
@given(
    sections=st.dictionaries(
        st.sampled_from(sorted(StudySpec.model_fields)), documents, min_size=1, max_size=3
    )
)
def test_arbitrary_sections_over_a_valid_spec(sections: dict[str, Any]) -> None:
    with _scratch() as tmp:
        _check_result(_load_text(_dump({**TINY, **sections}), tmp))


@_fuzz(150)
@given(text=st.one_of(st.text(st.characters(codec="utf-8"), max_size=60), yaml_like))
def test_arbitrary_text(text: str) -> None:
    with _scratch() as tmp:
        _check_result(_load_text(text, tmp))


@_fuzz(100)
@given(text=corrupted_tiny())
def test_corrupted_valid_spec(text: str) -> None:
    with _scratch() as tmp:
        _check_result(_load_text(text, tmp))


@_fuzz(30)
@given(data=st.binary(max_size=40))
def test_arbitrary_bytes(data: bytes) -> None:
    with _scratch() as tmp:
        _check_result(_load_text(b"study: {name: x}\n" + data, tmp))


PYTHON_TAGS = [
    '!!python/object/apply:os.system ["touch PWNED"]',
    '!!python/object/apply:subprocess.check_call [["touch", "PWNED"]]',
    '!!python/object/new:os.system ["touch PWNED"]',
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object:pathlib.Path {}",
    "!!python/tuple [1, 2]",
    '!<tag:yaml.org,2002:python/object/apply:os.system> ["touch PWNED"]',
]


def _tag_docs(tag: str) -> list[tuple[str, str]]:
    """``tag`` as the whole document, a top-level value, a key and deep inside a valid spec."""
    tiny = _dump(TINY)
    return [
        ("document", f"{tag}\n"),
        ("top-level value", f"{tiny}timeout: {tag}\n"),
        ("key", f"{tiny}? {tag}\n: 1\n"),
        ("study.name", tiny.replace("name: tiny", f"name: {tag}")),
        (
            "search choices",
            tiny.replace("- gaussian", f"- {tag}") if "\n" not in tag else tiny,
        ),
        (
            "data.kwargs",
            tiny.replace("name: digits", f"name: digits\n  kwargs:\n    a: {tag}"),
        ),
    ]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tags_are_never_executed(
    tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ran: list[Any] = []
    monkeypatch.setattr("os.system", lambda *a: ran.append(a))
    name = tag.split()[0].split(":", 2)[-1].rstrip(">")
    for where, text in _tag_docs(tag):
        result = _load_text(text, tmp_path)
        assert isinstance(result, SpecError), f"{where}: loaded {result!r}"
        message = str(result)
        assert "python/" in message and name.split("python/")[-1] in message, (where, message)
        assert "safe" in message, (where, message)  # says why: specs use safe YAML
        assert "line " in message, (where, message)
    assert not ran
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def _bomb(levels: int, width: int = 10) -> str:
    """A flow list holding ``levels`` nested anchors, each ``width`` aliases of the one before:
    ``width ** levels`` strings once expanded ("billion laughs")."""
    parts = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def _bomb_specs(bomb: str) -> list[tuple[str, dict[str, Any]]]:
    blobs = "tests.user_code.datamodules:BlobsDataModule"
    return [
        ("top-level unknown key", {"lol": "BOMB"}),
        ("study.name", {"study": {**TINY["study"], "name": "BOMB"}}),
        ("n_trials", {"n_trials": "BOMB"}),
        (
            "data.kwargs of a datamodule",
            {"data": {"name": "datamodule", "datamodule": blobs, "kwargs": {"k": "BOMB"}}},
        ),
        ("data.kwargs of digits", {"data": {**TINY["data"], "kwargs": {"k": "BOMB"}}}),
        (
            "model.kwargs",
            {
                "model": {
                    "family": "custom",
                    "target": "tests.user_code.models:UserMLP",
                    "kwargs": {"k": "BOMB"},
                }
            },
        ),
        (
            "search choices",
            {"search": {"regularization.dropout.hidden_rate": {"choices": "BOMB"}}},
        ),
        ("search dimension", {"search": {"regularization.dropout.hidden_rate": "BOMB"}}),
        ("execution", {"execution": "BOMB"}),
    ]


@pytest.mark.parametrize("levels", [4, 9])
def test_alias_bombs_are_refused_quickly(levels: int, tmp_path: Path) -> None:
    """PyYAML's safe loader shares aliased nodes (it does not copy them), so loading a bomb
    is cheap; what must not expand it is everything after: validation, error messages (the
    ``got <value>`` part) and serialization."""
    for where, sections in _bomb_specs(_bomb(levels)):
        text = _dump({**TINY, **sections}).replace("BOMB", _bomb(levels))
        start = time.perf_counter()
        result = _load_text(text, tmp_path)
        elapsed = time.perf_counter() - start
        assert elapsed < 5, f"{where}: {elapsed:.1f}s"
        if levels == 9:
            assert isinstance(result, SpecError), f"{where}: loaded"
            assert "too large" in str(result), str(result)
        _check_result(result)


def test_recursive_alias_and_deep_nesting(tmp_path: Path) -> None:
    tiny = _dump(TINY)
    cases = {
        "recursive list": f"{tiny}timeout: &r [*r]\n",
        "recursive mapping": tiny.replace("name: digits", "name: digits\n  kwargs: &m {m: *m}"),
        "deep flow list": "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "deep flow mapping": "a: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
        "deep kwargs": tiny.replace(
            "name: digits", "name: digits\n  kwargs: {k: " + "[" * 500 + "]" * 500 + "}"
        ),
    }
    for where, text in cases.items():
        start = time.perf_counter()
        result = _load_text(text, tmp_path)
        assert isinstance(result, SpecError), where
        assert time.perf_counter() - start < 10, where
        assert len(str(result)) < 5_000, where


# ----------------------------------------------------------------------------------------------
# 2. Mutations of the valid TINY spec.

#: Each section of a spec (dotted, as in the YAML) and the model that validates it.
SECTIONS: dict[str, type[Any]] = {
    "study": StudySection,
    "sampler": SamplerSection,
    "pruner": PrunerSection,
    "tracking": TrackingSection,
    "execution": ExecutionSection,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainSettings,
    "regularization": RegularizationConfig,
    "regularization.dropout": DropoutConfig,
    "regularization.l2": L2Config,
    "regularization.early_stopping": EarlyStoppingConfig,
}
FIELDS = sorted(
    f"{section}.{name}" for section, model in SECTIONS.items() for name in model.model_fields
)
#: Import paths (the only strings a spec imports): none of them exists or may run code.
SAFE_IMPORTS = [
    "zz_droptune_fuzz_missing:Thing",
    "tests.user_code.datamodules:BlobsDataModule",
    "tests.user_code.models:UserMLP",
    "tests.user_code.datamodules:Missing",
    "not an import path",
]
field_values = st.one_of(
    scalars,
    st.integers(-3, 12),
    st.sampled_from(
        [0, 1, 2, -1, 0.5, 0.999, 1.0, 1e-9, 1e300, 2**31 - 1, 2**31, 2**32, 2**63, -(2**63)]
    ),
    st.sampled_from(SAFE_IMPORTS),
    st.sampled_from(["datamodule", "csv", "synthetic", "mnist1d", "custom", "rnn", "cnn"]),
    st.sampled_from(["cpu", "auto", "0", "0,1", "xyz", ",", "0,,1", "-1", "1.5", "\u0662"]),
    st.sampled_from([*SAMPLERS, "median", "hyperband", "none", "asha"]),
    st.lists(st.integers(-2, 300), max_size=3),
)


def _safe_value(path: str, value: Any) -> Any:
    """Import paths only from :data:`SAFE_IMPORTS` (the fuzz never imports arbitrary modules)."""
    if path.endswith((".datamodule", ".target")) and isinstance(value, str) and ":" in value:
        return value if value in SAFE_IMPORTS else SAFE_IMPORTS[0]
    return value


def _candidates(path: str) -> list[Any]:
    """Values a field may well hold: its default and, for a choice, every allowed value."""
    section, _, name = path.rpartition(".")
    field = SECTIONS[section].model_fields[name]
    out = [field.get_default(call_default_factory=True)]
    annotations = [field.annotation]
    while annotations:
        annotation = annotations.pop()
        if typing.get_origin(annotation) is Literal:
            out += typing.get_args(annotation)
        else:
            annotations += typing.get_args(annotation)
    plain = bool | int | float | str | list | dict | None
    return [value for value in out if isinstance(value, plain)] or [None]


PLAUSIBLE = [1, 2, 3, 8, 0.1, 0.5, True, False, None, [8], [4, 4]]


@st.composite
def field_changes(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(FIELDS))
    value = draw(
        st.one_of(st.sampled_from(_candidates(path)), st.sampled_from(PLAUSIBLE), field_values)
    )
    return path, _safe_value(path, value)


@_fuzz(300)
@given(changes=st.lists(field_changes(), min_size=1, max_size=3))
def test_schema_aware_mutations(changes: list[tuple[str, Any]]) -> None:
    """Known fields set to allowed, plausible or boundary values, a few at a time (so that
    combinations such as a grid sampler over a huge range, another model family or pruner, or
    a family with another family's fields come up)."""
    data = TINY
    for path, value in changes:
        data = _set(data, path, value)
    with _scratch() as tmp:
        _check_result(_load_text(_dump(data), tmp))


bounds = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan, 0, 1, 2, -1, 0.5, 1e-6, 1e300, -1e300]),
    st.sampled_from([2**53, 10**20, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 300),
    scalars,
)
dimensions = st.one_of(
    st.fixed_dictionaries(
        {"low": bounds, "high": bounds},
        optional={
            "log": st.booleans(),
            "step": bounds,
            "type": st.sampled_from(["float", "int", "str"]),
        },
    ),
    st.fixed_dictionaries(
        {"low": bounds, "high": bounds, "type": st.just("int")},
        optional={"log": st.booleans(), "step": bounds},
    ),
    st.fixed_dictionaries({"choices": st.lists(st.one_of(scalars, documents), max_size=4)}),
    st.dictionaries(st.sampled_from(sorted(Distribution.model_fields)), bounds, max_size=4),
)


def _range(low: Any, high: Any, **extra: Any) -> Any:
    return st.tuples(low, high, st.fixed_dictionaries({}, optional=extra)).map(
        lambda t: {"low": min(t[0], t[1]), "high": max(t[0], t[1]), **t[2]}
    )


unit = st.floats(0.0, 0.95)
small = st.integers(1, 9)
#: Dimensions that are valid, or nearly so, for the paths a user would search.
GOOD_DIMENSIONS: dict[str, Any] = {
    **{
        f"regularization.dropout.{rate}": _range(unit, unit, step=st.sampled_from([0.05, 0.1]))
        for rate in RATES
    },
    "regularization.dropout.kind": st.lists(
        st.sampled_from(DROPOUT_KINDS), min_size=1, max_size=4, unique=True
    ).map(lambda kinds: {"choices": kinds}),
    "regularization.dropout.block_size": _range(small, small, type=st.just("int")),
    "regularization.l2.strength": _range(
        st.floats(1e-8, 1e-3), st.floats(1e-3, 1.0), log=st.booleans()
    ),
    "regularization.max_norm": _range(st.floats(0.5, 2), st.floats(2, 5)),
    "regularization.early_stopping.patience": _range(
        small, small, type=st.just("int"), step=st.integers(1, 3), log=st.booleans()
    ),
    "train.lr": _range(st.floats(1e-5, 1e-3), st.floats(1e-3, 0.1), log=st.booleans()),
    "train.max_epochs": _range(small, small, type=st.just("int"), step=st.integers(1, 3)),
    "data.batch_size": _range(small, st.integers(10, 64), type=st.just("int")),
    "model.hidden_size": _range(small, st.integers(10, 64), type=st.just("int")),
    "model.heads": _range(small, small, type=st.just("int")),
    "train.optimizer": st.just({"choices": ["adam", "adamw", "sgd"]}),
}


GOOD = sorted(GOOD_DIMENSIONS)


@st.composite
def search_spaces(draw: st.DrawFn) -> dict[str, Any]:
    space: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CONFIG_PATHS if draw(st.integers(0, 3)) == 0 else GOOD))
        good = GOOD_DIMENSIONS.get(path)
        space[path] = draw(dimensions if good is None or draw(st.integers(0, 2)) == 0 else good)
    return space


@pytest.mark.filterwarnings("ignore:The distribution is specified by:UserWarning")
@_fuzz(250)
@given(
    search=search_spaces(),
    sampler=st.sampled_from(SAMPLERS),
    family=st.sampled_from(["mlp", "cnn", "rnn", "transformer"]),
)
def test_search_space_fuzz(search: dict[str, Any], sampler: str, family: str) -> None:
    data = {
        **TINY,
        "search": search,
        "sampler": {"name": sampler, "seed": 0},
        "model": {"family": family},
    }
    if sampler == "nsgaii":
        data["study"] = {"name": "mo", "metrics": ["val_loss", "val_acc"]}
        data["study"]["directions"] = ["minimize", "maximize"]
    with _scratch() as tmp:
        _check_result(_load_text(_dump(data), tmp))


def test_tiny_spec_loads(tmp_path: Path) -> None:
    """The positive control of the mutations below."""
    result = _load_text(_dump(TINY), tmp_path)
    assert isinstance(result, StudySpec)
    _check_result(result)


paths = st.one_of(
    st.sampled_from(SPEC_PATHS),
    st.sampled_from(CONFIG_PATHS),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(".".join),
    st.lists(text_values.filter(bool), min_size=1, max_size=3).map(".".join),
)


@_fuzz(250)
@given(changes=st.lists(st.tuples(paths, documents), min_size=1, max_size=3))
def test_mutated_spec(changes: list[tuple[str, Any]]) -> None:
    data = TINY
    for path, value in changes:
        data = _set(data, path, value)
    with _scratch() as tmp:
        _check_result(_load_text(_dump(data), tmp))


def _assert_names(data: dict[str, Any], field: str, folder: Path) -> str:
    result = _load_text(_dump(data), folder)
    assert isinstance(result, SpecError), f"{field}: loaded"
    assert field in str(result), f"{field!r} not in {str(result)!r}"
    return str(result)


bad_rates = st.one_of(
    st.floats(max_value=-1e-300, allow_infinity=True),
    st.floats(min_value=1.0, allow_infinity=True),
    st.just(math.nan),
    text_values,
    st.booleans(),
    st.lists(st.floats(0, 0.5), max_size=2),
)


@_fuzz(60)
@given(field=st.sampled_from(RATES), value=bad_rates)
def test_bad_fixed_rate_names_its_path(field: str, value: Any) -> None:
    path = f"regularization.dropout.{field}"
    with _scratch() as tmp:
        _assert_names(_set(TINY, path, value), path, tmp)


@_fuzz(60)
@given(bound=st.sampled_from(["low", "high"]), value=bad_rates)
def test_bad_rate_bound_in_search_names_its_path(bound: str, value: Any) -> None:
    path = "regularization.dropout.hidden_rate"
    dimension = {"low": 0.0, "high": 0.5, bound: value}
    data = {**TINY, "search": {**TINY["search"], path: dimension}}
    with _scratch() as tmp:
        _assert_names(data, f"search.{path}", tmp)


PATIENCE = "regularization.early_stopping.patience"


@_fuzz(30)
@given(value=st.one_of(st.integers(max_value=0), st.integers(max_value=-(10**30))))
def test_nonpositive_patience_names_its_path(value: int) -> None:
    with _scratch() as tmp:
        _assert_names(_set(TINY, PATIENCE, value), PATIENCE, tmp)


@_fuzz(10)
@given(value=st.integers(min_value=10**6, max_value=10**30))
def test_huge_patience_is_accepted(value: int) -> None:
    with _scratch() as tmp:
        result = _load_text(_dump(_set(TINY, PATIENCE, value)), tmp)
    assert isinstance(result, StudySpec), str(result)
    assert result.base.regularization.early_stopping.patience == value


unknown_kinds = st.one_of(text_values, st.sampled_from(WORDS)).filter(
    lambda kind: kind not in DROPOUT_KINDS
)
KIND = "regularization.dropout.kind"


@_fuzz(40)
@given(kind=unknown_kinds, searched=st.booleans())
def test_unknown_dropout_kind_names_its_path(kind: str, searched: bool) -> None:
    if searched:
        data = _set(TINY, "search", {**TINY["search"], KIND: {"choices": ["standard", kind]}})
        field = f"search.{KIND}"
    else:
        data = _set(TINY, KIND, kind)
        data["search"] = {k: v for k, v in TINY["search"].items() if k != KIND}
        field = KIND
    with _scratch() as tmp:
        message = _assert_names(data, field, tmp)
    assert "standard" in message  # the allowed kinds are listed


_EXISTING = set(CONFIG_PATHS)


@_fuzz(60)
@given(path=st.one_of(paths, st.text(st.characters(codec="utf-8"), max_size=20)))
def test_search_path_that_does_not_exist_names_it(path: str) -> None:
    # PyYAML writes a few line-break characters (NEL, LS, PS) into quoted keys as they are, and
    # reads them back as spaces: such a key is not the path this test means.
    assume(path not in _EXISTING and load_yaml_mapping(_dump({path: 1})) == {path: 1})
    data = _set(TINY, "search", {**TINY["search"], path: {"low": 0.0, "high": 0.5}})
    with _scratch() as tmp:
        _assert_names(data, f"search.{path}", tmp)


bad_urls = st.one_of(
    st.sampled_from(
        [
            "::not a url",
            "ftp://x",
            "redis://localhost:6379/0",
            "mongodb://h/db",
            "",
            " ",
            "sqlite:",
            "sqlite:/x.db",
            "postgresql",
            "http://example.com/db",
            ":memory:",
            "file:///tmp/x.db",
        ]
    ),
    st.text(st.characters(codec="utf-8"), max_size=30).filter(
        lambda text: not text.strip().lower().startswith(("sqlite", "postgres", "mysql"))
    ),
)


@_fuzz(60)
@given(url=bad_urls)
def test_storage_url_that_does_not_parse_names_storage(url: str) -> None:
    with _scratch() as tmp:
        message = _assert_names({**TINY, "storage": url}, "storage:", tmp)
    # says what would work (a NUL character is refused first, in any value, as such)
    assert ("NUL character" if "\x00" in url else "sqlite") in message


EPOCHS = "train.max_epochs"
#: (dotted path set, value, the path the message must name): boundaries the fuzz found.
BOUNDARIES: list[tuple[str, Any, str]] = [
    ("execution.devices", "xyz", "execution.devices"),
    ("execution.devices", "", "execution.devices"),
    ("execution.devices", "0,x", "execution.devices"),
    ("execution.devices", "\u0662", "execution.devices"),  # a digit, but not 0-9
    ("sampler.seed", -1, "sampler.seed"),
    ("sampler.seed", 2**32, "sampler.seed"),
    ("timeout", math.nan, "timeout"),
    ("n_trials", 0, "n_trials"),
    (f"search.{EPOCHS}", {"low": 1, "high": math.inf, "type": "int"}, f"search.{EPOCHS}.high"),
    (f"search.{EPOCHS}", {"low": 1, "high": 4, "type": "int", "step": 0.5}, f"search.{EPOCHS}"),
    ("search.train.lr", {"low": -math.inf, "high": 0.1}, "search.train.lr.low"),
    ("search.train.devices", {"choices": [1, 10**400]}, "search.train.devices.choices"),
]


@pytest.mark.parametrize(("path", "value", "named"), BOUNDARIES)
def test_boundary_values_name_their_path(
    path: str, value: Any, named: str, tmp_path: Path
) -> None:
    if path.startswith("search."):  # a search key is one dotted string
        data = {**TINY, "search": {path.removeprefix("search."): value}}
    else:
        data = _set(TINY, path, value)
    _assert_names(data, named, tmp_path)


def test_huge_grid_is_refused_quickly(tmp_path: Path) -> None:
    data = {
        **TINY,
        "sampler": {"name": "grid"},
        "search": {EPOCHS: {"low": 1, "high": 10**9, "type": "int"}},
    }
    start = time.perf_counter()
    message = _assert_names(data, f"search.{EPOCHS}", tmp_path)
    assert "grid" in message and time.perf_counter() - start < 5
    data["search"][EPOCHS]["high"] = 8  # the positive control
    _check_result(_load_text(_dump(data), tmp_path))


def test_sampler_that_needs_a_missing_package(tmp_path: Path) -> None:
    import importlib.util

    result = _load_text(_dump({**TINY, "sampler": {"name": "cmaes"}}), tmp_path)
    if importlib.util.find_spec("cmaes") is None:
        assert isinstance(result, SpecError) and "pip install cmaes" in str(result)
    else:
        _check_result(result)


def test_bad_storage_types_name_storage(tmp_path: Path) -> None:
    for value in (1, 1.5, True, [], {"url": "sqlite:///x.db"}):
        _assert_names({**TINY, "storage": value}, "storage", tmp_path)


DATAMODULE = "data.datamodule"
BAD_IMPORTS = [
    "no.such.module:Thing",
    "os:system",
    "os.path:join",
    "json:JSONDecoder",
    "os:no_such_attribute",
    "tests.user_code.models:UserMLP",
    "tests.user_code.datamodules:np",
    "tests.user_code.datamodules:BlobsDataModule.no_such",
    "os",
    "os:",
    ":system",
    "a:b:c",
    "1abc:X",
    "os.system",
    "",
]


@pytest.mark.parametrize("target", BAD_IMPORTS)
def test_datamodule_that_does_not_import_names_the_field(target: str, tmp_path: Path) -> None:
    data = {**TINY, "data": {"name": "datamodule", "datamodule": target}}
    _assert_names(data, DATAMODULE, tmp_path)


@_fuzz(30)
@given(
    module=st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), max_size=3),
    attr=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
)
def test_datamodule_in_a_missing_module_names_the_field(module: list[str], attr: str) -> None:
    target = ".".join(["zz_droptune_fuzz_missing", *module]) + ":" + attr
    data = {**TINY, "data": {"name": "datamodule", "datamodule": target}}
    with _scratch() as tmp:
        message = _assert_names(data, DATAMODULE, tmp)
    assert "zz_droptune_fuzz_missing" in message


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("raise RuntimeError('boom at import')\n", "boom at import"),
        ("def broken(:\n", "SyntaxError"),
        ("import zz_droptune_fuzz_not_there\n", "zz_droptune_fuzz_not_there"),
        ("Data = 3\n", "int"),
    ],
)
def test_datamodule_whose_module_fails_names_the_field(
    source: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"zz_droptune_fuzz_{abs(hash(source)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    data = {**TINY, "data": {"name": "datamodule", "datamodule": f"{name}:Data"}}
    message = _assert_names(data, DATAMODULE, tmp_path)
    assert reason in message


@pytest.mark.parametrize(
    "target",
    ["os:system", "zz_droptune_fuzz_missing:Net", "tests.user_code.datamodules:BlobsDataModule"],
)
def test_model_target_that_is_not_a_module_names_the_field(target: str, tmp_path: Path) -> None:
    model = {"family": "custom", "target": target, "kwargs": {"command": "touch PWNED"}}
    _assert_names({**TINY, "model": model}, "model.target", tmp_path)
    assert not (tmp_path / "PWNED").exists()
    model["target"] = "tests.user_code.models:UserMLP"  # the positive control
    model["kwargs"] = {}
    assert isinstance(_load_text(_dump({**TINY, "model": model}), tmp_path), StudySpec)


def test_valid_datamodule_loads(tmp_path: Path) -> None:
    """The positive control of the datamodule cases above."""
    target = "tests.user_code.datamodules:BlobsDataModule"
    result = _load_text(
        _dump({**TINY, "data": {"name": "datamodule", "datamodule": target}}), tmp_path
    )
    assert isinstance(result, StudySpec), str(result)
    assert result.base.data.datamodule == target


# ----------------------------------------------------------------------------------------------
# 3. The command line.

COMMANDS = (
    "train",
    "run",
    "worker",
    "status",
    "studies",
    "best",
    "export",
    "sync",
    "report",
    "ui",
)
_CLICK = typer.main.get_command(app)
#: Each command's options: (name, takes a value).
OPTIONS: dict[str, list[tuple[str, bool]]] = {
    name: [
        (opt, not param.is_flag)
        for param in _CLICK.commands[name].params  # type: ignore[attr-defined]
        if param.param_type_name == "option"
        for opt in (*param.opts, *param.secondary_opts)
    ]
    for name in COMMANDS
}
ARGUMENTS: dict[str, int] = {
    name: sum(p.param_type_name == "argument" for p in _CLICK.commands[name].params)  # type: ignore[attr-defined]
    for name in COMMANDS
}
SPEC_COMMANDS = ("train", "run", "worker")

#: Spec files every CLI example finds in its working directory (``valid.yaml`` is TINY).
BAD_SPECS: dict[str, str] = {
    "bad-yaml.yaml": "study: {name: x\n",
    "bad-tag.yaml": _dump(TINY) + 'timeout: !!python/object/apply:os.system ["touch PWNED"]\n',
    "bad-rate.yaml": _dump(_set(TINY, f"regularization.dropout.{RATES[0]}", 1.5)),
    "bad-kind.yaml": _dump(
        {**_set(TINY, KIND, "bogus"), "search": {"train.lr": {"low": 1e-4, "high": 1e-2}}}
    ),
    "bad-patience.yaml": _dump(_set(TINY, PATIENCE, -1)),
    "bad-search.yaml": _dump({**TINY, "search": {"model.nope": {"low": 0, "high": 1}}}),
    "bad-storage.yaml": _dump({**TINY, "storage": "::not a url"}),
    "bad-devices.yaml": _dump(_set(TINY, "execution.devices", "xyz")),
    "bad-datamodule.yaml": _dump(
        {**TINY, "data": {"name": "datamodule", "datamodule": "os:system"}}
    ),
    "bad-bomb.yaml": _dump({**TINY, "timeout": "BOMB"}).replace("BOMB", _bomb(9)),
    "list.yaml": "- study\n",
    "empty.yaml": "",
}
SPEC_FILES = ["valid.yaml", *BAD_SPECS, "missing.yaml", ".", ""]

#: Option values a user might type, right or wrong; ``{db}`` is the example's SQLite file.
VALUES: dict[str, list[str]] = {
    "--storage": [
        "{db}",
        "sqlite:///sub/other.db",
        "::not a url",
        "ftp://x",
        "redis://localhost:6379",
        "postgresql+psycopg://u:s3cr3t@127.0.0.1:1/x",
        "sqlite:///",
        "",
    ],
    "--tracking-uri": ["ftp://x", "::bad", "file:///tmp", "sqlite:///mlflow.db", ""],
    "--devices": ["auto", "cpu", "0", "0,1", "xyz", ",", "-1", ""],
    "--set": ["bad", "a.b=", "=", "=1", "zz.a=1", "zz=[1, 2]", "train.nope=1"],
    "--format": ["yaml", "json", "xml", ""],
    "--study": ["tiny", "nope", ""],
    "--study-name": ["tiny", "nope", ""],
}
NUMBERS = ["-1", "0", "1", "2", "1.5", "xyz", "", "1e3", "99999999999999999999999", "-0"]
NUMERIC = {
    "--n-trials",
    "--timeout",
    "--workers",
    "--per-device",
    "--worker-index",
    "--deadline",
    "--max-epochs",
    "--seed",
    "--port",
}
junk = st.one_of(
    st.sampled_from(["--bogus", "-x", "--", "-", "extra", "--help", "--storage", "-v", "--set"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10),
)
#: The files each command would start working with: ``train`` ignores the tuning sections
#: (``search``, ``storage``, ``execution``) and takes an empty file as all defaults.
STARTS = {
    "train": {
        "valid.yaml",
        "bad-search.yaml",
        "bad-storage.yaml",
        "bad-devices.yaml",
        "bad-datamodule.yaml",  # train does not check the import path before fit()
        "empty.yaml",
    },
    "run": {"valid.yaml"},
    "worker": {"valid.yaml"},
}
#: For such a file, the last tokens make the command refuse to start (so that nothing ever
#: trains here); each is a known usage error.
STOPPERS: dict[str, list[list[str]]] = {
    "train": [["--max-epochs", "0"], ["--devices", "xyz"], ["--devices", ","], ["--bogus"]],
    "run": [
        ["--n-trials", "-1"],
        ["--n-trials", "0"],
        ["--per-device", "0"],
        ["--workers", "-1"],
        ["--timeout", "0"],
        ["--bogus"],
    ],
    "worker": [
        ["--n-trials", "0"],
        ["--worker-index", "-1"],
        ["--set", "bad"],
        ["--set", "a.b="],
        ["--set", "train.lr=-1"],
        ["--storage", "ftp://x"],
        ["--bogus"],
    ],
}


@st.composite
def argument_lists(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    argv = ["-v"] if draw(st.integers(0, 9)) == 0 else []
    argv.append(command)
    for _ in range(ARGUMENTS[command]):
        if draw(st.integers(0, 9)) == 0:
            break  # a missing argument
        if command in SPEC_COMMANDS:
            argv.append(draw(st.sampled_from(SPEC_FILES)))
        else:
            argv.append(draw(st.sampled_from(["tiny", "nope", ""])))
    for _ in range(draw(st.integers(0, 4))):
        option, takes_value = draw(st.sampled_from(OPTIONS[command]))
        argv.append(option)
        if takes_value:
            known = VALUES.get(option, NUMBERS if option in NUMERIC else ["tiny", "out/x"])
            argv.append(draw(st.one_of(st.sampled_from(known), st.sampled_from(NUMBERS), junk)))
    if draw(st.integers(0, 4)) == 0:
        argv.insert(draw(st.integers(1, len(argv))), draw(junk))
    if command in SPEC_COMMANDS and STARTS[command] & set(argv):
        argv += draw(st.sampled_from(STOPPERS[command]))
    return argv


class _WouldRun(BaseException):
    """Raised by the stand-ins of training, workers and the UI server: the CLI got past every
    check with input that should have stopped it (a BaseException, so main() cannot map it to
    an exit code)."""


def _no_study_anywhere(folder: Path) -> None:
    """No SQLite file under ``folder`` holds a study (a file with empty tables is fine)."""
    for db in folder.rglob("*.db"):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if "studies" in tables:
                names = conn.execute("SELECT study_name FROM studies").fetchall()
                assert not names, f"{db} holds the studies {names}"


@contextlib.contextmanager
def _cli_sandbox() -> Iterator[Path]:
    """A working directory with the spec files, no storage or tracking URL in the
    environment, and training, workers and the MLflow UI replaced by :class:`_WouldRun`."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _WouldRun(f"reached with {args!r}")

    def start_workers(procs: Any, plan: list[Any], *args: Any) -> None:
        if plan:  # run --workers 0 only creates the study
            refuse(plan, *args)

    with _scratch() as tmp, pytest.MonkeyPatch.context() as patch:
        for name in ("DROPTUNE_STORAGE", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        patch.setattr("droptune.study.runner._start_workers", start_workers)
        patch.setattr("droptune.study.worker.run_worker", refuse)
        patch.setattr("droptune.training.fit", refuse)
        patch.setattr("droptune.tracking._server.start_server", refuse)
        (tmp / "valid.yaml").write_text(_dump(TINY))
        for name, text in BAD_SPECS.items():
            (tmp / name).write_text(text)
        yield tmp


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_cli(argv: list[str], code: int, out: str, err: str, tmp: Path) -> None:
    shown = f"droptune {argv!r} -> {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert code in (0, 2), shown
    assert "Traceback" not in out + err, shown
    if code == 2:
        assert "rror" in err, shown  # "error: ..." (droptune) or "Error: ..." (usage)
    else:  # only help and the two listing commands succeed on this input
        command = next((arg for arg in argv if arg in COMMANDS), None)
        assert "--help" in argv or command in ("studies", "status"), shown
    assert "s3cr3t" not in out + err, shown
    assert not (tmp / "PWNED").exists()
    _no_study_anywhere(tmp)


@_fuzz(150)
@given(argv=argument_lists())
def test_cli_argument_lists(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with _cli_sandbox() as tmp:
        argv = [arg.replace("{db}", f"sqlite:///{tmp / 'fuzz.db'}") for arg in argv]
        code, out, err = _cli(argv, capsys)
        _check_cli(argv, code, out, err, tmp)


NAMED_CASES = [
    ["run", "bad-rate.yaml", "--storage", "{db}"],
    ["run", "valid.yaml", "--storage", "{db}", "--n-trials", "-1"],
    ["run", "valid.yaml", "--storage", "{db}", "--per-device", "0"],
    ["run", "bad-devices.yaml", "--storage", "{db}"],
    ["run", "bad-datamodule.yaml", "--storage", "{db}"],
    ["worker", "valid.yaml", "--storage", "{db}", "--set", "bad"],
    ["worker", "valid.yaml", "--storage", "{db}", "--set", "a.b="],
    ["worker", "valid.yaml", "--storage", "{db}", "--set", "regularization.dropout.kind=x"],
    ["worker", "bad-tag.yaml", "--storage", "{db}"],
    ["train", "valid.yaml", "--devices", "xyz"],
    ["train", "bad-bomb.yaml"],
    ["ui", "nope", "--storage", "{db}"],
    ["ui", "nope"],
    ["sync", "nope", "--storage", "{db}", "--tracking-uri", "ftp://x"],
    ["report", "nope", "--storage", "::bad"],
    ["best", "--study", "nope", "--storage", "{db}", "--format", "xml"],
    ["export", "--study", "nope", "--storage", "{db}", "-o", "out.yaml"],
]


@pytest.mark.parametrize("argv", NAMED_CASES, ids=" ".join)
def test_cli_named_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with _cli_sandbox() as tmp:
        argv = [arg.replace("{db}", f"sqlite:///{tmp / 'fuzz.db'}") for arg in argv]
        code, out, err = _cli(argv, capsys)
        _check_cli(argv, code, out, err, tmp)
        assert code == 2, err
        assert not (tmp / "out.yaml").exists() and not (tmp / "runs").exists()


@pytest.mark.parametrize(
    ("command", "tracking_uri"),
    [("sync", "ftp://x"), ("report", "::bad"), ("ui", "file:///etc"), ("ui", "mlflow.db")],
)
def test_tracking_commands_refuse_bad_tracking_uri(
    command: str, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a study that exists (created without training by ``run --workers 0``, which is
    also the positive control of the no-study checks above)."""
    with _cli_sandbox() as tmp:
        db = f"sqlite:///{tmp / 'fuzz.db'}"
        code, _, err = _cli(["run", "valid.yaml", "--storage", db, "--workers", "0"], capsys)
        assert code == 0, err
        with pytest.raises(AssertionError, match="holds the studies"):
            _no_study_anywhere(tmp)
        argv = [command, "tiny", "--storage", db, "--tracking-uri", tracking_uri]
        code, out, err = _cli(argv, capsys)
        assert code == 2, f"{argv} -> {code}\n{out}\n{err}"
        assert "Traceback" not in out + err
        assert "tracking" in err.lower(), err


@_fuzz(100)
@given(text=st.one_of(yaml_like, st.sampled_from(YAML_TOKENS), text_values))
def test_yaml_value_parser_for_overrides(text: str) -> None:
    """``load_yaml_value`` (what ``--set path=value`` should parse its value with) returns a
    value or raises a ConfigError."""
    with contextlib.suppress(ConfigError):
        load_yaml_value(text, "--set x")


# ----------------------------------------------------------------------------------------------
# Crashes the fuzzing found outside the spec loader (each fixed; kept as regressions).


@pytest.mark.parametrize(
    "value",
    ["x=[unclosed", "x=!!python/name:os.system", "x=" + "1" * 5000],
    ids=["yaml-error", "python-tag", "5000-digit-int"],
)
def test_worker_set_value_that_is_not_yaml_exits_2(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with _cli_sandbox() as tmp:
        argv = ["worker", "valid.yaml", "--storage", f"sqlite:///{tmp / 'f.db'}", "--set", value]
        code, out, err = _cli(argv, capsys)
        _check_cli(argv, code, out, err, tmp)


def test_run_with_bad_devices_creates_no_study(capsys: pytest.CaptureFixture[str]) -> None:
    with _cli_sandbox() as tmp:
        argv = ["run", "valid.yaml", "--storage", f"sqlite:///{tmp / 'f.db'}", "--devices", "xyz"]
        code, out, err = _cli(argv, capsys)
        assert code == 2, err
        _check_cli(argv, code, out, err, tmp)


@pytest.mark.parametrize(
    ("section", "field"), [("data", "datamodule"), ("model", "target")], ids=["data", "model"]
)
def test_config_import_path_to_other_callable_is_never_called(
    section: str, field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "datamodule" if section == "data" else "custom"
    key = "name" if section == "data" else "family"
    config = {section: {key: name, field: "os:mkdir", "kwargs": {"path": "PWNED"}}}
    if section == "model":
        config["data"] = {"name": "synthetic", "n_samples": 50}
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        cfg = load_config(config)
        build_module(cfg, build_datamodule(cfg))
    assert not (tmp_path / "PWNED").exists()
