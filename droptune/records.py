"""What droptune records about a study and its trials: every key it writes, in one place.

Optuna keeps a trial's params, values, state and intermediate values; droptune adds user
attributes to trials and studies, and tags to MLflow runs. Their keys are part of the record a
study leaves behind (``droptune status``, ``export``, ``sync`` and users' own scripts read
them), so they are constants here, written and read through these names only.

This module imports nothing of droptune: every layer may use it.
"""

from __future__ import annotations

import traceback


# -- trial attributes (``trial.user_attrs``) ----------------------------------------------------
#: The seed the trial trained with (``droptune export`` + ``train`` reproduce it).
SEED_ATTR = "droptune.seed"
#: The worker (owner name), host and device that ran the trial.
WORKER_ATTR = "droptune.worker"
HOST_ATTR = "droptune.host"
DEVICE_ATTR = "droptune.device"
#: Epochs trained, whether early stopping ended it, the epoch a pruner stopped it at.
EPOCHS_ATTR = "droptune.epochs"
STOPPED_EARLY_ATTR = "droptune.stopped_early"
PRUNED_AT_EPOCH_ATTR = "droptune.pruned_at_epoch"
#: The size of the population the trial trained in (population mode).
POPULATION_ATTR = "droptune.population"
#: Why a trial failed (``Type: message``) and the end of its traceback.
FAIL_REASON_ATTR = "droptune.fail_reason"
TRACEBACK_ATTR = "droptune.traceback"
#: An out-of-memory retry: the error and the config overrides the retry trained with.
OOM_ATTR = "droptune.oom"
OVERRIDES_ATTR = "droptune.overrides"
#: The trial refused before training because a finished trial has exactly its params.
DUPLICATE_ATTR = "droptune.duplicate_of"
#: The trial is the study's baseline (the spec's own config, trial 0).
BASELINE_ATTR = "droptune.baseline"
#: Where a trial enqueued from ``start_from`` came from (``start_from.params[i]``, or
#: ``study NAME trial N``).
STARTED_FROM_ATTR = "droptune.started_from"
#: Seconds by category (``droptune.timing``), resident memory after the trial.
TIMING_ATTR = "droptune.timing"
RSS_ATTR = "droptune.rss_mb"
#: The trial's MLflow run, a tracking error kept instead, MLflow seconds, per-epoch history.
RUN_ID_ATTR = "droptune.mlflow_run_id"
ERROR_ATTR = "droptune.tracking_error"
SECONDS_ATTR = "droptune.tracking_seconds"
HISTORY_ATTR = "droptune.history"

# -- study attributes (``study.user_attrs``) ----------------------------------------------------
#: The spec the study was created with, its objective metric(s), droptune's version.
SPEC_ATTR = "droptune.spec"
METRIC_ATTR = "droptune.metric"
VERSION_ATTR = "droptune.version"
#: The result of ``droptune confirm``.
CONFIRMATION_ATTR = "droptune.confirmation"
#: The study's MLflow parent run, tracking server and experiment.
PARENT_ATTR = "droptune.mlflow_parent_run_id"
URI_ATTR = "droptune.mlflow_tracking_uri"
EXPERIMENT_ATTR = "droptune.mlflow_experiment_id"

# -- MLflow tags ----------------------------------------------------------------------------------
STUDY_TAG = "droptune.study"
#: ``study``, ``trial`` or ``confirmation``.
ROLE_TAG = "droptune.role"
TRIAL_NUMBER_TAG = "droptune.trial_number"
ERROR_TAG = "droptune.error"
STORAGE_TAG = "droptune.storage"
BACKFILLED_TAG = "droptune.backfilled"
CONFIRMATION_OF_TAG = "droptune.confirmation_of"
CONFIRMED_BEST_TAG = "droptune.confirmed_best_trial"
#: On the study's run: its best trial's number and that trial's run.
BEST_TRIAL_TAG = "droptune.best_trial"
BEST_RUN_TAG = "droptune.best_run_id"

#: How much of a failure is kept on the trial.
REASON_CHARS = 1000
TRACEBACK_CHARS = 4000


def failure_attrs(exc: BaseException) -> dict[str, str]:
    """What a failed trial records: its reason (``Type: message``) and traceback."""
    return {
        FAIL_REASON_ATTR: f"{type(exc).__name__}: {exc}"[:REASON_CHARS],
        TRACEBACK_ATTR: "".join(traceback.format_exception(exc))[-TRACEBACK_CHARS:],
    }
