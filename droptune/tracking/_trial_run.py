"""What a trial's MLflow run holds, from the trial's record in the Optuna storage: the sampled
params and the rest of the resolved config, the per-epoch history (the trial's value on the last
step, so that sorting runs by it in the UI agrees with ``droptune best``), tags, and the error of
a failed trial."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any

from droptune.records import DEVICE_ATTR
from droptune.records import EPOCHS_ATTR
from droptune.records import FAIL_REASON_ATTR
from droptune.records import HISTORY_ATTR
from droptune.records import METRIC_ATTR
from droptune.records import SEED_ATTR
from droptune.records import TRACEBACK_ATTR
from droptune.records import WORKER_ATTR
from droptune.tracking._client import flatten


if TYPE_CHECKING:
    import optuna

__all__ = ["STALE_REASON", "trial_run_content"]

log = logging.getLogger(__name__)

#: The error shown for a FAIL trial without a recorded reason: Optuna's heartbeat check failed it
#: because its worker stopped beating.
STALE_REASON = (
    "the trial's worker stopped sending heartbeats (killed or lost); failed by the heartbeat "
    "check and retried once"
)


def trial_run_content(
    study: optuna.Study,
    frozen: optuna.trial.FrozenTrial,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``params``, ``history``, ``tags`` and ``error`` of the trial's run (``config``: the
    config it trained, resolved from the study when not given)."""
    params: dict[str, Any] = dict(frozen.params)
    if config is None:
        config = _resolved_config(study, frozen)
    if isinstance(config, dict):
        # the rest of the resolved config; the sampled values are logged once, above
        params.update(
            {f"config.{k}": v for k, v in flatten(config).items() if k not in frozen.params}
        )
    history = list(frozen.user_attrs.get(HISTORY_ATTR) or [])
    if not history and frozen.intermediate_values:
        metric = str(study.user_attrs.get(METRIC_ATTR, "objective"))
        history = [{metric: v} for _, v in sorted(frozen.intermediate_values.items())]
    if frozen.state.name == "COMPLETE" and frozen.values is not None:
        # The trial's value (the best epoch's, not the last one's), so that sorting runs
        # by it in the UI agrees with `droptune best`.
        names = (
            ["objective"]
            if len(frozen.values) == 1
            else [f"objective_{i}" for i in range(len(frozen.values))]
        )
        last = dict(history[-1]) if history else {}
        last.update(zip(names, frozen.values, strict=True))
        history = [*history[:-1], last]
    tags = {
        SEED_ATTR: str(frozen.user_attrs.get(SEED_ATTR, "")),
        DEVICE_ATTR: str(frozen.user_attrs.get(DEVICE_ATTR, "")),
        WORKER_ATTR: str(frozen.user_attrs.get(WORKER_ATTR, "")),
        EPOCHS_ATTR: str(frozen.user_attrs.get(EPOCHS_ATTR, "")),
        "optuna.trial_number": str(frozen.number),
    }
    if frozen.user_attrs.get(TRACEBACK_ATTR):
        tags[TRACEBACK_ATTR] = str(frozen.user_attrs[TRACEBACK_ATTR])[-5000:]
    if frozen.values is not None:
        tags["optuna.values"] = ",".join(f"{v:.6g}" for v in frozen.values)
    error = frozen.user_attrs.get(FAIL_REASON_ATTR) or (
        STALE_REASON if frozen.state.name == "FAIL" else None
    )
    return {"params": params, "history": history, "tags": tags, "error": error}


def _resolved_config(
    study: optuna.Study, frozen: optuna.trial.FrozenTrial
) -> dict[str, Any] | None:
    """The full config the trial trained (spec defaults + its params + its seed), if known."""
    from droptune.export import trial_config

    try:
        return trial_config(study, frozen).to_dict()
    except Exception as exc:  # a study not created by droptune, or params from an old spec
        log.debug("no resolved config for trial %d: %s", frozen.number, exc)
        return None
