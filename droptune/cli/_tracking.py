"""The MLflow commands: ``sync`` (back-fill from the Optuna storage), ``report`` (the
study's artifacts) and ``ui`` (the MLflow UI on the study's tracking store)."""

from __future__ import annotations

from pathlib import Path
import sys
from typing import Annotated
from typing import Any

import typer

from droptune.cli._common import StorageOpt
from droptune.cli._common import StudyArg
from droptune.cli._common import TrackingOpt
from droptune.cli._common import _check_tracking_uri
from droptune.cli._common import _mask
from droptune.cli._common import _output_dir
from droptune.cli._common import _study_storage


def _study_tracking(study: str, storage: str | None, tracking_uri: str | None) -> Any:
    from droptune.export import load_study
    from droptune.tracking import StudyTracking

    url = _study_storage(storage, study)
    opened = load_study(study, url)
    if tracking_uri:
        _check_tracking_uri(tracking_uri)
    tracking = StudyTracking.for_study(opened, url, tracking_uri)
    tracking.enabled = True  # asked for explicitly, even if the spec turned tracking off
    return opened, tracking


def sync(
    study: StudyArg,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Back-fill MLflow from the Optuna storage: one run per ended trial, none left RUNNING."""
    from droptune.tracking._sync import sync_study

    opened, tracking = _study_tracking(study, storage, tracking_uri)
    report = _tracking_call(tracking, lambda: sync_study(opened, tracking))
    _tracking_call(tracking, lambda: tracking.settle_parent(opened))
    typer.echo(f"study {study} → MLflow {_mask(tracking.uri)}")
    typer.echo(
        f"runs created {len(report.created)}, completed {len(report.completed)}, adopted "
        f"{len(report.adopted)}, duplicates removed {len(report.duplicates_removed)}"
        + (", parent run created" if report.parent_created else "")
    )


def report(
    study: StudyArg,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Also write the artifacts here.")
    ] = None,
) -> None:
    """Refresh the study's plots, best config and summary on its MLflow parent run."""
    from droptune.tracking._report import write_study_artifacts

    opened, tracking = _study_tracking(study, storage, tracking_uri)
    if output is not None:
        for path in write_study_artifacts(opened, _output_dir(output, "--output")):
            typer.echo(f"wrote {path}")
    names = _tracking_call(tracking, lambda: tracking.report(opened))
    _tracking_call(tracking, lambda: tracking.close_ended_runs(opened))
    _tracking_call(tracking, lambda: tracking.settle_parent(opened))
    parent = tracking.parent_run_id(opened)
    typer.echo(f"uploaded {len(names)} artifacts to run {parent}: {', '.join(names)}")


def ui(
    study: StudyArg,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Default: a free one.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Host headers the UI accepts (with a non-local --host).")
    ] = None,
    open_page: Annotated[
        bool, typer.Option("--open", help="Open the page in this machine's web browser.")
    ] = False,
) -> None:
    """Start the MLflow UI on the study's tracking store and print its runs page (the study's
    trials, best first by their objective)."""
    from droptune.tracking._client import runs_page
    from droptune.tracking._server import start_server

    opened, tracking = _study_tracking(study, storage, tracking_uri)
    experiment = _tracking_call(tracking, tracking.tracker.experiment_id)
    page = runs_page(experiment, [d.name.lower() for d in opened.directions])
    if tracking.uri.startswith(("http://", "https://")):
        url = f"{tracking.uri.rstrip('/')}/{page}"
        typer.echo(_mask(url))
        if open_page:
            _open_in_browser(url)
        return
    artifacts = _local_artifacts(tracking.uri)
    if allowed_hosts:  # --allowed-hosts replaces MLflow's defaults: keep local access working
        allowed_hosts = ",".join(
            dict.fromkeys([*allowed_hosts.split(","), "localhost", "127.0.0.1"])
        )
    server = start_server(
        tracking.uri, artifacts, host=host, port=port, allowed_hosts=allowed_hosts
    )
    restore = _stop_on_signals()  # before the page is printed: a signal may follow at once
    try:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{server.port}/{page}"
        typer.echo(f"MLflow UI for study {study}: {url}")
        if open_page:
            _open_in_browser(url)
        typer.echo("press Ctrl-C to stop", err=True)
        sys.stdout.flush()
        code = server.process.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        server.stop()
        restore()
    if code:
        typer.echo(f"error: the MLflow server exited with code {code}; log: {server.log_path}")
        raise typer.Exit(1)


def _open_in_browser(url: str) -> None:
    """Open ``url`` with the desktop's browser; say so when there is none (a server, SSH)."""
    import webbrowser

    try:
        opened = webbrowser.open(url)
    except webbrowser.Error:
        opened = False
    if not opened:
        typer.echo("--open: no web browser found here; open the page above yourself", err=True)


def _stop_on_signals() -> Any:
    """SIGTERM and SIGHUP (a closed terminal, a service manager) end ``ui`` the way Ctrl-C does,
    so that its server is stopped too. Returns what restores the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _local_artifacts(uri: str) -> Path:
    """Where a local tracking store keeps its artifacts (beside an SQLite file)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return Path("mlartifacts")


def _tracking_call(tracking: Any, call: Any) -> Any:
    from droptune.exceptions import TrackingError

    try:
        return call()
    except TrackingError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrackingError(f"MLflow at {_mask(tracking.uri)} failed: {_mask(text)}") from None
