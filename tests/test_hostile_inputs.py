"""Hostile input, one row per case an outside probe found (and its neighbours): each row runs
the real command line in a sandbox and asserts the exit code, one short message naming the
field, no traceback, and that nothing was created (no study, no ``runs/``, no file outside the
working directory). Classes: study names that escape ``runs/``; inputs that would fail every
trial (data files, metrics, non-finite numbers, thread counts, empty layers, duplicate YAML
keys, tracking URIs); read-only commands on a storage that does not exist; unwritable outputs;
credentials in query parameters; an unreachable database (exit 1, not 2)."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
from pathlib import Path
import subprocess
from typing import Any

import pytest

from tests.fuzz.fuzzing import _cli
from tests.fuzz.fuzzing import _cli_sandbox
from tests.fuzz.fuzzing import _dump
from tests.fuzz.fuzzing import _no_study_anywhere
from tests.fuzz.fuzzing import _set
from tests.study.helpers import TINY


def _spec(**changes: Any) -> str:
    data = TINY
    for path, value in changes.items():
        data = _set(data, path.replace("__", "."), value)
    return _dump(data)


def _csv_spec(path: str, target: str = "label") -> str:
    return _dump({**TINY, "data": {"name": "csv", "path": path, "target": target}})


SPECS: dict[str, str] = {
    "inf-lr.yaml": _spec(train__lr=float("inf")),
    "nan-l2.yaml": _spec(regularization__l2__strength=float("nan")),
    "threads.yaml": _spec(train__num_threads=1_000_000),
    "no-hidden.yaml": _dump(
        {
            **_set(TINY, "model.hidden", []),
            "search": {"regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5}},
        }
    ),
    "duplicate-key.yaml": "n_trials: 3\n" + _dump(TINY),
    "metric.yaml": _spec(study__metric="val_accuracy"),
    "metrics.yaml": _dump(
        {
            **TINY,
            "study": {
                "name": "tiny",
                "metrics": ["val_loss", "val_rmse"],
                "directions": ["minimize", "minimize"],
            },
            "sampler": {"name": "nsgaii"},
        }
    ),
    "csv-missing.yaml": _csv_spec("nope.csv"),
    "csv-dir.yaml": _csv_spec("folder.csv"),
    "csv-target.yaml": _csv_spec("good.csv", target="nope"),
    "csv-nan.yaml": _csv_spec("nan.csv"),
    "csv-empty-cell.yaml": _csv_spec("empty.csv"),
    "ftp-tracking.yaml": _dump({**TINY, "tracking": {"enabled": True, "uri": "ftp://x"}}),
    "study-only.yaml": "study: {name: tiny}\n",
    "many-workers.yaml": _spec(execution__workers=1000),
    "huge-layer.yaml": _spec(model__hidden=[100_000_000_000]),
    "no-host.yaml": _dump({**TINY, "tracking": {"enabled": True, "uri": "http://"}}),
    "memory-store.yaml": _dump({**TINY, "tracking": {"enabled": True, "uri": "sqlite:///"}}),
    "proc-store.yaml": _dump(
        {**TINY, "tracking": {"enabled": True, "uri": "sqlite:////proc/droptune/m.db"}}
    ),
    "no-such-db.yaml": _dump(
        {
            **TINY,
            "tracking": {
                "enabled": True,
                "uri": "postgresql+psycopg://postgres@127.0.0.1:5432/zz_no_db",
            },
        }
    ),
    "empty-mapping.yaml": "{}\n",
    "nul-storage.yaml": _spec(storage="sqlite:///x\x00.db"),
    "nul-code-dir.yaml": _dump({**TINY, "code_dir": "a\x00b"}),
}
CSVS = {
    "good.csv": "a,b,label\n1,2,0\n3,4,1\n5,6,0\n",
    "nan.csv": "a,b,label\n1,nan,0\n3,4,1\n",
    "empty.csv": "a,b,label\n1,2,0\n3,,1\n",
}

#: (argv, what the one message must contain). ``{db}``: an SQLite file that does not exist;
#: ``{abs}``: an absolute path outside the sandbox.
ROWS: list[tuple[list[str], str]] = [
    # a study name from the command line never becomes a path outside runs/
    (["run", "valid.yaml", "--study-name", "../escape", "--workers", "0"], "--study-name"),
    (["run", "valid.yaml", "--study-name", "{abs}", "--workers", "0"], "--study-name"),
    (["run", "valid.yaml", "--study-name", "..", "--workers", "0"], "--study-name"),
    (["worker", "valid.yaml", "--study-name", "../escape"], "--study-name"),
    (["sync", "../escape"], "STUDY"),
    (["report", ".."], "STUDY"),
    (["ui", "{abs}"], "STUDY"),
    (["confirm", "../escape"], "STUDY"),
    (["best", "--study", "../escape"], "--study"),
    (["export", "--study", "..", "-o", "out.yaml"], "--study"),
    (["status", "--storage", "{db}", "--study", "../escape"], "--study"),
    # read-only commands never create a storage
    (["status", "--storage", "{db}"], "no such storage"),
    (["studies", "--storage", "{db}"], "no such storage"),
    (["best", "--study", "tiny", "--storage", "{db}"], "no such storage"),
    (["export", "--study", "tiny", "--storage", "{db}", "-o", "out.yaml"], "no such storage"),
    (["confirm", "tiny", "--storage", "{db}"], "no such storage"),
    # inputs that would fail every trial are refused before anything is created
    (["run", "inf-lr.yaml", "--storage", "{db}"], "train.lr"),
    (["run", "nan-l2.yaml", "--storage", "{db}"], "regularization.l2.strength"),
    (["run", "threads.yaml", "--storage", "{db}"], "train.num_threads"),
    (["run", "no-hidden.yaml", "--storage", "{db}"], "model.hidden is empty"),
    (["run", "duplicate-key.yaml", "--storage", "{db}"], "duplicate key 'n_trials'"),
    (["run", "metric.yaml", "--storage", "{db}"], "study.metric"),
    (["run", "metrics.yaml", "--storage", "{db}"], "study.metrics"),
    (["run", "csv-missing.yaml", "--storage", "{db}"], "data.path"),
    (["run", "csv-dir.yaml", "--storage", "{db}"], "data.path"),
    (["run", "csv-target.yaml", "--storage", "{db}"], "data.target"),
    (["run", "csv-nan.yaml", "--storage", "{db}"], "data.path"),
    (["run", "csv-empty-cell.yaml", "--storage", "{db}"], "data.path"),
    (["worker", "csv-nan.yaml", "--storage", "{db}"], "data.path"),
    (["run", "ftp-tracking.yaml", "--storage", "{db}"], "tracking.uri"),
    (["train", "csv-nan.yaml", "--output", "out"], "data.path"),
    (["train", "inf-lr.yaml", "--output", "out"], "train.lr"),
    (["train", "study-only.yaml", "--output", "out"], "no training section"),
    (["train", "empty-mapping.yaml", "--output", "out"], "no training section"),
    (["train", "valid.yaml", "--output", "/proc/droptune-x"], "--output"),
    (["train", "good.csv", "--output", "out"], "good.csv"),
    (["confirm", "tiny", "--storage", "{db}", "--top-k", "0"], "--top-k"),
    # hundreds of local workers exhaust any host's memory (seen: the kernel killed them)
    (["run", "valid.yaml", "--storage", "{db}", "--workers", "400"], "--workers"),
    (["run", "many-workers.yaml", "--storage", "{db}"], "--workers"),
    (["run", "huge-layer.yaml", "--storage", "{db}"], "model.hidden[0]"),
    # tracking stores that can never work: refused before the study exists
    (["run", "no-host.yaml", "--storage", "{db}"], "names no host"),
    (["run", "memory-store.yaml", "--storage", "{db}"], "in-memory"),
    (["run", "proc-store.yaml", "--storage", "{db}"], "cannot be created"),
    (["run", "no-such-db.yaml", "--storage", "{db}"], "does not exist"),
    # a folder where a file is expected; non-finite seconds
    (["run", "folder.csv", "--storage", "{db}"], "is a folder"),
    (["train", "folder.csv", "--output", "out"], "is a folder"),
    (["run", "valid.yaml", "--storage", "{db}", "--timeout", "inf"], "--timeout"),
    (["run", "valid.yaml", "--storage", "{db}", "--timeout", "nan"], "--timeout"),
    (["worker", "valid.yaml", "--storage", "{db}", "--deadline", "inf"], "--deadline"),
    # a NUL character in any value (paths, URLs): one message, not a bare ValueError
    (["run", "nul-storage.yaml"], "NUL"),
    (["run", "nul-code-dir.yaml"], "NUL"),
    (["train", "nul-code-dir.yaml", "--output", "out"], "NUL"),
    # usage errors: one line too
    (["run", "valid.yaml", "--workers", "-1"], "--workers"),
    (["run", "valid.yaml", "--n-trials", "abc"], "--n-trials"),
    (["run"], "SPEC"),
    (["best"], "STUDY"),
    (["export", "-o", "out.yaml"], "STUDY"),
    (["best", "tiny", "--study", "other"], "disagree"),
    (["--bogus"], "--bogus"),
]


@contextlib.contextmanager
def _sandbox() -> Iterator[Path]:
    with _cli_sandbox() as tmp:
        for name, text in SPECS.items():
            (tmp / name).write_text(text)
        for name, text in CSVS.items():
            (tmp / name).write_text(text)
        (tmp / "folder.csv").mkdir()
        yield tmp


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.mark.parametrize(("argv", "field"), ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_hostile_input_exits_2_with_one_message_and_creates_nothing(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    with _sandbox() as tmp:
        before = _files(tmp)
        db = f"sqlite:///{tmp / 'missing.db'}"
        argv = [a.replace("{db}", db).replace("{abs}", str(outside)) for a in argv]

        code, out, err = _cli(argv, capsys)

        shown = f"droptune {argv} -> {code}\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}"
        assert code == 2, shown
        assert "Traceback" not in out + err, shown
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and field in lines[0], shown
        assert _files(tmp) == before, shown  # no runs/, no missing.db, no out/, no config
        _no_study_anywhere(tmp)
        assert not (tmp / "escape").exists() and not outside.exists(), shown


def test_a_password_in_a_query_parameter_is_never_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreachable database is the environment failing: exit 1, one line, the password
    masked in the message (as in every other output)."""
    with _sandbox():
        url = "postgresql+psycopg://droptune@127.0.0.1:1/x?password=s3cr3tpw&connect_timeout=2"

        code, out, err = _cli(["run", "valid.yaml", "--storage", url, "--workers", "0"], capsys)

        assert code == 1, err
        assert "s3cr3tpw" not in out + err
        assert "password=***" in err and "unreachable" in err
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_unwritable_export_outputs_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with _sandbox() as tmp:
        db = f"sqlite:///{tmp / 'study.db'}"
        assert _cli(["run", "valid.yaml", "--storage", db, "--workers", "0"], capsys)[0] == 0
        # a study with a finished trial to export
        import optuna

        study = optuna.load_study(study_name="tiny", storage=db)
        trial = study.ask()
        trial.set_user_attr("droptune.seed", 1)
        study.tell(trial, 1.0)
        for target, message in [(".", "is a folder"), ("/proc/droptune-x", "cannot write")]:
            code, out, err = _cli(
                ["export", "--study", "tiny", "--storage", db, "-o", target], capsys
            )
            assert code == 2, err
            assert "Traceback" not in out + err
            assert f"--output: {target!r}" in err or f"--output: cannot write {target!r}" in err
            assert message in err


