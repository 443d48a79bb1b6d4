"""Glue between an Optuna study and its MLflow runs, as used by workers, ``run`` and ``sync``.

The parent run is created exactly once per study, whichever worker or machine gets there first:
creators race on a primary-key insert into a small ``droptune_meta`` table in the study's own
database; the winner creates the run and records its id (also as the study's user attribute
``droptune.mlflow_parent_run_id``), the others wait for it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from typing import TYPE_CHECKING
from typing import Any

from droptune.exceptions import TrackingError
from droptune.records import BACKFILLED_TAG
from droptune.records import BEST_RUN_TAG
from droptune.records import BEST_TRIAL_TAG
from droptune.records import DEVICE_ATTR
from droptune.records import ERROR_ATTR
from droptune.records import EXPERIMENT_ATTR
from droptune.records import HISTORY_ATTR
from droptune.records import PARENT_ATTR
from droptune.records import RUN_ID_ATTR
from droptune.records import SECONDS_ATTR
from droptune.records import SEED_ATTR
from droptune.records import SPEC_ATTR
from droptune.records import STORAGE_TAG
from droptune.records import TRIAL_NUMBER_TAG
from droptune.records import URI_ATTR
from droptune.records import VERSION_ATTR
from droptune.records import WORKER_ATTR
from droptune.storage import MASK
from droptune.storage import cached_trial
from droptune.storage import claim_once
from droptune.storage import mask_url
from droptune.storage import meta_delete
from droptune.storage import meta_get
from droptune.storage import meta_set
from droptune.storage import set_user_attrs
from droptune.storage import storage_of
from droptune.storage import trial_id_of
from droptune.timing import timed
from droptune.tracking._client import Tracker
from droptune.tracking._client import default_tracking_uri
from droptune.tracking._client import flatten
from droptune.tracking._trial_run import trial_run_content


if TYPE_CHECKING:
    import optuna

    from droptune.study.spec import StudySpec

__all__ = ["HISTORY_ATTR", "SECONDS_ATTR", "StudyTracking", "tracking_uri"]

log = logging.getLogger(__name__)


def tracking_uri(spec: StudySpec, study_name: str) -> str:
    """Spec ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the study's local SQLite."""
    return (
        spec.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(study_name)
    )


