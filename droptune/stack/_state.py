"""The stack's request and state file: what ``up`` validated and asks the supervisor to do
(``StackRequest``), and ``<state-dir>/stack.json``, which records every process the stack
started (masked URLs only), for ``down`` and ``status`` from another process."""

from __future__ import annotations

from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
import json
import os
from pathlib import Path
import time
from typing import Any

import typer

from droptune.exceptions import ConfigError
from droptune.exceptions import SpecError
from droptune.processes import ProcRef
from droptune.storage import mask_text
from droptune.storage import mask_url
from droptune.study.launcher import STORAGE_ENV


#: Where ``up`` keeps its state file, logs and the MLflow artifacts.
DEFAULT_STATE_DIR = Path("runs/stack")
STATE_FILE = "stack.json"
#: The MLflow server's backend store URI (``--backend-store-uri``).
BACKEND_ENV = "DROPTUNE_MLFLOW_BACKEND_STORE_URI"
#: The detached supervisor's request (with its secrets): read once and removed from its env.
_REQUEST_ENV = "_DROPTUNE_STACK_REQUEST"
_LOCAL_HOSTS = ("0.0.0.0", "::", "")
#: Added to ``--allowed-hosts`` (which replaces MLflow's defaults): the supervisor and the local
#: workers reach the server as 127.0.0.1.
_LOCAL_ALLOWED = ("localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*")


def _echo(message: str) -> None:
    typer.echo(mask_text(message), err=True)


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


#: A recorded process: field → (allowed types, what to say).
_REF_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "role": ((str,), "a string"),
    "pid": ((int,), "a positive integer"),
    "start": ((str, type(None)), "a string or null"),
    "group": ((bool,), "true or false"),
    "log": ((str, type(None)), "a string or null"),
}


def _refs(state: dict[str, Any]) -> list[ProcRef]:
    """The recorded processes; ConfigError naming the entry and field of a malformed one (a
    state file that was edited, or is not droptune's)."""
    entries = state.get("processes", [])
    where = STATE_FILE
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: processes must be a list, got {type(entries).__name__}")
    refs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: processes[{index}] must be a mapping")
        for key, value in entry.items():
            if key not in _REF_FIELDS:
                raise ConfigError(
                    f"{where}: processes[{index}].{key} is not a field; allowed: "
                    + ", ".join(_REF_FIELDS)
                )
            types, what = _REF_FIELDS[key]
            bad_pid = key == "pid" and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            )
            if not isinstance(value, types) or bad_pid:
                raise ConfigError(
                    f"{where}: processes[{index}].{key} must be {what}, got {value!r}; "
                    "remove the file if no stack runs from this folder"
                )
        missing = [key for key in ("role", "pid", "start") if key not in entry]
        if missing:
            raise ConfigError(f"{where}: processes[{index}] needs {', '.join(missing)}")
        refs.append(ProcRef(**entry))
    return refs


def _running(state_dir: Path) -> list[ProcRef]:
    """The processes recorded in ``state_dir`` that still run."""
    state = read_state(state_dir)
    return [ref for ref in _refs(state) if ref.alive()] if state else []


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
