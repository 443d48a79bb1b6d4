"""A worker under a batch engine: the engine's task index as the default ``--worker-index``,
a clean exit 0 when the study already has its trials (whatever the index), and one message and
exit 1 when the storage cannot be reached (Kubernetes and Slurm restart or report it)."""

from __future__ import annotations

from pathlib import Path
import subprocess

import pytest

from droptune.exceptions import SpecError
from droptune.study.worker import TASK_INDEX_VARIABLES
from droptune.study.worker import task_index
from tests.study.helpers import SpecWriter
from tests.study.helpers import cli_env
from tests.study.helpers import counts
from tests.study.helpers import droptune_cmd
from tests.study.helpers import trials


def test_the_engines_index_variables_in_order() -> None:
    assert TASK_INDEX_VARIABLES == ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")
    assert task_index({}) == 0
    assert task_index({"SLURM_ARRAY_TASK_ID": "7"}) == 7
    assert task_index({"JOB_COMPLETION_INDEX": "3"}) == 3
    assert task_index({"JOB_COMPLETION_INDEX": "3", "SLURM_ARRAY_TASK_ID": "7"}) == 3
    assert task_index({"JOB_COMPLETION_INDEX": "", "SLURM_ARRAY_TASK_ID": " 7 "}) == 7
    assert task_index({"SLURM_ARRAY_TASK_ID": "100000"}) == 100000  # beyond any array: harmless


@pytest.mark.parametrize("value", ["-1", "1.5", "x", "0x1", "١"])
def test_a_bad_index_names_its_variable(value: str) -> None:
    with pytest.raises(SpecError, match=r"SLURM_ARRAY_TASK_ID: must be a whole number >= 0"):
        task_index({"SLURM_ARRAY_TASK_ID": value})


def worker(
    spec: Path, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    full_env = cli_env()
    for name in TASK_INDEX_VARIABLES:
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run(
        [*droptune_cmd(), "-v", "worker", str(spec), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_bad_index_variable_is_refused_before_the_storage_is_touched(
    write_spec: SpecWriter, tmp_path: Path
) -> None:
    spec = write_spec(storage="postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = worker(spec, tmp_path, env={"JOB_COMPLETION_INDEX": "two"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: JOB_COMPLETION_INDEX: must be a whole number >= 0 (the task index, read when "
        "--worker-index is not given), got 'two'"
    ]


def test_a_worker_without_a_reachable_storage_exits_1_with_one_message(
    write_spec: SpecWriter, tmp_path: Path
) -> None:
    spec = write_spec(storage="sqlite:///unused.db")
    # port 1 refuses at once; the URL from the environment, as under Kubernetes and Slurm
    url = "postgresql+psycopg://droptune@127.0.0.1:1/droptune"
    result = subprocess.run(
        [*droptune_cmd(), "worker", str(spec)],
        cwd=tmp_path,
        env={**cli_env(), "DROPTUNE_STORAGE": url, "SLURM_ARRAY_TASK_ID": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: storage '{url}' is unreachable: "), line
    assert "Connection refused" in line


@pytest.mark.slow
def test_an_index_beyond_the_workers_joins_harmlessly_and_a_done_study_exits_0(
    write_spec: SpecWriter, sqlite_url: str, tmp_path: Path
) -> None:
    """Two workers numbered 5 and 99 by their engine (one worker was planned): together they
    finish the study with exactly its trials; a third started afterwards exits 0 at once."""
    spec = write_spec(study={"name": "indexed"}, n_trials=3, pruner={"name": "none"})
    procs = [
        subprocess.Popen(
            [*droptune_cmd(), "-v", "worker", str(spec)],
            cwd=tmp_path,
            env={**cli_env(), name: index},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, index in (("JOB_COMPLETION_INDEX", "5"), ("SLURM_ARRAY_TASK_ID", "99"))
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err), index in zip(procs, outputs, ("5", "99"), strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert f"(index {index}) joins study indexed" in err
    assert counts(trials(sqlite_url, "indexed")) == {"COMPLETE": 3}

    late = worker(spec, tmp_path, "--worker-index", "1", env={"JOB_COMPLETION_INDEX": "8"})
    assert late.returncode == 0, late.stderr[-3000:]
    assert "(index 1) joins study indexed" in late.stderr  # the option wins
    assert counts(trials(sqlite_url, "indexed")) == {"COMPLETE": 3}
