"""``droptune stack up|down|status`` (and the hidden ``supervise`` of ``up --detach``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated
from typing import Any

import typer

from droptune.exceptions import DroptuneError
from droptune.stack._control import run_stack
from droptune.stack._control import start_stack
from droptune.stack._control import stop_stack
from droptune.stack._state import _REQUEST_ENV
from droptune.stack._state import BACKEND_ENV
from droptune.stack._state import DEFAULT_STATE_DIR
from droptune.stack._state import STATE_FILE
from droptune.stack._state import StackRequest
from droptune.stack._state import _refs
from droptune.stack._state import read_state
from droptune.stack._supervisor import Supervisor
from droptune.study.launcher import STORAGE_ENV


__all__ = ["stack_app"]

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
    code = Supervisor(request, state_dir.resolve(), detached=True).run()
    if code:
        raise typer.Exit(code)
