"""``droptune stack``: the service topology of ``docker-compose.yml`` on one host, without Docker.

``stack up SPEC`` starts an MLflow tracking server on a SQL backend store (PostgreSQL in the
service setup), creates the study in the Optuna storage, and starts N ``droptune worker``
processes that share it. A *supervisor* holds them: the ``up`` process itself in the foreground
(Ctrl-C stops everything), or a background process with ``--detach``. When every worker has
exited and the study has its trials, the supervisor closes the study's MLflow parent run and keeps
the server up until ``stack down`` (or Ctrl-C, or at once with ``--exit-when-done``). With
``--tracking-uri`` it starts no server and joins one that runs (workers on another GPU host);
the parent run is then left to the stack that owns the server.

Secrets never reach a command line, where ``ps`` shows them: the storage URL goes to the workers
in ``DROPTUNE_STORAGE``, the backend store URI to ``mlflow server`` in
``MLFLOW_BACKEND_STORE_URI``, and the state file holds masked URLs only.

Every process runs in its own process group; the state file (``<state-dir>/stack.json``) records
each one with its start time, so ``stack down`` stops exactly the processes the stack started
(SIGTERM, then SIGKILL) and never a process that later reused a PID.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
import json
import logging
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time
from typing import Annotated
from typing import Any
import uuid

import typer

from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneError
from droptune.exceptions import SpecError
from droptune.exceptions import TrackingError
from droptune.storage import mask_text
from droptune.storage import mask_url


__all__ = [
    "BACKEND_ENV",
    "DEFAULT_STATE_DIR",
    "STATE_FILE",
    "Stack",
    "read_state",
    "run_stack",
    "stack_app",
    "start_stack",
    "stop_stack",
]

log = logging.getLogger(__name__)

#: Where ``up`` keeps its state file, logs and the MLflow artifacts.
DEFAULT_STATE_DIR = Path("runs/stack")
STATE_FILE = "stack.json"
STORAGE_ENV = "DROPTUNE_STORAGE"
#: The MLflow server's backend store URI (``--backend-store-uri``).
BACKEND_ENV = "DROPTUNE_MLFLOW_BACKEND_STORE_URI"
#: The detached supervisor's request (with its secrets): read once and removed from its env.
_REQUEST_ENV = "_DROPTUNE_STACK_REQUEST"
_LOCAL_HOSTS = ("0.0.0.0", "::", "")
#: Added to ``--allowed-hosts`` (which replaces MLflow's defaults): the supervisor and the local
#: workers reach the server as 127.0.0.1.
_LOCAL_ALLOWED = ("localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*")
_PROGRESS_EVERY_S = 15.0


def _echo(message: str) -> None:
    typer.echo(mask_text(message), err=True)


# ----------------------------------------------------------------------------------------------
# Processes: identity (PID + start time), liveness without zombies, process groups.


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), None without ``/proc``."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (zombies count as
    gone: an orphan's zombie may wait long for a reaper)."""
    if _has_proc():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return start is None or fields[19] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    if not _has_proc():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


@dataclass
class ProcRef:
    """A process the stack started: its role, PID, start time, and whether it leads its own
    process group (then the whole group is signalled)."""

    role: str
    pid: int
    start: str | None
    group: bool = True
    log: str | None = None

    @classmethod
    def of(cls, role: str, pid: int, group: bool = True, log: str | None = None) -> ProcRef:
        return cls(role, pid, proc_start(pid), group, log)

    def pids(self) -> list[int]:
        """The live processes this reference stands for."""
        leader_alive = _alive(self.pid, self.start)
        if not self.group:
            return [self.pid] if leader_alive else []
        if not leader_alive and _alive(self.pid, None):
            return []  # the PID now belongs to another process: its group is not ours
        return _group_members(self.pid) if _has_proc() else ([self.pid] if leader_alive else [])

    def alive(self) -> bool:
        return bool(self.pids())

    def signal(self, signum: int) -> None:
        if not self.pids():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)


