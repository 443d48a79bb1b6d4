"""``droptune train``: one model from a config file (an exported best config or a study
spec)."""

from __future__ import annotations

from datetime import datetime
import json
from pathlib import Path
from typing import Annotated
from typing import Any

import typer

from droptune.cli._common import _devices_overrides
from droptune.cli._common import _output_dir
from droptune.cli._common import _quiet_lightning


#: Sections of a study spec that are about tuning, not training; ``train`` ignores them.
SPEC_ONLY_SECTIONS = (
    "study",
    "search",
    "sampler",
    "pruner",
    "storage",
    "tracking",
    "n_trials",
    "timeout",
    "execution",
    "confirm",
    "code_dir",
)


def _load_train_config(path: Path) -> Any:
    from droptune.config import TrainConfig
    from droptune.config import load_yaml_mapping
    from droptune.exceptions import ConfigError

    if not path.is_file():
        from droptune.config import why_not_a_file

        raise ConfigError(f"config file {str(path)!r} {why_not_a_file(path)}")
    data = load_yaml_mapping(path.read_text(), what=str(path))
    fixed = {k: v for k, v in data.items() if k not in SPEC_ONLY_SECTIONS}
    if not fixed:
        raise ConfigError(
            f"{path}: no training section; a config needs at least one of data, model, train, "
            "regularization (an exported best config or a study spec has them)"
        )
    config = TrainConfig.from_dict(fixed)
    from droptune.study.spec import code_folder
    from droptune.study.spec import import_user_code
    from droptune.study.spec import names_user_code

    if names_user_code(config):  # from the environment or the config's folder (its code_dir)
        import_user_code(config, [str(code_folder(path, data.get("code_dir")))])
    return config


def train(
    config: Annotated[
        Path,
        typer.Argument(
            help="A config YAML: an exported best config or a "
            "study spec (its tuning sections are ignored)."
        ),
    ],
    max_epochs: Annotated[
        int | None, typer.Option(min=1, help="Override train.max_epochs.")
    ] = None,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override train.seed.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output directory (default runs/train-<time>).")
    ] = None,
) -> None:
    """Train one model from a config file; print validation and test metrics, save the
    checkpoint and the resolved config."""
    from droptune.exceptions import ConfigError
    from droptune.study.spec import check_data_source

    cfg = _load_train_config(config)
    overrides: dict[str, Any] = _devices_overrides(devices)
    if max_epochs is not None:
        overrides["train.max_epochs"] = max_epochs
    if seed is not None:
        overrides["train.seed"] = seed
    if overrides:
        cfg = cfg.with_overrides(overrides)
    try:  # every check before anything is written
        check_data_source(cfg.data)
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}") from None
    out = _output_dir(output or Path("runs") / f"train-{datetime.now():%Y%m%d-%H%M%S}", "--output")
    from droptune.study.spec import code_folder
    from droptune.study.spec import names_user_code

    saved = cfg.to_yaml()
    if names_user_code(cfg):  # the folder the user code came from, for a re-run from here
        from droptune.config import load_yaml_mapping

        code_dir = load_yaml_mapping(config.read_text(), what=str(config)).get("code_dir")
        saved = f"code_dir: {json.dumps(str(code_folder(config, code_dir)))}\n{saved}"
    (out / "config.yaml").write_text(saved)
    _quiet_lightning()
    from droptune.training import fit

    result = fit(cfg, checkpoint=out / "model.ckpt")
    metrics = dict(sorted(result.metrics.items()))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        if key.startswith(("val_", "test_", "best_")):
            typer.echo(f"{key}: {value:.6g}")
    typer.echo(f"epochs: {result.epochs}{' (early stopped)' if result.stopped_early else ''}")
    typer.echo(f"output: {out}")
