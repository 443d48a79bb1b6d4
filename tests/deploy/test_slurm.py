"""``deploy/slurm/droptune-array.sbatch`` on a real single-node Slurm cluster (CPU only: the
array is submitted with ``--gres=none``), against a fresh PostgreSQL database.

The cluster (munged, slurmctld, slurmd as root, no systemd) is started once per session by the
``slurm`` fixture; the tests are skipped without the binaries (``apt-get install -y slurm-wlm
munge``). Trials are tiny (digits, one hidden layer of 16), so a study takes tens of seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.slurm_cluster import SlurmCluster
from tests.study.helpers import TINY
from tests.study.helpers import cli_env
from tests.study.helpers import counts
from tests.study.helpers import droptune_cmd
from tests.study.helpers import finished
from tests.study.helpers import merge
from tests.study.helpers import trials
from tests.study.helpers import wait_for


pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "slurm" / "droptune-array.sbatch"
#: Epochs of the trials that a test cuts: about 10 s each here, well beyond KillWait (2 s).
EPOCHS = 200
#: A trial of the killed-task test: ~12 s on one idle core, so that it cannot end within the
#: 2 s between Slurm's SIGTERM and SIGKILL (200 epochs took ~2.5 s and sometimes did: CI saw
#: the victim COMPLETE).
KILLED_EPOCHS = 1000
#: Job states after which a task runs no more.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def write_spec(tmp_path: Path, name: str, n_trials: int, epochs: int = 2) -> Path:
    """TINY without a storage (the workers read DROPTUNE_STORAGE), quick heartbeats so that a
    killed worker's trial is reaped within seconds, no pruning (every trial COMPLETEs)."""
    data = merge(
        TINY,
        {
            "study": {"name": name},
            "n_trials": n_trials,
            "train": {"max_epochs": epochs},
            "pruner": {"name": "none"},
            "execution": {"heartbeat_interval": 1, "grace_period": 4},
        },
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def submit(slurm: SlurmCluster, tmp_path: Path, spec: Path, url: str, *options: str) -> str:
    """``sbatch --gres=none OPTIONS droptune-array.sbatch SPEC``; the storage URL reaches the
    tasks through the environment only. Returns the array job id."""
    env = cli_env()
    for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "SLURM_JOB_ID"):
        env.pop(name, None)
    env.update(
        SLURM_CONF=slurm.env["SLURM_CONF"],
        PATH=slurm.env["PATH"],
        DROPTUNE_STORAGE=url,
        DROPTUNE_COMMAND=" ".join(droptune_cmd()),
    )
    result = slurm.run(
        "sbatch",
        "--parsable",
        "--gres=none",  # the test cluster has no GPU (the script asks for gpu:1)
        "--cpus-per-task=1",
        "--mem=1000",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/task-%A_%a.out",
        *options,
        str(SCRIPT),
        str(spec),
        env=env,
    )
    assert url not in " ".join(result.args)
    return result.stdout.strip().split(";")[0]


def wait_for_array(slurm: SlurmCluster, job: str, timeout: float = 400) -> dict[str, str]:
    """Wait until no task of ``job`` is pending or running; ``{task id: final state}``."""

    def ended() -> dict[str, str] | None:
        states = slurm.tasks(job)
        if states and all(state in ENDED for state in states.values()):
            return states
        return None

    try:
        result: dict[str, str] = wait_for(ended, timeout, f"array job {job} to end", interval=1)
    except BaseException:
        print(slurm.run("squeue", check=False).stdout, slurm.logs())
        raise
    return result


def task_outputs(tmp_path: Path, job: str) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob(f"task-{job}_*"))
    )


def owner_prefix(slurm: SlurmCluster, job: str, task: int, run: int = 0) -> str:
    """What the script names the worker of task ``task`` (see its ``owner=`` line)."""
    return f"{slurm.host}:slurm-{job}_{task}.r{run}:"


def trials_of(url: str, name: str, prefix: str) -> list[Any]:
    return [
        t
        for t in trials(url, name)
        if str(t.user_attrs.get("droptune.worker", "")).startswith(prefix)
    ]


def test_the_array_finishes_the_study_and_a_task_beyond_it_is_harmless(
    slurm: SlurmCluster, pg_url: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "array", n_trials=6)
    job = submit(slurm, tmp_path, spec, pg_url, "--array=0-2")

    states = wait_for_array(slurm, job)

    log = task_outputs(tmp_path, job)
    assert states == {"0": "COMPLETED", "1": "COMPLETED", "2": "COMPLETED"}, log
    for task in range(3):
        assert slurm.job(f"{job}_{task}")["ExitCode"] == "0:0", log
        assert f"droptune worker {owner_prefix(slurm, job, task)}" in log
    trial_list = trials(pg_url, "array")
    assert counts(trial_list) == {"COMPLETE": 6}, log
    workers = {t.user_attrs["droptune.worker"].rsplit(":", 1)[0] for t in trial_list}
    assert workers <= {owner_prefix(slurm, job, i)[:-1] for i in range(3)}, workers

    # Task 7 of an array of 3 (a resubmission, a larger --array): joins, finds the study
    # done, exits 0; nothing is added.
    late = submit(slurm, tmp_path, spec, pg_url, "--array=7")
    assert wait_for_array(slurm, late, timeout=200) == {"7": "COMPLETED"}
    assert slurm.job(f"{late}_7")["ExitCode"] == "0:0", task_outputs(tmp_path, late)
    assert "exited with 0" in task_outputs(tmp_path, late)
    assert counts(trials(pg_url, "array")) == {"COMPLETE": 6}


