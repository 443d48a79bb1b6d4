"""What the fuzz tests share: the hypothesis settings (a fixed number of examples, derandomized,
no example database, so CI sees the same inputs on every run), scratch folders, the result
contract of ``load_spec`` (a ``StudySpec`` or a ``SpecError`` naming a field), YAML dumping and
the strategies of documents, paths and values."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import copy
from pathlib import Path
import re
import sqlite3
import string
import tempfile
from typing import Any

from hypothesis import HealthCheck
from hypothesis import currently_in_test_context
from hypothesis import event
from hypothesis import settings
from hypothesis import strategies as st
import optuna
import pytest
import yaml

from droptune.cli import main
from droptune.config import DropoutConfig
from droptune.config import TrainConfig
from droptune.exceptions import DroptuneError
from droptune.exceptions import SpecError
from droptune.layers import DROPOUT_KINDS
from droptune.study.factories import make_pruner
from droptune.study.factories import make_sampler
from droptune.study.runner import plan_workers
from droptune.study.space import suggest
from droptune.study.spec import StudySpec
from droptune.study.spec import load_spec
from droptune.study.spec import spec_from_dict
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


def _bomb(levels: int, width: int = 10) -> str:
    """A flow list holding ``levels`` nested anchors, each ``width`` aliases of the one before:
    ``width ** levels`` strings once expanded ("billion laughs")."""
    parts = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


PATIENCE = "regularization.early_stopping.patience"


KIND = "regularization.dropout.kind"


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

    def start_workers(launch: Any, plan: list[Any], procs: Any) -> None:
        if plan:  # run --workers 0 only creates the study
            refuse(launch, plan)

    with _scratch() as tmp, pytest.MonkeyPatch.context() as patch:
        for name in ("DROPTUNE_STORAGE", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        patch.setattr("droptune.study.runner.start_workers", start_workers)
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
