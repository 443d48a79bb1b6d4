"""A study's result: ``best`` and ``export`` (the best trial's training config) and
``confirm`` (re-train the top configs with several seeds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from droptune.cli._common import StorageOpt
from droptune.cli._common import StudyArg
from droptune.cli._common import StudyOpt
from droptune.cli._common import StudyPos
from droptune.cli._common import TrackingOpt
from droptune.cli._common import _check_format
from droptune.cli._common import _check_tracking_uri
from droptune.cli._common import _devices_overrides
from droptune.cli._common import _one_study
from droptune.cli._common import _quiet_lightning
from droptune.cli._common import _study_storage
from droptune.cli._common import _write_output
from droptune.records import SPEC_ATTR


def _best_config_text(storage: str | None, study: str, fmt: str) -> tuple[str, str]:
    from droptune.export import best_trial
    from droptune.export import load_study
    from droptune.export import trial_config
    from droptune.study.confirm import confirmation_of

    opened = load_study(study, _study_storage(storage, study))
    chosen = best_trial(opened)
    confirmed = confirmation_of(opened)
    if confirmed is not None and confirmed.best_trial == chosen.number:
        best = confirmed.best
        note = (
            f"trial {chosen.number}: the confirmed best ({confirmed.metric} {best.mean:.5g} "
            f"mean over {len(best.values)} seeds; `droptune confirm` chose it from the top "
            f"{len(confirmed.candidates)})"
        )
    else:
        note = f"trial {chosen.number}: the best value, not confirmed"
    cfg = trial_config(opened, chosen)
    data = cfg.to_dict()
    code_dir = (opened.user_attrs.get(SPEC_ATTR) or {}).get("code_dir")
    if code_dir:  # where the study imported the user's model or DataModule from
        data = {"code_dir": code_dir, **data}
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n", note
    return (f"code_dir: {json.dumps(code_dir)}\n" if code_dir else "") + cfg.to_yaml(), note


def best(
    study_arg: StudyPos = None,
    storage: StorageOpt = None,
    format_: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    study_opt: StudyOpt = None,
) -> None:
    """Print the best trial's full training config (accepted by `droptune train`)."""
    study = _one_study(study_arg, study_opt)
    assert study is not None
    text, note = _best_config_text(storage, study, _check_format(format_))
    typer.echo(note, err=True)
    typer.echo(text, nl=False)


def confirm(
    study: StudyArg,
    storage: StorageOpt = None,
    top_k: Annotated[int, typer.Option(help="How many of the best trials to re-train.")] = 5,
    seeds: Annotated[int, typer.Option(help="Seeds per config (2 or more for a CI).")] = 5,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Re-train the study's top configs with several seeds; the best mean becomes the
    study's confirmed best (used by best, export and load_best)."""
    from droptune.exceptions import SpecError
    from droptune.export import load_study
    from droptune.study.confirm import confirm_study

    if top_k < 1 or seeds < 1:  # before anything is opened or written
        raise SpecError(
            f"--{'top-k' if top_k < 1 else 'seeds'}: must be >= 1, got "
            f"{top_k if top_k < 1 else seeds}"
        )
    url = _study_storage(storage, study)
    opened = load_study(study, url)
    tracking = None
    recorded = opened.user_attrs.get(SPEC_ATTR) or {}
    if tracking_uri or (recorded.get("tracking") or {}).get("enabled", True):
        from droptune.tracking import StudyTracking

        if tracking_uri:
            _check_tracking_uri(tracking_uri)
        tracking = StudyTracking.for_study(opened, url, tracking_uri)
        tracking.enabled = True
    _quiet_lightning()
    result = confirm_study(
        opened, top_k, seeds, tracking=tracking, device_overrides=_devices_overrides(devices)
    )
    for line in result.lines():
        typer.echo(line)


def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    study_arg: StudyPos = None,
    storage: StorageOpt = None,
    format_: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    study_opt: StudyOpt = None,
) -> None:
    """Write the best trial's full training config to a file."""
    study = _one_study(study_arg, study_opt)
    assert study is not None
    text, note = _best_config_text(storage, study, _check_format(format_))
    _write_output(output, text, "--output")
    typer.echo(note, err=True)
    typer.echo(f"wrote {output}")