def running_trial_of(url: str, name: str, prefix: str) -> Any:
    """A RUNNING trial of the worker ``prefix`` that has started training."""
    for trial in trials_of(url, name, prefix):
        if trial.state.name == "RUNNING" and "droptune.seed" in trial.user_attrs:
            return trial
    return None


def test_a_killed_task_costs_only_its_running_trial(
    slurm: SlurmCluster, pg_url: str, tmp_path: Path
) -> None:
    """``scancel`` of task 1 mid-trial: Slurm sends SIGTERM, the worker (--graceful) goes on
    with its trial, and SIGKILL follows KillWait (2 s) later, before the trial can end (the
    case of a preempted or cancelled task whose trial outlasts the grace). The trial stays
    RUNNING until its heartbeat is stale; task 0 reaps it (FAIL) and runs its slot again.
    The study still ends with exactly n_trials COMPLETE: that one trial is all it cost."""
    spec = write_spec(tmp_path, "killed", n_trials=4, epochs=KILLED_EPOCHS)
    job = submit(slurm, tmp_path, spec, pg_url, "--array=0-1")
    prefix = owner_prefix(slurm, job, 1)
    victim = wait_for(
        lambda: running_trial_of(pg_url, "killed", prefix), 300, "task 1 to train a trial"
    )

    slurm.run("scancel", f"{job}_1")

    states = wait_for_array(slurm, job)
    log = task_outputs(tmp_path, job)
    assert states["0"] == "COMPLETED" and states["1"] != "COMPLETED", (states, log)
    trial_list = trials(pg_url, "killed")
    by_number = {t.number: t for t in trial_list}
    assert by_number[victim.number].state.name == "FAIL", log
    assert counts(trial_list) == {"COMPLETE": 4, "FAIL": 1}, log
    assert finished(trial_list) == 4


def test_a_requeued_task_rejoins_harmlessly(
    slurm: SlurmCluster, pg_url: str, tmp_path: Path
) -> None:
    """``scontrol requeue`` of task 1 mid-trial (what a preemption with --requeue does): Slurm
    sends SIGTERM, the script passes it on, the worker stops (its trial finishes or fails and
    is run again); the task runs again as restart 1, joins the same study and exits 0; the
    study ends with exactly n_trials COMPLETE."""
    spec = write_spec(tmp_path, "requeued", n_trials=4, epochs=EPOCHS)
    job = submit(slurm, tmp_path, spec, pg_url, "--array=0-1")
    wait_for(
        lambda: running_trial_of(pg_url, "requeued", owner_prefix(slurm, job, 1)),
        300,
        "task 1 to train a trial",
    )

    slurm.run("scontrol", "requeue", f"{job}_1")
    wait_for(lambda: slurm.job(f"{job}_1").get("Restarts") == "1", 60, "task 1 to be requeued")

    states = wait_for_array(slurm, job)
    log = task_outputs(tmp_path, job)
    assert states == {"0": "COMPLETED", "1": "COMPLETED"}, log
    assert slurm.job(f"{job}_1")["ExitCode"] == "0:0", log
    assert f"droptune worker {owner_prefix(slurm, job, 1, run=1)}" in log  # ran again
    trial_list = trials(pg_url, "requeued")
    assert finished(trial_list) == 4, (counts(trial_list), log)
    assert counts(trial_list).get("COMPLETE") == 4
    assert counts(trial_list).get("FAIL", 0) <= 1, log  # at most the interrupted trial
    assert not [t for t in trial_list if t.state.name == "RUNNING"]


def test_the_time_limit_signal_lets_the_running_trial_finish(
    slurm: SlurmCluster, pg_url: str, tmp_path: Path
) -> None:
    """What ``--signal=B:TERM@60`` does before the time limit, sent at once: SIGTERM to the
    batch shell only (``scancel --batch``). The script passes it on, the worker (--graceful)
    finishes its running trial (COMPLETE, not lost) and exits 130; task 0 finishes the study."""
    spec = write_spec(tmp_path, "limit", n_trials=4, epochs=EPOCHS)
    job = submit(slurm, tmp_path, spec, pg_url, "--array=0-1")
    prefix = owner_prefix(slurm, job, 1)
    running = wait_for(
        lambda: running_trial_of(pg_url, "limit", prefix), 300, "task 1 to train a trial"
    )

    slurm.run("scancel", "--batch", "--signal=TERM", f"{job}_1")

    states = wait_for_array(slurm, job)
    log = task_outputs(tmp_path, job)
    assert states == {"0": "COMPLETED", "1": "FAILED"}, (states, log)
    assert f"droptune worker {prefix}" in log and "exited with 130" in log, log
    trial_list = trials(pg_url, "limit")
    assert {t.number: t.state.name for t in trial_list}[running.number] == "COMPLETE", log
    assert counts(trial_list) == {"COMPLETE": 4}, log
    # it started no trial after the signal: its last trial is the one that was running
    assert max(t.number for t in trials_of(pg_url, "limit", prefix)) == running.number


def test_the_script_asks_for_what_a_worker_array_needs() -> None:
    directives = [
        line.split(None, 1)[1]
        for line in SCRIPT.read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert any(d.startswith("--array=0-") for d in directives)
    for option in ("--gres=gpu:1", "--requeue", "--signal=B:TERM@60"):
        assert option in directives, option
    text = SCRIPT.read_text()
    assert '--worker-index "$index"' in text and "--graceful" in text
    assert "index=${SLURM_ARRAY_TASK_ID:-0}" in text


def test_the_script_refuses_to_run_without_a_storage(tmp_path: Path) -> None:
    """Outside Slurm too: no DROPTUNE_STORAGE, exit 2 with one message."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "DROPTUNE_STORAGE"}
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "spec.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "droptune-array.sbatch: set DROPTUNE_STORAGE (the study's database URL) before sbatch"
    ]
