"""The ``droptune`` command line.

Results go to stdout, status to stderr through logging. Exit codes: 0 success, 2 bad usage or a
bad config/spec (a :class:`~droptune.exceptions.DroptuneError` before anything ran), 1 a runtime
failure.
"""

from __future__ import annotations

from datetime import datetime
import json
import logging
from pathlib import Path
import sys
from typing import Annotated
from typing import Any

import typer

from droptune.exceptions import DroptuneError


__all__ = ["app", "main"]

app = typer.Typer(
    name="droptune",
    help="Tune the regularization of PyTorch Lightning models with Optuna and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Sections of a study spec that are about tuning, not training; ``train`` ignores them.
SPEC_ONLY_SECTIONS = ("study", "search", "sampler", "pruner", "storage", "tracking", "n_trials",
                      "timeout", "execution")

log = logging.getLogger("droptune")


def _quiet_lightning() -> None:
    """Lightning sets its own loggers to INFO when imported: import it first, then quiet it."""
    import warnings

    import pytorch_lightning  # noqa: F401

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _devices_overrides(devices: str | None) -> dict[str, Any]:
    """``auto`` | ``cpu`` | ``0,1`` → TrainSettings overrides."""
    if devices is None:
        return {}
    if devices == "auto":
        return {"train.accelerator": "auto", "train.devices": "auto"}
    if devices == "cpu":
        return {"train.accelerator": "cpu", "train.devices": 1}
    try:
        ids = [int(part) for part in devices.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"must be auto, cpu or GPU ids like 0,1; got {devices!r}",
                                 param_hint="--devices") from None
    if not ids:
        raise typer.BadParameter("no GPU ids given", param_hint="--devices")
    return {"train.accelerator": "gpu", "train.devices": ids}


def _load_train_config(path: Path) -> Any:
    from droptune.config import TrainConfig
    from droptune.config import load_yaml_mapping
    from droptune.exceptions import ConfigError

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = load_yaml_mapping(path.read_text(), what=str(path))
    fixed = {k: v for k, v in data.items() if k not in SPEC_ONLY_SECTIONS}
    return TrainConfig.from_dict(fixed)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="A config YAML: an exported best config or a "
                                           "study spec (its tuning sections are ignored).")],
    max_epochs: Annotated[int | None, typer.Option(min=1, help="Override train.max_epochs.")] = None,
    devices: Annotated[str | None, typer.Option(help="auto, cpu, or GPU ids like 0,1.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override train.seed.")] = None,
    output: Annotated[Path | None, typer.Option(help="Output directory (default "
                                                "runs/train-<time>).")] = None,
) -> None:
    """Train one model from a config file; print validation and test metrics, save the
    checkpoint and the resolved config."""
    cfg = _load_train_config(config)
    overrides: dict[str, Any] = _devices_overrides(devices)
    if max_epochs is not None:
        overrides["train.max_epochs"] = max_epochs
    if seed is not None:
        overrides["train.seed"] = seed
    if overrides:
        cfg = cfg.with_overrides(overrides)
    out = output or Path("runs") / f"train-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
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


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map DroptuneError to exit 2 and other failures to exit 1."""
    try:
        app(args=argv, standalone_mode=False)
    except DroptuneError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        # typer vendors click; its UsageError/BadParameter carry exit_code 2 and show().
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":
            return 1
        logging.getLogger("droptune").exception("droptune failed")
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