class StudyTracking:
    """MLflow tracking for one study: the parent run, one child run per trial.

    Every method swallows tracking failures after logging them (once per trial) and recording
    them on the trial, so that a dead tracking server never fails a trial.
    """

    def __init__(
        self, spec: StudySpec, study_name: str, storage_url: str, uri: str | None = None
    ) -> None:
        import droptune

        self.enabled = spec.tracking.enabled
        self.study_name = study_name
        self.storage_url = storage_url
        self.uri = uri or tracking_uri(spec, study_name)
        self.experiment = spec.tracking.experiment
        self.version = droptune.__version__
        self._tracker: Tracker | None = None
        self._parent: str | None = None
        self._spent: dict[int, float] = {}
        #: Trial number → step → the metric keys its run got while it trained.
        self._live: dict[int, dict[int, set[str]]] = {}

    @classmethod
    def for_study(
        cls, study: optuna.Study, storage_url: str, uri: str | None = None
    ) -> StudyTracking:
        """Tracking for an existing droptune study, from the spec recorded on it.

        The tracking URI is ``uri``, else the spec's ``tracking.uri``, else
        ``$MLFLOW_TRACKING_URI``, else the URI recorded when the study was tracked first, else
        the default local store. A recorded URI whose password was masked is not usable: pass
        ``uri`` (``--tracking-uri``) or set ``MLFLOW_TRACKING_URI``.
        """
        from droptune.study.spec import spec_from_dict

        recorded = study.user_attrs.get(SPEC_ATTR)
        if not isinstance(recorded, dict):
            raise TrackingError(
                f"study {study.study_name!r} was not created by droptune (no droptune.spec "
                "attribute): its trials cannot be mirrored into MLflow"
            )
        spec = spec_from_dict(recorded, source=f"study {study.study_name!r}", recorded=True)
        candidates = [
            uri,
            spec.tracking.uri,
            os.environ.get("MLFLOW_TRACKING_URI"),
            study.user_attrs.get(URI_ATTR),
        ]
        chosen = next((str(c) for c in candidates if c), None)
        if chosen is not None and MASK in chosen:
            raise TrackingError(
                f"the study's tracking URI {chosen!r} holds a password that droptune does not "
                "store: pass --tracking-uri or set MLFLOW_TRACKING_URI"
            )
        return cls(spec, study.study_name, storage_url, uri=chosen)

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.study_name, self.experiment)
        return self._tracker

    def parent_run_id(self, study: optuna.Study) -> str:
        """The study's parent run id, creating the run (once) if needed."""
        if self._parent is None:
            known = study.user_attrs.get(PARENT_ATTR)
            if known:
                self._parent = str(known)
            else:
                tags = {
                    VERSION_ATTR: self.version,
                    STORAGE_TAG: mask_url(self.storage_url),
                    "optuna.directions": ",".join(d.name.lower() for d in study.directions),
                }
                self._parent = claim_once(
                    self.storage_url,
                    self.study_name,
                    "mlflow_parent_run_id",
                    lambda: self.tracker.create_parent_run(tags, self._study_params(study)),
                )
                study.set_user_attr(PARENT_ATTR, self._parent)
                study.set_user_attr(EXPERIMENT_ATTR, self.tracker.experiment_id())
                study.set_user_attr(URI_ATTR, mask_url(self.uri))
        return self._parent

    def _study_params(self, study: optuna.Study) -> dict[str, Any]:
        """The parent run's params: the spec as recorded on the study (URLs masked)."""
        recorded = study.user_attrs.get(SPEC_ATTR)
        if not isinstance(recorded, dict):
            return {}
        return {
            key: value
            for key, value in flatten(recorded).items()
            if value is not None and value != [] and value != {}
        }

    def warm_up(self, study: optuna.Study) -> None:
        """Open the tracking store and find the parent run before the first trial, so that
        the one-time cost (imports, connection, schema check) is not counted on a trial."""
        if not self.enabled:
            return
        try:
            self.parent_run_id(study)
            self.tracker.experiment_id()  # opens the store (imports, connection, schema check)
        except Exception as exc:
            log.debug("tracking warm-up failed: %s", _first_line(exc))

    def _error_message(self, number: Any, exc: BaseException, what: str) -> str:
        """The tracking failure as kept on the trial (URL masked), logged once."""
        message = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        message = message.replace(self.uri, mask_url(self.uri))[:1000]
        log.warning(
            "trial %s: MLflow tracking failed (%s); `droptune sync` back-fills the run "
            "once the server is back",
            number,
            message,
        )
        return message

    def _record_error(self, trial: Any, exc: BaseException, what: str) -> None:
        message = self._error_message(getattr(trial, "number", "?"), exc, what)
        with contextlib.suppress(Exception):  # never let bookkeeping fail the trial
            trial.set_user_attr(ERROR_ATTR, message)

    def _start_tags(self, user_attrs: dict[str, Any]) -> dict[str, str]:
        return {
            VERSION_ATTR: self.version,
            SEED_ATTR: str(user_attrs.get(SEED_ATTR, "")),
            DEVICE_ATTR: str(user_attrs.get(DEVICE_ATTR, "")),
            WORKER_ATTR: str(user_attrs.get(WORKER_ATTR, "")),
        }

    def trial_started(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Create the trial's RUNNING child run and link it both ways."""
        if not self.enabled:
            return
        linked = self.start_runs(study, [(trial.number, trial.user_attrs)])[trial.number]
        try:
            set_user_attrs(trial, linked)
        except Exception as exc:
            self._record_error(trial, exc, "start")

    def start_runs(
        self, study: optuna.Study, trials: list[tuple[int, dict[str, Any]]]
    ) -> dict[int, dict[str, Any]]:
        """Create the RUNNING child runs of several starting trials (``(number, user
        attributes)`` each) without writing to the trials: returns, per trial number, the
        attributes the caller records on the trial with its others (the run id, or the
        tracking error, which is logged here), so that a population round links P runs in one
        transaction. May run on a background thread."""
        if not self.enabled:
            return {}
        with timed("tracking"):
            return self._start_runs(study, trials)

    def _start_runs(
        self, study: optuna.Study, trials: list[tuple[int, dict[str, Any]]]
    ) -> dict[int, dict[str, Any]]:
        linked: dict[int, dict[str, Any]] = {}
        for number, user_attrs in trials:
            started = time.perf_counter()
            try:
                parent = self.parent_run_id(study)
                run_id = self.tracker.start_trial_run(parent, number, self._start_tags(user_attrs))
                linked[number] = {RUN_ID_ATTR: run_id}
            except Exception as exc:
                linked[number] = {ERROR_ATTR: self._error_message(number, exc, "start")}
            self._spent[number] = time.perf_counter() - started
        return linked

    def spent(self, number: int) -> float:
        """Seconds spent tracking trial ``number`` so far in this process."""
        return self._spent.get(number, 0.0)

    def log_epochs(
        self, number: int, run_id: str, rows: list[tuple[int, dict[str, float]]]
    ) -> None:
        """Epoch rows of running trial ``number`` on its run, remembered so that the trial's end
        does not log them again. Best effort: a failure is logged (the end logs them all)."""
        if not self.enabled:
            return
        try:
            keys = self.tracker.log_epochs(run_id, rows)
        except Exception as exc:
            log.debug("trial %d: live metrics not logged: %s", number, _first_line(exc))
            return
        steps = self._live.setdefault(number, {})
        for step, row in rows:
            steps.setdefault(step, set()).update(k for k in row if k in keys)

    def forget_live(self, number: int) -> None:
        """Log every epoch of trial ``number`` again at its end (it restarts training)."""
        self._live.pop(number, None)

    def trial_ended(
        self,
        trial: optuna.Trial,
        state: str,
        values: float | list[float] | None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Complete the run of a trial whose objective just returned (``COMPLETE``), was pruned
        or raised (``FAIL``): called while the trial is still RUNNING, so that a tracking
        failure can be recorded on it. A trial whose start could not be tracked is left to
        ``droptune sync`` (one failure, logged once, per trial)."""
        if not self.enabled:
            return
        with timed("tracking"):
            self._trial_ended(trial, state, values, config)

    def _trial_ended(
        self,
        trial: optuna.Trial,
        state: str,
        values: float | list[float] | None,
        config: dict[str, Any] | None,
    ) -> None:
        from optuna.trial import TrialState

        started = time.perf_counter()
        try:
            if trial.user_attrs.get(ERROR_ATTR):
                return
            study = trial.study
            # the trial's own up-to-date copy (Optuna keeps it current on every write through
            # the trial), else the stored one
            from optuna import Trial

            frozen = (
                copy.deepcopy(cached_trial(trial))
                if isinstance(trial, Trial)
                else storage_of(study).get_trial(trial_id_of(trial))
            )
            frozen.state = TrialState[state]
            if state == "COMPLETE" and values is not None:
                frozen.values = list(values) if isinstance(values, list) else [float(values)]
            self.log_trial(study, frozen, config)
        except Exception as exc:
            self._record_error(trial, exc, "finish")
        finally:
            spent = self._spent.pop(trial.number, 0.0) + time.perf_counter() - started
            with contextlib.suppress(Exception):
                trial.set_user_attr(SECONDS_ATTR, round(spent, 4))

    def trial_finished(
        self,
        study: optuna.Study,
        frozen: optuna.trial.FrozenTrial,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Log an ended trial (e.g. one told by hand); failures are logged and kept in
        ``droptune_meta`` when the trial itself no longer takes attributes."""
        if not self.enabled:
            return
        self._spent.pop(frozen.number, None)
        try:
            with timed("tracking"):
                self.log_trial(study, frozen, config)
        except Exception as exc:
            self._record_error(_TrialAttrs(self, study, frozen), exc, "finish")

    def log_trial(
        self,
        study: optuna.Study,
        frozen: optuna.trial.FrozenTrial,
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
        new_run: bool = False,
    ) -> str:
        """Write (or complete) the run of one ended trial; returns its run id.

        ``run_id`` names the run to complete; by default the trial's own, and a new one when
        the trial has none (its start was not tracked) or ``new_run`` is set."""
        parent = self.parent_run_id(study)
        run_id = None if new_run else (run_id or self.run_id_of(frozen))
        if not run_id:
            run_id = self.tracker.start_trial_run(
                parent,
                frozen.number,
                {VERSION_ATTR: self.version, BACKFILLED_TAG: "true"},
            )
            self.link(study, frozen, run_id)
        content = trial_run_content(study, frozen, config)
        logged = self._live.pop(frozen.number, None)
        self.tracker.finish_trial_run(
            str(run_id), state=frozen.state.name, logged=logged, **content
        )
        return str(run_id)

    def close_ended_runs(self, study: optuna.Study) -> list[int]:
        """Complete the runs still RUNNING whose trial has ended (its worker was killed, or
        the finish could not be logged): one search, then one write per such run. Returns
        the trial numbers whose run was closed."""
        if not self.enabled:
            return []
        from optuna.trial import TrialState

        parent = study.user_attrs.get(PARENT_ATTR)
        if not parent:
            return []
        running = self.tracker.client.search_runs(
            [self.tracker.experiment_id()],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
            ),
            max_results=50000,
        )
        if not running:
            return []
        ended = {
            t.number: t
            for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
            )
        }
        closed = []
        for run in running:
            number = run.data.tags.get(TRIAL_NUMBER_TAG, "")
            frozen = ended.get(int(number)) if number.isdigit() else None
            if frozen is None:
                continue
            try:
                self.log_trial(study, frozen, run_id=run.info.run_id)
                closed.append(frozen.number)
            except Exception as exc:
                log.warning(
                    "could not end MLflow run %s of trial %d: %s",
                    run.info.run_id,
                    frozen.number,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
        return closed

    def study_started(self, study: optuna.Study) -> bool:
        """Create (or reopen) the parent run before workers start, so that they never race to
        create the tracking store's schema. Returns False (after a warning) if MLflow is
        unreachable: the study runs anyway and ``droptune sync`` back-fills it."""
        if not self.enabled:
            return False
        try:
            parent = self.parent_run_id(study)
            if self.tracker.client.get_run(parent).info.status != "RUNNING":
                self.tracker.client.update_run(parent, status="RUNNING")
            return True
        except Exception as exc:
            log.warning(
                "MLflow at %s is unreachable (%s): trials are recorded in Optuna only; run "
                "`droptune sync` once it is back",
                mask_url(self.uri),
                _first_line(exc).replace(self.uri, mask_url(self.uri)),
            )
            return False

    def study_ended(self, study: optuna.Study, finished: bool) -> list[str]:
        """Close leftover trial runs, refresh the study artifacts on the parent run and set
        its status (FINISHED when the study has its trials, KILLED otherwise). Returns the
        artifact names uploaded."""
        if not self.enabled:
            return []
        try:
            self.close_ended_runs(study)
            names = self.report(study)
            parent = self.parent_run_id(study)
            self._log_study_metrics(study, parent)
            self.tracker.client.set_terminated(parent, "FINISHED" if finished else "KILLED")
            return names
        except Exception as exc:
            log.warning(
                "could not update the study's MLflow run (%s); run `droptune sync` and "
                "`droptune report` once MLflow is back",
                _first_line(exc).replace(self.uri, mask_url(self.uri)),
            )
            return []

    def settle_parent(self, study: optuna.Study) -> str | None:
        """Bring the study's run to the state its trials say: FINISHED when the study has
        all its trials, KILLED when it has not and no trial is running (a ``run`` that was
        killed left it RUNNING); left alone while trials run. Returns the status set."""
        from droptune.storage import trial_states
        from droptune.study.slots import Slots

        parent = study.user_attrs.get(PARENT_ATTR)
        if not parent:
            return None
        states = trial_states(study)
        slots = Slots(self.storage_url, self.study_name)
        try:  # a study without slots (made outside droptune's runner) is never "finished"
            rows = slots.rows()
            finished = bool(rows) and slots.finished(states)
        finally:
            slots.close()
        # a trial running, or a slot a worker holds between two trials: the study goes on
        busy = "RUNNING" in states.values() or any(
            row.owner is not None and row.trial_number is None for row in rows
        )
        if not finished and busy:
            return None
        status = "FINISHED" if finished else "KILLED"
        client = self.tracker.client
        if client.get_run(str(parent)).info.status != status:
            self._log_study_metrics(study, str(parent))
            client.set_terminated(str(parent), status)
        return status

    def _log_study_metrics(self, study: optuna.Study, parent: str) -> None:
        """Trial counts by state and the best value(s) so far, on the parent run."""
        from mlflow.entities import Metric

        from droptune.tracking._report import study_metrics

        now = int(time.time() * 1000)
        trials = study.get_trials(deepcopy=False)
        metrics, best = study_metrics(study, trials)
        tags: dict[str, str] = {}
        if best is not None:
            # the study's run links its best trial's run (the confirmed best is tagged by
            # `droptune confirm`)
            tags[BEST_TRIAL_TAG] = str(best.number)
            run_id = self.run_id_of(best)
            if run_id:
                tags[BEST_RUN_TAG] = run_id
        from mlflow.entities import RunTag

        self.tracker.client.log_batch(
            parent,
            metrics=[Metric(k, v, now, len(trials)) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
            synchronous=True,
        )

    def report(self, study: optuna.Study) -> list[str]:
        """Refresh the study artifacts (plots, best config, summary) on the parent run."""
        from droptune.tracking._report import upload_study_artifacts

        parent = self.parent_run_id(study)
        return upload_study_artifacts(study, self.tracker.client, parent)

    def run_id_of(self, frozen: optuna.trial.FrozenTrial) -> str | None:
        """The trial's run id: its user attribute, or the link sync recorded after it ended."""
        own = frozen.user_attrs.get(RUN_ID_ATTR)
        if own:
            return str(own)
        return meta_get(self.storage_url, self.study_name, f"run_id:{frozen.number}")

    def link(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial, run_id: str) -> None:
        """Record trial → run. Optuna refuses attributes on finished trials, so a run created
        or adopted after the trial ended is linked in ``droptune_meta`` instead."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            storage_of(study).set_trial_user_attr(trial_id_of(frozen), RUN_ID_ATTR, run_id)
        except UpdateFinishedTrialError:
            meta_set(self.storage_url, self.study_name, f"run_id:{frozen.number}", run_id)

    def forget_parent(self, study: optuna.Study) -> None:
        """Drop the recorded parent run (it does not exist on this tracking server)."""
        meta_delete(self.storage_url, self.study_name, "mlflow_parent_run_id")
        study.set_user_attr(PARENT_ATTR, "")
        self._parent = None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__


class _TrialAttrs:
    """set_user_attr on a FrozenTrial: through the storage while it runs, else in
    ``droptune_meta`` (Optuna refuses attributes on finished trials)."""

    def __init__(
        self, tracking: StudyTracking, study: optuna.Study, frozen: optuna.trial.FrozenTrial
    ) -> None:
        self.tracking, self.study, self.frozen = tracking, study, frozen
        self.number = frozen.number

    def set_user_attr(self, key: str, value: Any) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            storage_of(self.study).set_trial_user_attr(trial_id_of(self.frozen), key, value)
        except UpdateFinishedTrialError:
            meta_set(
                self.tracking.storage_url,
                self.tracking.study_name,
                f"{key}:{self.number}",
                str(value),
            )
