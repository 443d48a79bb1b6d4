"""Fuzzing the spec loader with arbitrary YAML documents, text and bytes: ``load_spec`` returns a
``StudySpec`` or raises a ``SpecError``, never anything else; Python YAML tags are never executed;
alias bombs and deep nesting are refused quickly."""

from __future__ import annotations

from pathlib import Path
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
import pytest

from droptune.exceptions import SpecError
from droptune.study.spec import StudySpec
from tests.fuzz.fuzzing import _bomb
from tests.fuzz.fuzzing import _check_result
from tests.fuzz.fuzzing import _dump
from tests.fuzz.fuzzing import _fuzz
from tests.fuzz.fuzzing import _load_text
from tests.fuzz.fuzzing import _scratch
from tests.fuzz.fuzzing import corrupted_tiny
from tests.fuzz.fuzzing import documents
from tests.fuzz.fuzzing import yaml_like
from tests.study.helpers import TINY


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
