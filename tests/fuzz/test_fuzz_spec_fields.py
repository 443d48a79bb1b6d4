"""Mutations of a valid spec, field by field (schema-aware values, search spaces, rates, paths,
storage URLs, user code targets): every refusal is a ``SpecError`` that names the field."""

from __future__ import annotations

import math
from pathlib import Path
import sys
import time
import typing
from typing import Any
from typing import Literal

from hypothesis import assume
from hypothesis import given
from hypothesis import strategies as st
import pytest

from droptune.config import DataConfig
from droptune.config import DropoutConfig
from droptune.config import EarlyStoppingConfig
from droptune.config import L2Config
from droptune.config import ModelConfig
from droptune.config import RegularizationConfig
from droptune.config import TrainSettings
from droptune.config import load_yaml_mapping
from droptune.exceptions import SpecError
from droptune.layers import DROPOUT_KINDS
from droptune.study.spec import SAMPLERS
from droptune.study.spec import Distribution
from droptune.study.spec import ExecutionSection
from droptune.study.spec import PrunerSection
from droptune.study.spec import SamplerSection
from droptune.study.spec import StudySection
from droptune.study.spec import StudySpec
from droptune.study.spec import TrackingSection
from tests.fuzz.fuzzing import CONFIG_PATHS
from tests.fuzz.fuzzing import KIND
from tests.fuzz.fuzzing import PATIENCE
from tests.fuzz.fuzzing import RATES
from tests.fuzz.fuzzing import SPEC_PATHS
from tests.fuzz.fuzzing import WORDS
from tests.fuzz.fuzzing import _check_result
from tests.fuzz.fuzzing import _dump
from tests.fuzz.fuzzing import _fuzz
from tests.fuzz.fuzzing import _load_text
from tests.fuzz.fuzzing import _scratch
from tests.fuzz.fuzzing import _set
from tests.fuzz.fuzzing import documents
from tests.fuzz.fuzzing import scalars
from tests.fuzz.fuzzing import text_values
from tests.study.helpers import TINY


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
