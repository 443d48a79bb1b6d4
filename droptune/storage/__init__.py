"""A study's storage: URLs and their masking, opening, outage retry, and Optuna's RDB storage
with batch writes for population rounds.

Modules, from the bottom up:

* ``_urls``: what a storage URL and a study name may be; credentials masked in everything
  shown or recorded.
* ``_retry``: which errors are a database outage, and the retry of a call while it lasts.
* ``_open``: :func:`open_storage` (SQLite in WAL mode, PostgreSQL that reconnects).
* ``_optuna``: the only module that touches Optuna's private names; it checks them, and the
  Optuna version, when it is imported.
* ``_rdb``: :class:`DroptuneStorage`, the ``RDBStorage`` subclass every droptune study uses.
* ``_trials``: batched trial writes and narrow reads through a study.
* ``_rounds``: the buffered views of the storage a population round asks and prunes through.
* ``_meta``: droptune's own key-value table next to Optuna's (budget, MLflow parent run),
  with one engine per storage URL.

Importing this package does not import Optuna (commands that only check a spec or a URL stay
fast); the names that need it are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from droptune._lazy import lazy_exports
from droptune.storage._open import engine_kwargs
from droptune.storage._open import open_storage
from droptune.storage._open import prepare_sqlite
from droptune.storage._retry import OUTAGE_S
from droptune.storage._retry import create_tables
from droptune.storage._retry import creation_race
from droptune.storage._retry import is_outage
from droptune.storage._retry import retry_outage
from droptune.storage._urls import MASK
from droptune.storage._urls import SECRET_ENV
from droptune.storage._urls import STUDY_NAME_PATTERN
from droptune.storage._urls import MaskingFilter
from droptune.storage._urls import check_study_name
from droptune.storage._urls import check_url
from droptune.storage._urls import default_url
from droptune.storage._urls import mask_text
from droptune.storage._urls import mask_url


if TYPE_CHECKING:
    from droptune.storage._meta import claim_once
    from droptune.storage._meta import meta_delete
    from droptune.storage._meta import meta_get
    from droptune.storage._meta import meta_raise
    from droptune.storage._meta import meta_set
    from droptune.storage._optuna import SUPPORTED
    from droptune.storage._optuna import UnsupportedOptuna
    from droptune.storage._optuna import cached_trial
    from droptune.storage._optuna import storage_of
    from droptune.storage._optuna import study_id_of
    from droptune.storage._optuna import trial_id_of
    from droptune.storage._optuna import with_storage
    from droptune.storage._rdb import DroptuneStorage
    from droptune.storage._rounds import ParamBuffer
    from droptune.storage._rounds import ask_many
    from droptune.storage._rounds import round_heartbeats
    from droptune.storage._rounds import should_prune_many
    from droptune.storage._trials import create_trials
    from droptune.storage._trials import fail_stale_trials
    from droptune.storage._trials import fixed_params
    from droptune.storage._trials import is_enqueued
    from droptune.storage._trials import report_values
    from droptune.storage._trials import set_params_many
    from droptune.storage._trials import set_user_attrs
    from droptune.storage._trials import set_user_attrs_many
    from droptune.storage._trials import tell_trials
    from droptune.storage._trials import trial_states
else:
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            **dict.fromkeys(
                (
                    "SUPPORTED",
                    "UnsupportedOptuna",
                    "cached_trial",
                    "storage_of",
                    "study_id_of",
                    "trial_id_of",
                    "with_storage",
                ),
                "droptune.storage._optuna",
            ),
            "DroptuneStorage": "droptune.storage._rdb",
            **dict.fromkeys(
                ("claim_once", "meta_delete", "meta_get", "meta_raise", "meta_set"),
                "droptune.storage._meta",
            ),
            **dict.fromkeys(
                ("ParamBuffer", "ask_many", "round_heartbeats", "should_prune_many"),
                "droptune.storage._rounds",
            ),
            **dict.fromkeys(
                (
                    "create_trials",
                    "fail_stale_trials",
                    "fixed_params",
                    "is_enqueued",
                    "report_values",
                    "set_params_many",
                    "set_user_attrs",
                    "set_user_attrs_many",
                    "tell_trials",
                    "trial_states",
                ),
                "droptune.storage._trials",
            ),
        },
    )

__all__ = [
    "MASK",
    "OUTAGE_S",
    "SECRET_ENV",
    "STUDY_NAME_PATTERN",
    "SUPPORTED",
    "DroptuneStorage",
    "MaskingFilter",
    "ParamBuffer",
    "UnsupportedOptuna",
    "ask_many",
    "cached_trial",
    "check_study_name",
    "check_url",
    "claim_once",
    "create_tables",
    "create_trials",
    "creation_race",
    "default_url",
    "engine_kwargs",
    "fail_stale_trials",
    "fixed_params",
    "is_enqueued",
    "is_outage",
    "mask_text",
    "mask_url",
    "meta_delete",
    "meta_get",
    "meta_raise",
    "meta_set",
    "open_storage",
    "prepare_sqlite",
    "report_values",
    "retry_outage",
    "round_heartbeats",
    "set_params_many",
    "set_user_attrs",
    "set_user_attrs_many",
    "should_prune_many",
    "storage_of",
    "study_id_of",
    "tell_trials",
    "trial_id_of",
    "trial_states",
    "with_storage",
]
