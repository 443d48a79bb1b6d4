"""The stack's supervisor: starts the MLflow server (when the stack owns one), creates the
study's parent run, starts the workers, watches them, and at the end fails the trials they left
RUNNING, closes the parent run and stops everything it started."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
import os
from pathlib import Path
import subprocess
import time
from typing import Any
import uuid

from droptune.processes import ProcRef
from droptune.processes import SignalFlag
from droptune.processes import stop_refs
from droptune.stack._state import _LOCAL_ALLOWED
from droptune.stack._state import _LOCAL_HOSTS
from droptune.stack._state import _REQUEST_ENV
from droptune.stack._state import BACKEND_ENV
from droptune.stack._state import StackRequest
from droptune.stack._state import _echo
from droptune.stack._state import _state_path
from droptune.stack._state import _write_state
from droptune.stack._state import read_state
from droptune.storage import mask_url
from droptune.study.launcher import WorkerLaunch
from droptune.study.launcher import start_worker
from droptune.tracking._client import runs_page


__all__ = ["Supervisor"]

_PROGRESS_EVERY_S = 15.0


class Supervisor:
    """Starts and watches the server and the workers of one stack; stops them at the end."""

    def __init__(self, request: StackRequest, state_dir: Path, detached: bool) -> None:
        self.request = request
        self.state_dir = state_dir
        self.flag = SignalFlag()
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
                directions = [d.name.lower() for d in self.study.directions]
                page = f"{uri}/{runs_page(experiment, directions)}"
                _echo(f"MLflow runs of study {request.study_name}: {page}")
                self._save(experiment_url=page)
        elif uri:
            self._save(mlflow_url=mask_url(uri))
        env = {k: v for k, v in os.environ.items() if k not in (_REQUEST_ENV, BACKEND_ENV)}
        if uri:
            env["MLFLOW_TRACKING_URI"] = uri
        launch = WorkerLaunch(
            request.spec_path,
            request.study_name,
            request.storage_url,
            request.n_trials,
            self.prefix,
        )
        for index, entry in enumerate(request.plan):
            if self.flag.signum is not None:
                return
            log_path = self.state_dir / f"worker-{index}.log"
            proc = start_worker(
                launch, index, entry, env=env, log_path=log_path, cwd=request.cwd, own_session=True
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
        stop_refs(self.worker_refs, timeout=30)
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
