"""MLflow runs for studies and trials: one experiment per study, one parent run per study, one
child run per trial (tag ``mlflow.parentRunId``, run name ``trial-<number>``).

Built on :class:`mlflow.MlflowClient`, not the fluent API (no process-global active run, so a
worker can track many trials and several stores) and not optuna-integration's deprecated
``MLflowCallback``. Each trial costs three tracking calls: ``create_run`` when it starts (the UI
shows it RUNNING), one ``log_batch`` with every param, tag and per-epoch metric when it ends,
and ``set_terminated`` with the status mapped from Optuna's state.

Tracking never stops a trial: a failure is logged once per trial and recorded on the trial
(``droptune.tracking_error``); ``droptune sync`` back-fills the missing runs later.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import logging
import os
from pathlib import Path
import sqlite3
import time
from typing import Any

from droptune.exceptions import TrackingError
from droptune.exceptions import TrackingUnreachable
from droptune.records import ERROR_TAG
from droptune.records import ROLE_TAG
from droptune.records import STUDY_TAG
from droptune.records import TRIAL_NUMBER_TAG
from droptune.storage import mask_url
from droptune.storage import prepare_sqlite


__all__ = [
    "STATUS_BY_STATE",
    "TRACKING_SCHEMES",
    "Tracker",
    "check_tracking_uri",
    "default_tracking_uri",
    "flatten",
]

log = logging.getLogger(__name__)

#: Optuna trial state → MLflow run status.
STATUS_BY_STATE = {
    "COMPLETE": "FINISHED",
    "PRUNED": "KILLED",
    "FAIL": "FAILED",
    "RUNNING": "RUNNING",
    "WAITING": "SCHEDULED",
}


_MAX_PARAM = 6000  # MLflow's param value limit is 6000 characters


#: The tracking URI forms droptune accepts (MLflow's server, its database stores, Databricks).
TRACKING_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql", "mysql", "databricks")


#: The experiment tag MLflow 3's UI reads to choose its layout: the model-training view (runs,
#: metrics, parameters) instead of the GenAI one (traces, judges).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def check_tracking_uri(uri: str, field: str) -> str:
    """``uri`` if it is a tracking URI droptune can use, else TrackingError naming ``field``
    (a garbage or ``ftp://`` URI would make every trial warn and record nothing)."""
    from droptune.exceptions import SpecError
    from droptune.storage import mask_text

    if not uri.startswith(TRACKING_SCHEMES):
        raise SpecError(
            f"{field}: unsupported tracking URI {mask_text(uri)!r}; allowed: "
            "http(s)://host:port, sqlite:///path.db, postgresql://..., mysql://..., databricks"
        )
    problem = _unusable(uri)
    if problem:
        raise SpecError(f"{field}: tracking URI {mask_text(uri)!r} {problem}")
    return uri


def check_tracking_database(uri: str, field: str, required: bool = False) -> None:
    """Connect once to a database tracking store (``postgresql``/``mysql``) before anything
    is created: MLflow's client retries a database that does not exist for minutes. A store
    that cannot be opened as given (no such database, a wrong password) is a SpecError (exit
    2); one that is down only warns, as a tracking outage never stops a study (``droptune
    sync`` back-fills it)."""
    if not uri.startswith(("postgresql", "mysql")):
        return
    import sqlalchemy as sa

    from droptune.exceptions import SpecError
    from droptune.storage import is_outage
    from droptune.storage import mask_text

    args = {"connect_timeout": 10} if uri.startswith("postgresql") else {}
    try:
        engine = sa.create_engine(uri, connect_args=args)
    except Exception as exc:
        raise SpecError(f"{field}: {mask_text(uri)!r} cannot be used: {exc}") from None
    try:
        with engine.connect():
            pass
    except Exception as exc:
        text = mask_text((str(exc).splitlines() or [type(exc).__name__])[0])
        if is_outage(exc) and required:  # a command that only talks to MLflow: it cannot go on
            from droptune.exceptions import TrackingUnreachable

            raise TrackingUnreachable(
                f"{field}: the tracking database {mask_text(uri)!r} is unreachable: {text}"
            ) from None
        if is_outage(exc):
            log.warning(
                "%s: the tracking database %r is unreachable (%s): trials are recorded in "
                "Optuna only until it is back; then run `droptune sync`",
                field,
                mask_text(uri),
                text,
            )
            return
        raise SpecError(
            f"{field}: the tracking database {mask_text(uri)!r} cannot be opened: {text}"
        ) from None
    finally:
        engine.dispose()


def _unusable(uri: str) -> str | None:
    """Why a tracking URI of an accepted scheme can never work (None if it may)."""
    from urllib.parse import urlsplit

    if uri.startswith(("http://", "https://")):
        if not (urlsplit(uri).hostname or ""):
            return "names no host (http://host:port)"
        return None
    if uri.startswith("sqlite:"):
        path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
        if not path or path.startswith(":memory:"):
            return "names no file: an in-memory store loses every run (sqlite:///path/mlflow.db)"
        folder = Path(path).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return f"cannot be created: {str(folder)!r} is not a folder"
        try:  # access() says yes to root everywhere (/proc too): try it, leaving nothing
            import tempfile

            os.rmdir(tempfile.mkdtemp(dir=folder))
        except OSError as exc:
            return f"cannot be created in {str(folder)!r}: {exc.strerror or exc}"
    return None


def default_tracking_uri(study_name: str, root: Path = Path("runs")) -> str:
    """``sqlite:///runs/<study>/mlflow.db`` (its artifacts go to ``runs/<study>/mlartifacts``)."""
    from droptune.storage import check_study_name

    check_study_name(study_name)
    return f"sqlite:///{root / study_name / 'mlflow.db'}"


def runs_page(experiment_id: str, directions: Sequence[str] = ("minimize",)) -> str:
    """The MLflow UI's page of a study's trials (``#/experiments/<id>/runs?...``): the
    model-training view (MLflow 3 opens its GenAI view otherwise), trial runs only (a
    collapsed study run would hide them), best first by the trial's ``objective``."""
    from urllib.parse import urlencode

    objective = "objective" if len(directions) == 1 else "objective_0"
    query = urlencode(
        {
            "workflowType": "machine_learning",
            "searchFilter": f"tags.`{ROLE_TAG}` = 'trial'",
            "orderByKey": f"metrics.`{objective}`",
            "orderByAsc": "true" if directions[0] == "minimize" else "false",
        }
    )
    return f"#/experiments/{experiment_id}/runs?{query}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def _client_settings() -> None:
    """A dead tracking server must cost seconds, not MLflow's minutes of retries, and show up
    as one warning per trial (not urllib3's one per retry). MLflow must not print run URLs to
    stdout: they would carry a tracking URL's password."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class Tracker:
    """Mirror a study's trials into MLflow.

    Args:
        uri: Tracking URI: ``sqlite:///...``, ``postgresql://...`` or ``http://host:port``.
        study_name: The study (and, unless ``experiment`` is given, the experiment name).
        experiment: Experiment name override.
        artifact_root: Artifact location for a new experiment on a local store.
    """

    def __init__(
        self,
        uri: str,
        study_name: str,
        experiment: str | None = None,
        artifact_root: str | None = None,
    ) -> None:
        _client_settings()
        from mlflow import MlflowClient

        self.uri = uri
        self.study_name = study_name
        self.experiment_name = experiment or study_name
        self.artifact_root = artifact_root
        if uri.startswith("sqlite:///"):
            # The folder, and WAL as for the study's own database: MLflow leaves SQLite in
            # rollback-journal mode, where every writer locks out readers and the other
            # workers' writers, which serialises packed and population workers on tracking.
            with contextlib.suppress(sqlite3.Error):
                prepare_sqlite(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None

    @property
    def masked_uri(self) -> str:
        return mask_url(self.uri)

    def experiment_id(self) -> str:
        """The study's experiment, created on first use."""
        if self._experiment_id is None:
            try:
                found = self.client.get_experiment_by_name(self.experiment_name)
                if found is not None:
                    self._experiment_id = found.experiment_id
                    if EXPERIMENT_KIND_TAG not in (found.tags or {}):
                        self.client.set_experiment_tag(
                            found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
                        )
                else:
                    self._experiment_id = self._create_experiment()
            except TrackingError:
                raise
            except Exception as exc:
                raise TrackingUnreachable(
                    f"MLflow at {self.masked_uri} is unreachable: {_short(exc, self.uri)}"
                ) from None
        return self._experiment_id

    def _create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        location = self.artifact_root
        if location is None and self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlartifacts").resolve().as_uri()
        try:
            return str(
                self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=location,
                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
                )
            )
        except MlflowException:
            # Another worker created it first.
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return str(found.experiment_id)

    def create_parent_run(self, tags: dict[str, str], params: dict[str, Any] | None = None) -> str:
        """A new parent run for the study (the caller makes sure only one is created)."""
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id(),
            run_name=self.study_name,
            tags={STUDY_TAG: self.study_name, ROLE_TAG: "study", **tags},
        )
        param_list = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
        for start in range(0, len(param_list), 100):
            self.client.log_batch(
                run.info.run_id, params=param_list[start : start + 100], synchronous=True
            )
        return str(run.info.run_id)

    def start_child_run(self, parent_run_id: str, name: str, tags: dict[str, str]) -> str:
        """Create a RUNNING run under the study's run."""
        run = self.client.create_run(
            self.experiment_id(),
            run_name=name,
            tags={"mlflow.parentRunId": parent_run_id, STUDY_TAG: self.study_name, **tags},
        )
        return str(run.info.run_id)

    def start_trial_run(self, parent_run_id: str, trial_number: int, tags: dict[str, str]) -> str:
        """Create the trial's child run, RUNNING."""
        return self.start_child_run(
            parent_run_id,
            f"trial-{trial_number}",
            {
                TRIAL_NUMBER_TAG: str(trial_number),
                ROLE_TAG: "trial",
                "optuna.state": "RUNNING",
                **tags,
            },
        )

    def finish_trial_run(
        self,
        run_id: str,
        *,
        state: str,
        params: dict[str, Any],
        history: list[dict[str, float]],
        tags: dict[str, str],
        error: str | None = None,
        logged: dict[int, set[str]] | None = None,
    ) -> None:
        """Log everything about the ended trial in one batch and set the run's final status;
        ``logged`` holds the metrics (step → keys) already on the run from training, which are
        not logged twice."""
        from mlflow.entities import Metric
        from mlflow.entities import Param
        from mlflow.entities import RunTag

        now = int(time.time() * 1000)
        done = logged or {}
        metrics = [
            Metric(key, float(value), now, step)
            for step, row in enumerate(history)
            for key, value in row.items()
            if _finite(value) and key not in done.get(step, ())
        ]
        param_list = [Param(key, _param_value(value)) for key, value in params.items()]
        all_tags = {**tags, "optuna.state": state}
        if error:
            all_tags[ERROR_TAG] = error[:5000]
        tag_list = [RunTag(key, str(value)) for key, value in all_tags.items()]
        # MLflow caps one batch at 1000 metrics, 100 params, 100 tags.
        for start in range(0, max(len(metrics), 1), 1000):
            chunk = metrics[start : start + 1000]
            first = start == 0
            self.client.log_batch(
                run_id,
                metrics=chunk,
                params=param_list[:100] if first else [],
                tags=tag_list if first else [],
                synchronous=True,
            )
        for start in range(100, len(param_list), 100):
            self.client.log_batch(run_id, params=param_list[start : start + 100], synchronous=True)
        self.client.set_terminated(run_id, status=STATUS_BY_STATE.get(state, "FAILED"))

    def log_epochs(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> set[str]:
        """The metrics of some epochs (``(step, row)``) on a running trial's run, in batches;
        returns the keys logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for step, row in rows
            for key, value in row.items()
            if _finite(value)
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
        return {m.key for m in metrics}

    def terminate(self, run_id: str, state: str, error: str | None = None) -> None:
        """Set a run's final status (used for reaped trials whose worker died)."""
        tags = {"optuna.state": state}
        if error:
            tags[ERROR_TAG] = error[:5000]
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status=STATUS_BY_STATE.get(state, "FAILED"))

    def child_runs(self, parent_run_id: str) -> list[Any]:
        """The trial runs under a parent run."""
        return list(
            self.client.search_runs(
                [self.experiment_id()],
                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                max_results=50000,
            )
        )


def _finite(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number and number not in (float("inf"), float("-inf"))


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    if "://" in text:
        text = mask_url(text)
    return text[:_MAX_PARAM]


def _short(exc: BaseException, uri: str) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.replace(uri, mask_url(uri))[:300]
