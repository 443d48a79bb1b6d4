"""Study artifacts on the parent run: the pictures that explain a study, its best config and a
summary table. PNG (the MLflow UI shows them inline), Markdown and CSV.

* ``optimization_history.png`` — Optuna's history plot;
* ``param_importances.png`` — fANOVA importances of the regularization parameters;
* ``parallel_coordinates.png`` — every trial across the searched parameters;
* ``metric_vs_dropout_rate.png`` — the metric against each searched dropout rate, one colour per
  dropout kind;
* ``metric_vs_l2_strength.png`` — the metric against the L2 strength (log axis);
* ``best_config.yaml`` — the best trial's full training config (``droptune train`` accepts it);
* ``summary.md`` / ``summary.csv`` — one row per trial: number, state, value(s), params.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
import tempfile
from typing import TYPE_CHECKING
from typing import Any

from droptune.records import METRIC_ATTR


if TYPE_CHECKING:
    import optuna

__all__ = ["write_study_artifacts"]

log = logging.getLogger(__name__)

KIND = "regularization.dropout.kind"
L2 = "regularization.l2.strength"


def _save(fig_or_ax: Any, path: Path) -> None:
    figure = getattr(fig_or_ax, "figure", fig_or_ax)
    if hasattr(figure, "get_figure") and figure.get_figure() is not None:
        figure = figure.get_figure()
    figure.set_size_inches(9, 5.5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)


def _scatter_by_kind(
    trials: list[Any], params: list[str], metric: str, path: Path, log_x: bool = False
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        groups: dict[str, tuple[list[float], list[float]]] = {}
        for trial in trials:
            if param not in trial.params or trial.value is None:
                continue
            kind = str(trial.params.get(KIND, "fixed kind"))
            xs, ys = groups.setdefault(kind, ([], []))
            xs.append(float(trial.params[param]))
            ys.append(float(trial.value))
        for kind, (xs, ys) in sorted(groups.items()):
            ax.scatter(xs, ys, label=kind, alpha=0.8)
        ax.set_xlabel(param.removeprefix("regularization."))
        ax.set_ylabel(metric)
        if log_x:
            ax.set_xscale("log")
        if groups:
            ax.legend(title="dropout kind", fontsize=8)
    _save(fig, path)


def _summary(study: optuna.Study, folder: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    header = ["number", "state", "values", *names]
    rows = [
        [
            t.number,
            t.state.name,
            "" if t.values is None else ";".join(f"{v:.6g}" for v in t.values),
            *[t.params.get(n, "") for n in names],
        ]
        for t in trials
    ]
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    out = io.StringIO()
    out.write(f"# Study {study.study_name}\n\n")
    out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for row in rows:
        cells = [f"{c:.4g}" if isinstance(c, float) else str(c) for c in row]
        out.write("| " + " | ".join(cells) + " |\n")
    (folder / "summary.md").write_text(out.getvalue())


def write_study_artifacts(study: optuna.Study, folder: Path) -> list[Path]:
    """Write every artifact that can be made from the study's trials into ``folder``.

    A plot that cannot be drawn yet (e.g. importances with fewer than two completed trials) is
    skipped with a log line; the rest are still written. Optuna's and matplotlib's warnings
    about small studies (equal importances, a flat axis) are not shown: they would end every
    short ``run`` with a screen of them.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _write_study_artifacts(study, folder)


def _write_study_artifacts(study: optuna.Study, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm
    import yaml

    from droptune.export import best_trial
    from droptune.export import trial_config

    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    complete = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    single = len(study.directions) == 1
    metric = str(study.user_attrs.get(METRIC_ATTR, "objective"))
    searched = sorted({n for t in complete for n in t.params})
    rates = [
        n for n in searched if n.startswith("regularization.dropout.") and n.endswith("_rate")
    ]
    plots: list[tuple[str, Any]] = []
    if single:
        plots += [
            ("optimization_history.png", lambda: ovm.plot_optimization_history(study)),
            ("param_importances.png", lambda: ovm.plot_param_importances(study)),
            ("parallel_coordinates.png", lambda: ovm.plot_parallel_coordinate(study)),
        ]
    else:
        plots.append(("pareto_front.png", lambda: ovm.plot_pareto_front(study)))
    written: list[Path] = []
    for name, make in plots:
        try:
            _save(make(), folder / name)
            written.append(folder / name)
        except Exception as exc:
            log.info("skipped %s: %s", name, exc)
    if single and rates:
        _scatter_by_kind(complete, rates, metric, folder / "metric_vs_dropout_rate.png")
        written.append(folder / "metric_vs_dropout_rate.png")
    if single and L2 in searched:
        _scatter_by_kind(complete, [L2], metric, folder / "metric_vs_l2_strength.png", log_x=True)
        written.append(folder / "metric_vs_l2_strength.png")
    try:
        cfg = trial_config(study, best_trial(study))
        (folder / "best_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        written.append(folder / "best_config.yaml")
    except Exception as exc:
        log.info("no best config yet: %s", exc)
    _summary(study, folder)
    written += [folder / "summary.csv", folder / "summary.md"]
    return written


def upload_study_artifacts(study: optuna.Study, client: Any, parent_run_id: str) -> list[str]:
    """Write the artifacts to a temporary folder and log them on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_study_artifacts(study, Path(tmp))
        for path in paths:
            client.log_artifact(parent_run_id, str(path))
        return [p.name for p in paths]
