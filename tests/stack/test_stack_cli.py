"""``droptune stack`` without starting a stack: bad options fail with exit 2 and a message that
names the option before anything is created, and ``down`` stops exactly the processes its state
file names (real processes, checked by PID and start time) and nothing else."""

from __future__ import annotations

from collections.abc import Iterator
import json
from pathlib import Path
import subprocess
import time
from typing import Any

import pytest
import yaml

from droptune.cli import main as cli_main
from droptune.stack import ProcRef
from droptune.stack import proc_start
from tests.study.helpers import TINY
from tests.study.helpers import merge


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DROPTUNE_STORAGE", "DROPTUNE_MLFLOW_BACKEND_STORE_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def write_spec(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, sections), sort_keys=False))
    return path


PG = "postgresql+psycopg://postgres:pw@127.0.0.1:5432/"


@pytest.mark.parametrize(
    ("case", "spec", "args", "needle"),
    [
        ("no storage", {}, [], "--storage: give the Optuna storage URL"),
        ("bad storage", {}, ["--storage", "mongodb://x/y"], "--storage: unsupported backend"),
        (
            "no MLflow",
            {"tracking": {"enabled": True}},
            ["--storage", "{sqlite}"],
            "--backend-store-uri: give the MLflow server's backend store",
        ),
        (
            "bad backend",
            {"tracking": {"enabled": True}},
            ["--storage", "{sqlite}", "--backend-store-uri", "file:///tmp/x"],
            "--backend-store-uri: unsupported backend 'file'; allowed: sqlite, postgresql",
        ),
        (
            "same database",
            {"tracking": {"enabled": True}},
            ["--storage", PG + "a", "--backend-store-uri", PG.replace(":pw", "") + "a"],
            "--backend-store-uri: must be another database than --storage",
        ),
        (
            "both",
            {"tracking": {"enabled": True}},
            [
                "--storage",
                "{sqlite}",
                "--backend-store-uri",
                PG + "m",
                "--tracking-uri",
                "http://127.0.0.1:5000",
            ],
            "--backend-store-uri and --tracking-uri: give one, not both",
        ),
        (
            "tracking uri scheme",
            {"tracking": {"enabled": True}},
            ["--storage", "{sqlite}", "--tracking-uri", "ftp://u:secret@host/x"],
            "--tracking-uri: must be http(s)://host:port",
        ),
        (
            "spec tracking.uri",
            {"tracking": {"enabled": True, "uri": "http://u:secret@host:5000"}},
            ["--storage", "{sqlite}", "--backend-store-uri", PG + "m"],
            "tracking.uri: ",
        ),
        (
            "tracking off",
            {"tracking": {"enabled": False}},
            ["--storage", "{sqlite}", "--backend-store-uri", PG + "m"],
            "tracking.enabled: ",
        ),
        (
            "devices",
            {"tracking": {"enabled": False}},
            ["--storage", "{sqlite}", "--devices", "gpu0"],
            "--devices: must be auto, cpu or GPU ids",
        ),
    ],
)
def test_bad_options_exit_2_naming_the_option_and_create_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    spec: dict[str, Any],
    args: list[str],
    needle: str,
) -> None:
    path = write_spec(tmp_path, **spec)
    db = tmp_path / "db" / "study.db"
    args = [a.replace("{sqlite}", f"sqlite:///{db}") for a in args]
    state_dir = tmp_path / "stack"
    code = cli_main(["stack", "up", str(path), "--state-dir", str(state_dir), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "secret" not in err and ":pw@" not in err  # passwords masked
    assert not db.exists()  # nothing was created
    assert not (state_dir / "stack.json").exists()


def test_down_and_status_without_a_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["stack", "down", "--state-dir", str(tmp_path / "none")]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert cli_main(["stack", "status", "--state-dir", str(tmp_path / "none")]) == 1


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process in its own process group, as the stack starts its workers."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def write_state(state_dir: Path, refs: list[ProcRef]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {"state": "running", "processes": [ref.__dict__ for ref in refs]}
    (state_dir / "stack.json").write_text(json.dumps(state))


def test_down_leaves_a_process_that_reused_a_recorded_pid_alone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    start = proc_start(sleeper.pid)
    if start is None:
        pytest.skip("needs /proc to tell processes apart by start time")
    other = str(int(start) - 1)  # the recorded process started at another time: not this one
    write_state(tmp_path / "stack", [ProcRef("worker-0", sleeper.pid, other)])
    assert (
        cli_main(["stack", "down", "--state-dir", str(tmp_path / "stack"), "--timeout", "2"]) == 0
    )
    time.sleep(0.3)
    assert sleeper.poll() is None  # still running
    assert not (tmp_path / "stack" / "stack.json").exists()


def test_down_stops_a_process_recorded_by_an_earlier_droptune(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """State files record a process's start as its clock ticks since boot (field 22 of
    /proc/<pid>/stat), as droptune always wrote them: such a file still stops its stack."""
    stat = Path(f"/proc/{sleeper.pid}/stat")
    if not stat.exists():
        pytest.skip("needs /proc")
    ticks = stat.read_text().rsplit(")", 1)[1].split()[19]
    state = {"processes": [{"role": "worker-0", "pid": sleeper.pid, "start": ticks}]}
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.json").write_text(json.dumps(state))
    assert (
        cli_main(["stack", "down", "--state-dir", str(tmp_path / "stack"), "--timeout", "5"]) == 0
    )
    assert sleeper.wait(timeout=10) == -15


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"role": "w", "pid": "abc", "start": None}, "processes[0].pid"),
        ({"role": "w", "pid": 1.5, "start": None}, "processes[0].pid"),
        ({"role": "w", "pid": 0, "start": None}, "processes[0].pid"),
        ({"role": "w", "pid": 5, "start": [1]}, "processes[0].start"),
        ({"role": "w", "pid": 5, "start": None, "colour": 1}, "processes[0].colour"),
        ({"role": "w", "pid": 5}, "needs start"),
        ("worker", "processes[0] must be a mapping"),
    ],
)
def test_a_malformed_state_file_is_refused_naming_the_field(
    tmp_path: Path, entry: Any, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.json").write_text(json.dumps({"processes": [entry]}))
    for command in ("down", "status"):
        code = cli_main(["stack", command, "--state-dir", str(tmp_path / "stack")])
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        assert named in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_down_stops_the_recorded_process_group(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path / "stack", [ProcRef.of("worker-0", sleeper.pid)])
    assert cli_main(["stack", "status", "--state-dir", str(tmp_path / "stack")]) == 0
    assert f"worker-0: pid {sleeper.pid} up" in capsys.readouterr().out
    assert (
        cli_main(["stack", "down", "--state-dir", str(tmp_path / "stack"), "--timeout", "5"]) == 0
    )
    assert "stopped: worker-0" in capsys.readouterr().out
    assert sleeper.wait(timeout=10) == -15  # SIGTERM


def test_up_refuses_a_state_dir_whose_stack_still_runs(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path / "stack", [ProcRef.of("worker-0", sleeper.pid)])
    spec = write_spec(tmp_path, tracking={"enabled": False})
    code = cli_main(
        [
            "stack",
            "up",
            str(spec),
            "--storage",
            "sqlite:///x.db",
            "--state-dir",
            str(tmp_path / "stack"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--state-dir: a stack already runs from {tmp_path / 'stack'} (worker-0 pid" in err
    assert sleeper.poll() is None
    assert (tmp_path / "stack" / "stack.json").exists()  # its record is kept for `down`
