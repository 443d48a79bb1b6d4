"""The ``droptune`` command line.

Results go to stdout, status to stderr through logging. Exit codes: 0 success, 2 bad usage or a
bad config/spec (a :class:`~droptune.exceptions.DroptuneError` before anything ran), 1 a runtime
failure.

The commands live in modules by concept (``_train``, ``_study``, ``_results``, ``_tracking``,
with what they share in ``_common``); this module holds the app, registers them on it in the
order ``droptune --help`` lists them, and maps failures to exit codes (:func:`main`).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from droptune.cli._common import _mask
from droptune.cli._results import best
from droptune.cli._results import confirm
from droptune.cli._results import export
from droptune.cli._study import run
from droptune.cli._study import status
from droptune.cli._study import studies
from droptune.cli._study import worker
from droptune.cli._tracking import report
from droptune.cli._tracking import sync
from droptune.cli._tracking import ui

# re-exported: tests/test_cli_train.py and bench/regularization_gain.py import them from here
from droptune.cli._train import SPEC_ONLY_SECTIONS as SPEC_ONLY_SECTIONS
from droptune.cli._train import _load_train_config as _load_train_config
from droptune.cli._train import train
from droptune.exceptions import DroptuneError


__all__ = ["app", "main"]

app = typer.Typer(
    name="droptune",
    help="Tune the regularization of PyTorch Lightning models with Optuna and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    """The commands, in the order ``droptune --help`` lists them."""
    for command in (train, run, worker, status, studies, best, confirm, export, sync, report, ui):
        app.command()(command)


_register_commands()


def _register_stack() -> None:
    from droptune.stack import stack_app

    app.add_typer(stack_app, name="stack")


_register_stack()


def _version(value: bool) -> None:
    if value:
        import droptune

        typer.echo(f"droptune {droptune.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Full logs, and a traceback when a command fails."),
    ] = False,
) -> None:
    from droptune.storage import MaskingFilter

    global _VERBOSE
    _VERBOSE = verbose
    import os

    # no usage reports from MLflow's client (an offline host would wait for them at exit)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not verbose:  # Optuna's INFO lines ("Using an existing study ...") only with -v
        import os

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # MLflow's ("Creating initial MLflow database tables ...") too, here and in the
        # workers, which inherit the environment; a level the user set is kept
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # URL passwords never reach a log line
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())


#: Set by ``-v/--verbose``: unexpected failures then log their traceback.
_VERBOSE = False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map DroptuneError to exit 2, Ctrl-C to 130 and other failures to exit 1."""
    try:
        # Without standalone mode, click returns the code of a `typer.Exit(code)` instead of
        # raising SystemExit: it is the command's exit code.
        code = app(args=argv, standalone_mode=False)
    except DroptuneError as exc:
        typer.echo(f"error: {_mask(str(exc))}", err=True)
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        # typer vendors click; its UsageError/BadParameter carry exit_code 2 and show().
        message = getattr(exc, "format_message", None)
        if callable(message) and isinstance(getattr(exc, "exit_code", None), int):
            # click's usage errors: one line (its usage banner and hint only with -v)
            if _VERBOSE and callable(getattr(exc, "show", None)):
                exc.show()  # type: ignore[attr-defined]
            else:
                text = " ".join(str(message()).split())
                command = getattr(getattr(exc, "ctx", None), "command_path", "droptune")
                if text:  # (no text: click showed the help, e.g. a group without a command)
                    typer.echo(f"error: {text} (see {command} --help)", err=True)
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":
            # click turns Ctrl-C (KeyboardInterrupt) into Abort.
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                typer.echo("interrupted", err=True)
                return 130
            return 1
        if _VERBOSE:
            logging.getLogger("droptune").exception("droptune failed")
        first = (str(exc).splitlines() or [""])[0][:500]
        hint = "" if _VERBOSE else " (droptune -v ... shows the traceback)"
        typer.echo(f"error: {type(exc).__name__}: {_mask(first)}{hint}", err=True)
        return 1
    return code if isinstance(code, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