def _stop_refs(refs: list[ProcRef], timeout: float) -> None:
    """SIGTERM every process of ``refs``; SIGKILL what is left after ``timeout`` seconds."""
    for ref in refs:
        ref.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(ref.alive() for ref in refs):
        time.sleep(0.2)
    for ref in refs:
        if ref.alive():
            log.warning(
                "%s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", ref.role, ref.pid, timeout
            )
            ref.signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(ref.alive() for ref in refs):
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------
# The state file.


def _state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The stack's state file as a dict, None if there is none (or it is unreadable)."""
    try:
        data = json.loads(_state_path(state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Atomically, readable by the owner only."""
    state["updated"] = time.time()
    path = _state_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def _refs(state: dict[str, Any]) -> list[ProcRef]:
    return [ProcRef(**entry) for entry in state.get("processes", [])]


def _running(state_dir: Path) -> list[ProcRef]:
    """The processes recorded in ``state_dir`` that still run."""
    state = read_state(state_dir)
    return [ref for ref in _refs(state) if ref.alive()] if state else []


# ----------------------------------------------------------------------------------------------
# What ``up`` asks the supervisor to do.


@dataclass
class StackRequest:
    """Everything the supervisor needs; the URLs in it may hold passwords (never logged)."""

    spec_path: str
    study_name: str
    n_trials: int
    storage_url: str
    plan: list[dict[str, Any]]
    tracking: bool
    backend_store_uri: str | None = None
    tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    allowed_hosts: str | None = None
    exit_when_done: bool = False
    cwd: str = field(default_factory=os.getcwd)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StackRequest:
        return cls(**json.loads(text))


def _same_database(a: str, b: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        x, y = make_url(a), make_url(b)
    except Exception:
        return a == b
    return (x.get_backend_name(), x.host, x.port, x.database) == (
        y.get_backend_name(),
        y.host,
        y.port,
        y.database,
    )


def _prepare(
    spec_path: Path,
    storage_url: str | None,
    *,
    workers: int | None,
    backend_store_uri: str | None,
    tracking_uri: str | None,
    host: str,
    port: int | None,
    allowed_hosts: str | None,
    study_name: str | None,
    n_trials: int | None,
    devices: str | None,
    per_device: int | None,
    exit_when_done: bool,
) -> StackRequest:
    """Validate the options, then create the study (``droptune run --workers 0``)."""
    from droptune.storage import check_url
    from droptune.study.runner import create_study
    from droptune.study.runner import plan_workers
    from droptune.study.runner import reap_trials
    from droptune.study.runner import study_budget
    from droptune.study.spec import load_spec

    if workers is not None and workers < 0:
        raise ConfigError(f"--workers: must be 0 or more, got {workers}")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port: must be 1 to 65535, got {port}")
    spec = load_spec(spec_path)
    url = storage_url or spec.storage
    if not url:
        raise ConfigError(
            f"--storage: give the Optuna storage URL (or set {STORAGE_ENV}), e.g. "
            "postgresql+psycopg://user:password@host:5432/droptune"
        )
    check_url(url, "--storage")
    if spec.tracking.uri:
        raise SpecError(
            f"tracking.uri: {spec_path} sets {mask_url(spec.tracking.uri)!r}, but the stack "
            "points its workers at its own MLflow server; remove tracking.uri from the spec "
            "(or pass --tracking-uri to use another server)"
        )
    if backend_store_uri and tracking_uri:
        raise ConfigError(
            "--backend-store-uri and --tracking-uri: give one, not both (a backend store "
            "starts an MLflow server, a tracking URI uses one that runs already)"
        )
    tracking = spec.tracking.enabled
    if not tracking and (backend_store_uri or tracking_uri):
        raise SpecError(
            f"tracking.enabled: {spec_path} turns tracking off, so the MLflow server would "
            "get no runs; set tracking: {enabled: true} or leave out --backend-store-uri / "
            "--tracking-uri"
        )
    if tracking and not (backend_store_uri or tracking_uri):
        raise ConfigError(
            f"--backend-store-uri: give the MLflow server's backend store (or set "
            f"{BACKEND_ENV}), e.g. postgresql+psycopg://user:password@host:5432/mlflow, or "
            "--tracking-uri http://host:5000 of a server that runs already; or turn tracking "
            "off in the spec (tracking: {enabled: false})"
        )
    if backend_store_uri:
        check_url(backend_store_uri, "--backend-store-uri")
        if _same_database(backend_store_uri, url):
            raise ConfigError(
                "--backend-store-uri: must be another database than --storage (MLflow and "
                "Optuna both keep an alembic_version table); create one, e.g. "
                "CREATE DATABASE mlflow"
            )
    if tracking_uri and not tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"--tracking-uri: must be http(s)://host:port of an MLflow server, got "
            f"{mask_url(tracking_uri)!r}"
        )
    name = study_name or spec.study.name
    plan = plan_workers(
        devices or spec.execution.devices,
        workers if workers is not None else spec.execution.workers,
        per_device or spec.execution.per_device,
    )
    if spec.base.train.num_threads is not None:
        for entry in plan:  # the spec's own thread count wins, as in `droptune run`
            entry["overrides"].pop("train.num_threads", None)
    study = create_study(spec, url, name, n_trials, explicit=n_trials is not None)
    total = study_budget(url, name) or n_trials or spec.n_trials
    reap_trials(study)
    return StackRequest(
        spec_path=str(spec_path.resolve()),
        study_name=name,
        n_trials=total,
        storage_url=url,
        plan=plan,
        tracking=tracking,
        backend_store_uri=backend_store_uri,
        tracking_uri=tracking_uri,
        host=host,
        port=port,
        allowed_hosts=allowed_hosts,
        exit_when_done=exit_when_done,
    )


# ----------------------------------------------------------------------------------------------
# The supervisor.


class _Flag:
    """SIGINT/SIGTERM recorded by a handler and acted on by the supervisor's loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def trapped(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: Any) -> None:
            self.signum = signum

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _worker_cmd(request: StackRequest, index: int, owner: str) -> list[str]:
    cmd = [
        sys.executable,
        "-P",  # the working directory is not importable (as for the console script)
        "-m",
        "droptune.cli",
        "worker",
        request.spec_path,
        "--study-name",
        request.study_name,
        "--owner",
        owner,
        "--worker-index",
        str(index),
        "--n-trials",
        str(request.n_trials),
    ]
    for key, value in request.plan[index]["overrides"].items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


class _Supervisor:
    """Starts and watches the server and the workers of one stack; stops them at the end."""

    def __init__(self, request: StackRequest, state_dir: Path, detached: bool) -> None:
        self.request = request
        self.state_dir = state_dir
        self.flag = _Flag()
        self.server: Any = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_refs: list[ProcRef] = []
        self.prefix = f"stack-{uuid.uuid4().hex[:8]}"
        self.study: Any = None
        #: The study's MLflow parent run is this stack's to close only when it started the
        #: server (the head); stacks that join a server with --tracking-uri leave it alone.
        self.tracking: Any = None
        self.parent_closed = False
        self.finalized = False
        self.finished = False
        me = ProcRef.of("supervisor", os.getpid(), group=detached)
        self.state: dict[str, Any] = {
            "version": 1,
            "state": "starting",
            "study": request.study_name,
            "spec": request.spec_path,
            "storage": mask_url(request.storage_url),
            "mlflow_url": None,
            "experiment_url": None,
            "n_trials": request.n_trials,
            "finished": False,
            "processes": [asdict(me)],
        }

    def _save(self, **changes: Any) -> None:
        self.state.update(changes)
        _write_state(self.state_dir, self.state)

    def _add(self, ref: ProcRef) -> None:
        self.state["processes"].append(asdict(ref))
        self._save()

    def run(self) -> int:
        """Until the study is done (``exit_when_done``) or a signal; returns the exit code."""
        with self.flag.trapped():
            try:
                self._save()
                self._start()
                if self.flag.signum is None:
                    self._watch()
            finally:
                self._stop()
        if self.flag.signum is not None and not self.finished:
            return 130
        return 0 if self.finished or not self.workers else 1

    def _start(self) -> None:
        import optuna

        from droptune.storage import open_storage
        from droptune.study.spec import load_spec
        from droptune.tracking import StudyTracking
        from droptune.tracking._server import start_server

        request = self.request
        spec = load_spec(request.spec_path)
        storage = open_storage(
            request.storage_url,
            heartbeat_interval=spec.execution.heartbeat_interval,
            grace_period=spec.execution.grace_period,
        )
        self.study = optuna.load_study(study_name=request.study_name, storage=storage)
        uri = request.tracking_uri
        if request.tracking and request.backend_store_uri:
            self.server = start_server(
                request.backend_store_uri,
                self.state_dir / "mlartifacts",
                host=request.host,
                port=request.port,
                allowed_hosts=(
                    ",".join([request.allowed_hosts, *_LOCAL_ALLOWED])
                    if request.allowed_hosts
                    else None
                ),
                log_path=self.state_dir / "mlflow.log",
            )
            self._add(ProcRef.of("mlflow", self.server.process.pid, log=str(self.server.log_path)))
            shown = "127.0.0.1" if request.host in _LOCAL_HOSTS else request.host
            uri = f"http://{shown}:{self.server.port}"
            _echo(f"MLflow server: {uri} (log {self.server.log_path})")
            self._save(mlflow_url=uri)
        if self.flag.signum is not None:
            return
        if self.server is not None and uri:
            # Create the parent run before the workers start, as `droptune run` does.
            self.tracking = StudyTracking(spec, request.study_name, request.storage_url, uri=uri)
            if self.tracking.study_started(self.study):
                experiment = self.tracking.tracker.experiment_id()
                page = f"{uri}/#/experiments/{experiment}/runs"
                _echo(f"MLflow runs of study {request.study_name}: {page}")
                self._save(experiment_url=page)
        elif uri:
            self._save(mlflow_url=mask_url(uri))
        env = {k: v for k, v in os.environ.items() if k not in (_REQUEST_ENV, BACKEND_ENV)}
        env.update({STORAGE_ENV: request.storage_url, "PYTHONUNBUFFERED": "1"})
        if uri:
            env["MLFLOW_TRACKING_URI"] = uri
        for index, entry in enumerate(request.plan):
            if self.flag.signum is not None:
                return
            log_path = self.state_dir / f"worker-{index}.log"
            with log_path.open("ab") as log_file:
                proc = subprocess.Popen(
                    _worker_cmd(request, index, f"{self.prefix}-{index}"),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**env, **entry["env"]},
                    cwd=request.cwd,
                    start_new_session=True,
                )
            self.workers.append(proc)
            ref = ProcRef.of(f"worker-{index}", proc.pid, log=str(log_path))
            self.worker_refs.append(ref)
            self._add(ref)
        _echo(
            f"stack up: study {request.study_name} ({request.n_trials} trials) on "
            f"{mask_url(request.storage_url)}, {len(self.workers)} workers; logs in "
            f"{self.state_dir}"
        )
        self._save(state="running")

    def _counts(self) -> dict[str, int]:
        from droptune.study.runner import counts_by_state

        return dict(counts_by_state(self.study))

    def _watch(self) -> None:
        last = time.monotonic()
        while self.flag.signum is None:
            if (
                not self.finalized
                and self.workers
                and all(p.poll() is not None for p in self.workers)
            ):
                self._finalize()
                if self.request.exit_when_done:
                    return
                _echo("the MLflow server stays up until `droptune stack down` (or Ctrl-C)")
            if not self.finalized and time.monotonic() - last > _PROGRESS_EVERY_S:
                last = time.monotonic()
                with contextlib.suppress(Exception):
                    counts = self._counts()
                    _echo(
                        f"{self.request.study_name}: "
                        + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
                    )
            if not self.workers and self.request.exit_when_done:
                return
            time.sleep(0.3)

    def _study_finished(self) -> bool:
        from droptune.study.slots import Slots

        slots = Slots(self.request.storage_url, self.request.study_name)
        try:
            states = {t.number: t.state.name for t in self.study.get_trials(deepcopy=False)}
            return bool(slots.finished(states))
        finally:
            slots.close()

    def _close_parent(self) -> None:
        """Close the study's MLflow parent run: FINISHED when the study has its trials, KILLED
        otherwise (study_ended logs failures instead of raising)."""
        if self.tracking is not None and not self.parent_closed:
            self.parent_closed = True
            self.tracking.study_ended(self.study, self.finished)

    def _finalize(self) -> None:
        """Every worker has exited: fail the trials they left RUNNING, and close the parent
        run if the study has its trials (else workers elsewhere may still run it: ``down``
        closes it)."""
        from droptune.study.runner import reap_trials

        self.finalized = True
        codes = [p.returncode for p in self.workers]
        reap_trials(self.study, owner_prefix=self.prefix, reason="worker exited")
        self.finished = self._study_finished()
        if self.finished:
            self._close_parent()
        counts = self._counts()
        _echo(
            f"study {self.request.study_name} "
            + ("finished" if self.finished else "did not reach its trial count")
            + ": "
            + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
            + f" (worker exit codes {codes})"
        )
        if not self.finished:
            for ref in self.worker_refs:
                _echo(f"  see {ref.log}")
        self._save(state="done", finished=self.finished, counts=counts, worker_codes=codes)

    def _stop(self) -> None:
        from droptune.study.runner import reap_trials

        self._save(state="stopping")
        if any(p.poll() is None for p in self.workers):
            _echo(f"stopping {sum(p.poll() is None for p in self.workers)} workers")
        _stop_refs(self.worker_refs, timeout=30)
        for proc in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self.study is not None:
            try:
                if self.workers:
                    reason = "droptune stack down"
                    reap_trials(self.study, owner_prefix=self.prefix, reason=reason)
                self.finished = self._study_finished()
                self._close_parent()
            except Exception as exc:
                _echo(f"could not close the study's trials and runs: {exc}")
        if self.server is not None:
            self.server.stop()
            _echo("MLflow server stopped")
        state = read_state(self.state_dir)
        if state is not None and state.get("processes", [{}])[0].get("pid") == os.getpid():
            _state_path(self.state_dir).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The Python API.


@dataclass
class Stack:
    """A detached stack, known by its state directory."""

    state_dir: Path

    @property
    def state(self) -> dict[str, Any]:
        return read_state(self.state_dir) or {}

    @property
    def url(self) -> str | None:
        """The MLflow server's URL (a password in it masked)."""
        value = self.state.get("mlflow_url")
        return str(value) if value else None

    def processes(self) -> list[ProcRef]:
        return _refs(self.state)

    def stop(self, timeout: float = 90.0) -> list[str]:
        return stop_stack(self.state_dir, timeout=timeout)


def _check_free(state_dir: Path) -> None:
    running = _running(state_dir)
    if running:
        raise DroptuneError(
            f"--state-dir: a stack already runs from {state_dir} ("
            + ", ".join(f"{ref.role} pid {ref.pid}" for ref in running)
            + f"); stop it with `droptune stack down --state-dir {state_dir}` or pass another "
            "--state-dir"
        )


def start_stack(
    spec_path: Path,
    storage_url: str | None = None,
    *,
    workers: int | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    backend_store_uri: str | None = None,
    tracking_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    allowed_hosts: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    devices: str | None = None,
    per_device: int | None = None,
    exit_when_done: bool = False,
    wait: float = 180.0,
) -> Stack:
    """Start a stack in the background and return once its workers run.

    Raises:
        DroptuneError: A bad option or spec (the message names it), an unreachable storage, a
            stack already running from ``state_dir``, or a supervisor that failed to start
            (the message ends with its log).
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_free(state_dir)
    request = _prepare(
        spec_path,
        storage_url,
        workers=workers,
        backend_store_uri=backend_store_uri,
        tracking_uri=tracking_uri,
        host=host,
        port=port,
        allowed_hosts=allowed_hosts,
        study_name=study_name,
        n_trials=n_trials,
        devices=devices,
        per_device=per_device,
        exit_when_done=exit_when_done,
    )
    _state_path(state_dir).unlink(missing_ok=True)
    log_path = state_dir / "stack.log"
    env = {k: v for k, v in os.environ.items() if k not in (STORAGE_ENV, BACKEND_ENV)}
    env[_REQUEST_ENV] = request.to_json()
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "droptune.cli",
                "stack",
                "supervise",
                "--state-dir",
                str(state_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=request.cwd,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        state = read_state(state_dir) or {}
        ours = state.get("processes", [{}])[0].get("pid") == proc.pid
        if ours and state.get("state") in ("running", "done"):
            return Stack(state_dir)
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise DroptuneError(
                f"the stack did not start (supervisor exited with {proc.returncode}); "
                f"{log_path}:\n{mask_text(tail)}"
            )
        time.sleep(0.3)
    stop_stack(state_dir)
    raise TrackingError(f"the stack did not start within {wait:.0f}s; see {log_path}")


def run_stack(
    spec_path: Path,
    storage_url: str | None = None,
    *,
    workers: int | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    backend_store_uri: str | None = None,
    tracking_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    allowed_hosts: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    devices: str | None = None,
    per_device: int | None = None,
    exit_when_done: bool = False,
) -> int:
    """Run a stack in this process until Ctrl-C/SIGTERM (or the study is done with
    ``exit_when_done``); returns 0 when the study has its trials, 130 when interrupted before,
    1 when the workers ended without it."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_free(state_dir)
    request = _prepare(
        spec_path,
        storage_url,
        workers=workers,
        backend_store_uri=backend_store_uri,
        tracking_uri=tracking_uri,
        host=host,
        port=port,
        allowed_hosts=allowed_hosts,
        study_name=study_name,
        n_trials=n_trials,
        devices=devices,
        per_device=per_device,
        exit_when_done=exit_when_done,
    )
    return _Supervisor(request, state_dir, detached=False).run()


def stop_stack(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 90.0) -> list[str]:
    """Stop the stack of ``state_dir``: its supervisor first (which stops its workers, closes
    their trials and the MLflow parent run, and stops the server), then whatever is left of
    the recorded process groups (SIGTERM, then SIGKILL). Returns the roles that were running."""
    state_dir = state_dir.resolve()
    state = read_state(state_dir)
    if state is None:
        return []
    refs = _refs(state)
    running = [ref.role for ref in refs if ref.alive()]
    supervisor = [ref for ref in refs if ref.role == "supervisor"]
    _stop_refs(supervisor, timeout=timeout)
    # A supervisor that was killed leaves its workers and server behind: stop them here.
    state = read_state(state_dir) or state
    _stop_refs([ref for ref in _refs(state) if ref.role != "supervisor"], timeout=30)
    _state_path(state_dir).unlink(missing_ok=True)
    return running


# ----------------------------------------------------------------------------------------------
# The command line (registered as ``droptune stack``).

stack_app = typer.Typer(
    name="stack",
    help="Run the service stack on this host: an MLflow server on a SQL backend store and N "
    "workers on one shared study (docker-compose.yml does the same with containers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StateDirOpt = Annotated[
    Path,
    typer.Option(help="Where the state file, the logs and the MLflow artifacts go."),
]


@stack_app.command()
def up(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec YAML.")],
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            envvar=STORAGE_ENV,
            help="SQLAlchemy URL of the Optuna storage (given to workers in DROPTUNE_STORAGE).",
        ),
    ] = None,
    backend_store_uri: Annotated[
        str | None,
        typer.Option(
            "--backend-store-uri",
            envvar=BACKEND_ENV,
            help="The MLflow server's backend store, another database than --storage.",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="Use this running MLflow server instead of starting one."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Worker processes (default: the spec's).")
    ] = None,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    per_device: Annotated[int | None, typer.Option(min=1, help="Workers per GPU.")] = None,
    study_name: Annotated[str | None, typer.Option(help="Override study.name.")] = None,
    n_trials: Annotated[
        int | None, typer.Option(min=1, help="Trials to finish (default: the spec's).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface the MLflow server binds.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="MLflow port (default: a free one).")
    ] = None,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(help="Host headers MLflow accepts, comma-separated (with --host 0.0.0.0)."),
    ] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; stop with `down`.")
    ] = False,
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop everything once the study has its trials.")
    ] = False,
) -> None:
    """Start an MLflow server and N workers on one study (Ctrl-C or `down` stops them)."""
    options: dict[str, Any] = {
        "workers": workers,
        "state_dir": state_dir,
        "backend_store_uri": backend_store_uri,
        "tracking_uri": tracking_uri,
        "host": host,
        "port": port,
        "allowed_hosts": allowed_hosts,
        "study_name": study_name,
        "n_trials": n_trials,
        "devices": devices,
        "per_device": per_device,
        "exit_when_done": exit_when_done,
    }
    if not detach:
        code = run_stack(spec_path, storage, **options)
        if code:
            raise typer.Exit(code)
        return
    stack = start_stack(spec_path, storage, **options)
    state = stack.state
    typer.echo(f"study: {state.get('study')}")
    if state.get("experiment_url") or stack.url:
        typer.echo(f"mlflow: {state.get('experiment_url') or stack.url}")
    workers_up = [r for r in stack.processes() if r.role.startswith("worker")]
    typer.echo(f"workers: {len(workers_up)}")
    typer.echo(f"state: {stack.state_dir / STATE_FILE}")
    typer.echo(f"stop with: droptune stack down --state-dir {stack.state_dir}")


