"""A single-node Slurm cluster for the tests, started as root without systemd.

Everything lives in one temporary folder: ``slurm.conf`` (found through ``SLURM_CONF``), the
spool and state folders, the logs, and a private ``munged`` whose socket ``AuthInfo`` names, so
that nothing under ``/etc`` or ``/run`` is touched and a cluster already running on the machine
is left alone. The daemons run in the foreground (``-D``) as children of the test process and
are stopped by their PIDs.

Verified with Debian 12's ``slurm-wlm`` 22.05: ``munged --force`` as root, ``proctrack/linuxproc``
and ``task/none`` (no cgroups without systemd), ``select/cons_tres``, accounting off (no
``sacct``: ended jobs are read with ``scontrol`` while ``MinJobAge`` keeps them).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import time


__all__ = ["BINARIES", "SlurmCluster", "missing_binaries"]

#: What the cluster needs (Debian: ``apt-get install -y slurm-wlm munge``).
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing_binaries() -> list[str]:
    """The binaries of :data:`BINARIES` not on PATH (or in /usr/sbin), and the munge key."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [name for name in BINARIES if shutil.which(name, path=path) is None]
    if not MUNGE_KEY.exists():
        missing.append(str(MUNGE_KEY))
    return missing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SlurmCluster:
    """One node (this host, ``cpus`` CPUs, partition ``debug``); :meth:`start`, then
    :meth:`run` for the client commands, :meth:`stop` at the end."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])

    def _write_conf(self) -> None:
        for sub in ("munge", "ctld", "slurmd", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=droptune-test",
                    f"SlurmctldHost={self.host}",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire: also how long a requeued job waits before it starts again
                    # (120 s by default).
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=2",
                    # SIGTERM, then SIGKILL this many seconds later (scancel, requeue): shorter
                    # than the tests' trials, so that a cancelled worker's trial is cut.
                    "KillWait=2",
                    # Ended jobs stay visible to scontrol (there is no sacct).
                    "MinJobAge=600",
                    f"StateSaveLocation={r / 'ctld'}",
                    f"SlurmdSpoolDir={r / 'slurmd'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    f"NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE "
                    "State=UP OverSubscribe=FORCE:4",
                    "",
                ]
            )
        )

    def _daemon(self, *cmd: str) -> subprocess.Popen[bytes]:
        log = (self.root / "log" / f"{Path(cmd[0]).name}.out").open("ab")
        proc = subprocess.Popen(
            list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.daemons.append(proc)
        return proc

    def start(self, timeout: float = 60) -> None:
        self._write_conf()
        munge = self.root / "munge"
        self._daemon(
            "munged",
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--key-file={MUNGE_KEY}",
        )
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self._daemon("slurmctld", "-D", "-i")
        self._daemon("slurmd", "-D")
        self._wait(self._node_ready, timeout, f"node {self.host} idle in sinfo")

    def _node_ready(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
        return out in ("idle", "mix", "alloc")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}: {self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in [*sorted((self.root / "log").glob("*")), self.root / "munge" / "munged.log"]:
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def run(
        self, *cmd: str, check: bool = True, env: dict[str, str] | None = None, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        result = subprocess.run(
            list(cmd),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,  # type: ignore[call-overload]
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {result.returncode}: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (one array task, e.g. ``123_1``)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields: dict[str, str] = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def tasks(self, array_job: str) -> dict[str, str]:
        """``{task id: state}`` of the tasks of an array job still known to squeue/scontrol."""
        out = self.run("scontrol", "-o", "show", "job", array_job, check=False).stdout
        states: dict[str, str] = {}
        for line in out.splitlines():
            fields = dict(w.partition("=")[::2] for w in line.split() if "=" in w)
            if "ArrayTaskId" in fields:
                states[fields["ArrayTaskId"]] = fields.get("JobState", "?")
        return states

    def stop(self) -> None:
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
