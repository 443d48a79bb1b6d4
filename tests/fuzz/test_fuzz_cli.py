"""Fuzzing the command line: any argument list gives exit 0 or 2 with a message, never a
traceback, and never leaves a study behind."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st
import pytest
import typer

from droptune.cli import app
from droptune.config import load_yaml_value
from droptune.exceptions import ConfigError
from tests.fuzz.fuzzing import BAD_SPECS
from tests.fuzz.fuzzing import COMMANDS
from tests.fuzz.fuzzing import YAML_TOKENS
from tests.fuzz.fuzzing import _check_cli
from tests.fuzz.fuzzing import _cli
from tests.fuzz.fuzzing import _cli_sandbox
from tests.fuzz.fuzzing import _fuzz
from tests.fuzz.fuzzing import _no_study_anywhere
from tests.fuzz.fuzzing import text_values
from tests.fuzz.fuzzing import yaml_like


# ----------------------------------------------------------------------------------------------
# 3. The command line.

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