@stack_app.command()
def down(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait after SIGTERM before SIGKILL.")
    ] = 90.0,
) -> None:
    """Stop the stack started from STATE_DIR: workers, MLflow server, supervisor."""
    if read_state(state_dir.resolve()) is None:
        typer.echo(f"no stack in {state_dir}: nothing to stop")
        return
    stopped = stop_stack(state_dir, timeout=timeout)
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command()
def status(state_dir: StateDirOpt = DEFAULT_STATE_DIR) -> None:
    """The stack's state, MLflow URL and processes (study progress: `droptune status`)."""
    state = read_state(state_dir.resolve())
    if state is None:
        typer.echo(f"no stack in {state_dir}")
        raise typer.Exit(1)
    typer.echo(f"state: {state.get('state')}")
    typer.echo(f"study: {state.get('study')} on {state.get('storage')}")
    if state.get("experiment_url") or state.get("mlflow_url"):
        typer.echo(f"mlflow: {state.get('experiment_url') or state.get('mlflow_url')}")
    for ref in _refs(state):
        where = f" log {ref.log}" if ref.log else ""
        typer.echo(f"  {ref.role}: pid {ref.pid} {'up' if ref.alive() else 'gone'}{where}")


@stack_app.command(hidden=True)
def supervise(state_dir: StateDirOpt = DEFAULT_STATE_DIR) -> None:
    """The background supervisor of `up --detach` (its request comes in the environment)."""
    text = os.environ.pop(_REQUEST_ENV, None)
    if not text:
        raise DroptuneError(f"supervise: no request in ${_REQUEST_ENV}; use `stack up --detach`")
    request = StackRequest.from_json(text)
    code = _Supervisor(request, state_dir.resolve(), detached=True).run()
    if code:
        raise typer.Exit(code)
