"""Every private name of Optuna that droptune uses, resolved here once and checked when this
module is imported; nothing else in droptune touches Optuna's internals.

droptune writes a population round's trials in batches (one transaction where Optuna's public
API takes one per value), reads trial states narrowly, and lets a round's trials suggest
through buffered views of the storage. That needs Optuna's RDB models, its scoped sessions,
its cache layer and a few attributes of ``Study``/``Trial``. They are not a public API: an
Optuna outside :data:`SUPPORTED` (or one that renamed a name) fails here, loudly, with the
range to install; it never falls back to something that silently behaves differently.
"""

from __future__ import annotations

import copy
from typing import Any

import optuna
from packaging.version import Version

from droptune.exceptions import DroptuneError


#: The Optuna releases droptune is tested with: ``[low, high)``. Keep in step with
#: ``pyproject.toml`` (``tests/storage/test_optuna_contract.py`` checks both).
SUPPORTED = ("5.0", "5.2")


class UnsupportedOptuna(DroptuneError, ImportError):
    """The installed Optuna is outside the supported range or lacks a name droptune uses."""

    exit_code = 1  # the environment, not the user's input


def _unsupported(why: str) -> UnsupportedOptuna:
    low, high = SUPPORTED
    return UnsupportedOptuna(
        f"optuna {optuna.__version__} is not supported by this droptune ({why}); install a "
        f"supported release: pip install 'optuna>={low},<{high}'"
    )


def _check_version() -> None:
    low, high = (Version(v) for v in SUPPORTED)
    if not low <= Version(optuna.__version__) < high:
        raise _unsupported(f"supported: >={SUPPORTED[0]},<{SUPPORTED[1]}")


_check_version()

try:
    from optuna.pruners import _filter_study
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._cached_storage import _StudyInfo
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError as exc:  # pragma: no cover - only with an Optuna that renamed them
    raise _unsupported(f"missing {exc.name or exc}") from None

#: Methods droptune calls on Optuna's classes (checked here, by name, at import).
_METHODS = {
    optuna.Study: ("_pop_waiting_trial_id",),
    optuna.Trial: ("_get_latest_trial",),
    optuna.storages.RDBStorage: (
        "_set_trial_attr_without_commit",
        "_set_trial_value_without_commit",
        "_set_trial_intermediate_value_without_commit",
        "check_trial_is_updatable",
    ),
    _CachedStorage: ("_add_trials_to_cache",),
}
_MODELS = (
    "TrialModel",
    "TrialValueModel",
    "TrialParamModel",
    "TrialUserAttributeModel",
    "TrialIntermediateValueModel",
    "TrialHeartbeatModel",
    "StudyModel",
)


def _check_names() -> None:
    missing = [
        f"{owner.__name__}.{name}"
        for owner, names in _METHODS.items()
        for name in names
        if not hasattr(owner, name)
    ]
    missing += [f"models.{name}" for name in _MODELS if not hasattr(models, name)]
    if missing:
        raise _unsupported(f"missing {', '.join(missing)}")


_check_names()

__all__ = [
    "SUPPORTED",
    "UnsupportedOptuna",
    "backend_of",
    "cache_lock",
    "cached_over",
    "cached_trial",
    "create_scoped_session",
    "filter_study",
    "latest_trial",
    "models",
    "param_distributions",
    "pop_waiting_trial",
    "register_trials",
    "reset_trials_cache",
    "storage_of",
    "study_id_of",
    "trial_id_of",
    "with_storage",
]

create_scoped_session = _create_scoped_session
filter_study = _filter_study


def storage_of(study: optuna.Study) -> Any:
    """The storage a study reads and writes through (Optuna's cache over the RDB storage)."""
    return study._storage


def backend_of(storage: Any) -> Any:
    """The storage below Optuna's cache layer (``storage`` itself where there is none)."""
    return getattr(storage, "_backend", storage)


def study_id_of(study: optuna.Study) -> int:
    return int(study._study_id)


def trial_id_of(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (its number counts within the study; the id is global)."""
    return int(trial._trial_id)


def cached_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial's own copy of itself, which Optuna keeps current on every write through the
    trial (``trial.user_attrs`` and pruners read it)."""
    return trial._cached_frozen_trial


def latest_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """What ``Trial.should_prune`` hands the pruner."""
    return trial._get_latest_trial()


def pop_waiting_trial(study: optuna.Study) -> int | None:
    """A WAITING trial made RUNNING for this process (enqueued or re-queued), or None."""
    return study._pop_waiting_trial_id()


def reset_trials_cache(study: optuna.Study) -> None:
    """Forget the study's per-thread view of its trials, as ``ask`` and ``tell`` do."""
    study._thread_local.cached_all_trials = None


def with_storage(study: optuna.Study, storage: Any) -> optuna.Study:
    """A shallow copy of ``study`` that reads and writes through ``storage`` (a view of the
    real storage, such as a population round's buffer)."""
    view = copy.copy(study)
    view._storage = storage
    return view


def cached_over(storage: Any) -> bool:
    """Whether ``storage`` is Optuna's cache layer (over an RDB storage)."""
    return isinstance(storage, _CachedStorage)


def register_trials(storage: Any, study_id: int, frozen: list[optuna.trial.FrozenTrial]) -> None:
    """Record trials created below the cache layer in it, as its ``create_new_trial`` does."""
    with storage._lock:
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, frozen)


def param_distributions(storage: Any, trial_id: int) -> dict[str, Any]:
    """The cache layer's record of the study's param distributions (by name) for the study of
    ``trial_id``; call with :func:`cache_lock` held. Updating it records a new param."""
    study_id = storage._trial_id_to_study_id_and_number[trial_id][0]
    return storage._studies[study_id].param_distribution


def cache_lock(storage: Any) -> Any:
    """The cache layer's lock (a context manager)."""
    return storage._lock