_USER_MODULE = """
from pathlib import Path
from torch import nn

Path("IMPORTED-FROM-" + Path(__file__).parent.name).write_text("")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)
"""


def _user_model_spec(code_dir: str | None = None) -> str:
    from tests.study.helpers import TINY

    spec: dict[str, Any] = {
        **TINY,
        "model": {"family": "custom", "target": "zz_droptune_usermod:Net"},
        "search": {"regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5}},
        "n_trials": 1,
    }
    if code_dir is not None:
        spec["code_dir"] = code_dir
    return _dump(spec)


def _console(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    from tests.test_cli_train import _console_script

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DROPTUNE_STORAGE")}
    return subprocess.run(
        [*_console_script(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_user_code_is_imported_from_the_environment_or_the_specs_folder_only(
    tmp_path: Path,
) -> None:
    """``model.target`` names user code, imported by design; but only from the installed
    environment or the spec's folder (``code_dir``), never from the folder a command happens
    to be run in: a module lying there is neither imported nor run, by ``run``, ``train`` or
    the workers ``run`` starts."""
    cwd, specs, code = tmp_path / "cwd", tmp_path / "specs", tmp_path / "code"
    for folder in (cwd, specs, code):
        folder.mkdir()
    (cwd / "zz_droptune_usermod.py").write_text(_USER_MODULE)
    (specs / "spec.yaml").write_text(_user_model_spec())
    db = f"sqlite:///{tmp_path / 'study.db'}"

    for args in (
        ["run", str(specs / "spec.yaml"), "--storage", db],
        ["train", str(specs / "spec.yaml"), "--output", str(tmp_path / "out")],
    ):
        done = _console(args, cwd)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and "model.target" in lines[0], done.stderr
        assert "working directory is not searched" in lines[0], done.stderr
        assert not list(cwd.glob("IMPORTED-*")), "the module in the working directory ran"
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "out").exists()

    # next to the spec: found, and the workers `run` starts find it too (they run with -P)
    (specs / "zz_droptune_usermod.py").write_text(_USER_MODULE)
    done = _console(["run", str(specs / "spec.yaml"), "--storage", db], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "IMPORTED-FROM-specs").exists() and not (cwd / "IMPORTED-FROM-cwd").exists()
    import optuna

    study = optuna.load_study(study_name="tiny", storage=db)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert study.user_attrs["droptune.spec"]["code_dir"] == str(specs.resolve())

    # the exported best config carries that folder: `train` finds the model from anywhere,
    # and the config it saves can be trained again
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _console(["export", "tiny", "--storage", db, "-o", str(elsewhere / "best.yaml")], cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (elsewhere / "best.yaml").read_text().startswith("code_dir: ")
    for config in (elsewhere / "best.yaml", tmp_path / "t1" / "config.yaml"):
        out = tmp_path / ("t1" if config.parent == elsewhere else "t2")
        done = _console(["train", str(config), "--max-epochs", "1", "--output", str(out)], cwd)
        assert done.returncode == 0, done.stderr[-2000:]
    from droptune import load_config

    assert load_config(tmp_path / "t2" / "config.yaml").model.target == "zz_droptune_usermod:Net"

    # code_dir names another folder, relative to the spec file; a missing one is refused
    (specs / "zz_droptune_usermod.py").unlink()
    (code / "zz_droptune_usermod.py").write_text(_USER_MODULE)
    (specs / "other.yaml").write_text(_user_model_spec("../code"))
    done = _console(
        [
            "train",
            str(specs / "other.yaml"),
            "--max-epochs",
            "1",
            "--output",
            str(tmp_path / "out2"),
        ],
        cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "IMPORTED-FROM-code").exists()
    (specs / "missing.yaml").write_text(_user_model_spec("../nowhere"))
    done = _console(["run", str(specs / "missing.yaml"), "--storage", db], cwd)
    assert done.returncode == 2 and "code_dir" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "uri",
    ["postgresql+psycopg://u:pw/123@127.0.0.1:1/x", "http://u:pw/123@127.0.0.1:1"],
)
def test_an_unreachable_tracking_store_exits_1_in_one_line_with_the_password_masked(
    uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sync`` talks only to MLflow: an unreachable tracking store is the environment failing
    (exit 1), said in one line at once (MLflow's client would retry for minutes), and a
    password with a raw ``/`` is masked whole."""
    import time

    with _sandbox() as tmp:
        db = f"sqlite:///{tmp / 'study.db'}"
        assert _cli(["run", "valid.yaml", "--storage", db, "--workers", "0"], capsys)[0] == 0
        started = time.monotonic()
        code, out, err = _cli(["sync", "tiny", "--storage", db, "--tracking-uri", uri], capsys)
        assert code == 1, err
        assert "pw/123" not in out + err and "123@" not in out + err, err
        assert "unreachable" in err and len([x for x in err.splitlines() if x.strip()]) == 1
        assert time.monotonic() - started < 60, "MLflow's own retries were not cut short"
