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


#: Colours of trial states in the plots.
STATE_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}


def _short(path: str) -> str:
    """A search path as a plot label: the sections every reader knows left out."""
    from droptune.study.space import short_name

    return short_name(path)


def _plot_value(trial: Any) -> float | None:
    """A trial's value, or for a pruned trial the last value it reported."""
    if trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _scatter_by_kind(
    trials: list[Any],
    params: list[str],
    metric: str,
    path: Path,
    best: Any = None,
    log_x: bool = False,
) -> None:
    """``metric`` against each of ``params``, one colour per dropout kind; pruned trials as
    crosses (their last reported value); for a rate, trials of kind ``none`` (no dropout, so
    no rate) at 0; the best trial circled."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        groups: dict[tuple[str, bool], tuple[list[float], list[float]]] = {}
        for trial in trials:
            value = _plot_value(trial)
            kind = str(trial.params.get(KIND, "fixed kind"))
            if value is None:
                continue
            if param in trial.params:
                x = float(trial.params[param])
            elif kind == "none" and param.endswith("_rate"):
                x = 0.0
            else:
                continue
            xs, ys = groups.setdefault((kind, trial.state.name == "PRUNED"), ([], []))
            xs.append(x)
            ys.append(value)
        colors: dict[str, Any] = {}
        for (kind, pruned), (xs, ys) in sorted(groups.items()):
            color = colors.setdefault(kind, f"C{len(colors)}")
            ax.scatter(
                xs,
                ys,
                color=color,
                marker="x" if pruned else "o",
                alpha=0.8,
                label=f"{kind} (pruned)" if pruned else kind,
            )
        if best is not None and (param in best.params or best.params.get(KIND) == "none"):
            x = float(best.params.get(param, 0.0))
            ax.scatter([x], [best.value], s=220, facecolors="none", edgecolors="black", lw=2)
            ax.annotate(f"best #{best.number}", (x, best.value), textcoords="offset points",
                        xytext=(8, 8), fontsize=8)  # fmt: skip
        ax.set_xlabel(_short(param))
        ax.set_ylabel(metric)
        if log_x:
            ax.set_xscale("log")
        if groups:
            ax.legend(title="dropout kind", fontsize=7)
    _save(fig, path)


def _learning_curves(trials: list[Any], metric: str, path: Path, best: Any = None) -> bool:
    """Every trial's per-epoch ``metric`` (the values it reported to Optuna), coloured by its
    state, the best trial in black; False when no trial reported anything."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    drawn: set[str] = set()
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        if not steps or trial.state.name not in STATE_COLORS:
            continue
        state = trial.state.name
        ax.plot(
            [s + 1 for s in steps],
            [trial.intermediate_values[s] for s in steps],
            color=STATE_COLORS[state],
            alpha=0.5,
            lw=1,
            label=state.lower() if state not in drawn else None,
        )
        drawn.add(state)
    if not drawn:
        plt.close(fig)
        return False
    if best is not None and best.intermediate_values:
        steps = sorted(best.intermediate_values)
        ax.plot([s + 1 for s in steps], [best.intermediate_values[s] for s in steps],
                color="black", lw=2.5, label=f"best (trial {best.number})")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, {len(trials)} trials")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _short_named(study: Any) -> Any:
    """An in-memory copy of ``study`` whose params have short names (Optuna's plots cut long
    axis labels to a few letters: three axes all read ``dr...``)."""
    import optuna

    copy = optuna.create_study(directions=study.directions)
    for trial in study.get_trials(deepcopy=False):
        copy.add_trial(
            optuna.trial.FrozenTrial(
                number=trial.number,
                state=trial.state,
                value=None,
                values=trial.values,
                datetime_start=trial.datetime_start,
                datetime_complete=trial.datetime_complete,
                params={_short(k): v for k, v in trial.params.items()},
                distributions={_short(k): d for k, d in trial.distributions.items()},
                user_attrs={},
                system_attrs={},
                intermediate_values=dict(trial.intermediate_values),
                trial_id=trial.number,
            )
        )
    return copy


def _readable_parallel(study: Any, plot: Any) -> Any:
    """Optuna's parallel-coordinates plot with short, rotated axis labels."""
    ax = plot(_short_named(study))
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return ax


def _importances(study: Any, plot: Any, count: int) -> Any:
    """Optuna's importance plot, its title saying how many trials it rests on."""
    ax = plot(study)
    note = "" if count >= 20 else " (under 20 the ranking is mostly noise)"
    ax.set_title(f"Importances from {count} complete trials{note}", loc="left", fontsize=11)
    return ax


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
    every = study.get_trials(deepcopy=False)
    complete = [t for t in every if t.state == optuna.trial.TrialState.COMPLETE]
    single = len(study.directions) == 1
    metric = str(study.user_attrs.get(METRIC_ATTR, "objective"))
    searched = sorted({n for t in every for n in t.params})
    rates = [
        n for n in searched if n.startswith("regularization.dropout.") and n.endswith("_rate")
    ]
    plots: list[tuple[str, Any]] = []
    if single:
        plots += [
            ("optimization_history.png", lambda: ovm.plot_optimization_history(study)),
            (
                "param_importances.png",
                lambda: _importances(
                    _short_named(study), ovm.plot_param_importances, len(complete)
                ),
            ),
            (
                "parallel_coordinates.png",
                lambda: _readable_parallel(study, ovm.plot_parallel_coordinate),
            ),
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
    ended = [t for t in every if t.state.name in ("COMPLETE", "PRUNED")]
    best = min(complete, key=lambda t: float(t.value or 0.0), default=None) if single else None
    if best is not None and study.direction == optuna.study.StudyDirection.MAXIMIZE:
        best = max(complete, key=lambda t: float(t.value or 0.0))
    if single and _learning_curves(every, metric, folder / "learning_curves.png", best):
        written.append(folder / "learning_curves.png")
    if single and rates:
        _scatter_by_kind(ended, rates, metric, folder / "metric_vs_dropout_rate.png", best)
        written.append(folder / "metric_vs_dropout_rate.png")
    if single and L2 in searched:
        _scatter_by_kind(
            ended, [L2], metric, folder / "metric_vs_l2_strength.png", best, log_x=True
        )
        written.append(folder / "metric_vs_l2_strength.png")
    others = [n for n in searched if n not in rates and n not in (L2, KIND)]
    numeric = [n for n in others if all(isinstance(t.params.get(n, 0.0), int | float)
                                        for t in ended)]  # fmt: skip
    if single and numeric:
        _scatter_by_kind(ended, numeric, metric, folder / "metric_vs_other_params.png", best)
        written.append(folder / "metric_vs_other_params.png")
    if _interactive(study, folder / "interactive.html", single):
        written.append(folder / "interactive.html")
    try:
        cfg = trial_config(study, best_trial(study))
        (folder / "best_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        written.append(folder / "best_config.yaml")
    except Exception as exc:
        log.info("no best config yet: %s", exc)
    _summary(study, folder)
    written += [folder / "summary.csv", folder / "summary.md"]
    return written


def _interactive(study: optuna.Study, path: Path, single: bool) -> bool:
    """Optuna's plotly figures of the study in one self-contained HTML page (plotly.js inlined
    once: the page works offline and in MLflow's artifact viewer): history, importances,
    parallel coordinates, slices and learning curves (or the Pareto front). Parameter names are
    shortened as in the PNGs. False when there is nothing to draw yet."""
    from optuna import visualization as vis
    import plotly.io as pio

    short = _short_named(study)
    figures: list[tuple[str, Any]] = []
    if single:
        figures = [
            ("Optimization history", lambda: vis.plot_optimization_history(short)),
            ("Parameter importances", lambda: vis.plot_param_importances(short)),
            ("Parallel coordinates", lambda: vis.plot_parallel_coordinate(short)),
            ("Slices: the objective against each parameter", lambda: vis.plot_slice(short)),
            ("Learning curves (intermediate values)", lambda: vis.plot_intermediate_values(short)),
        ]
    else:
        figures = [("Pareto front", lambda: vis.plot_pareto_front(short))]
    parts: list[str] = []
    for title, make in figures:
        try:
            figure = make()
        except Exception as exc:  # too few trials, one parameter, ...
            log.info("skipped the interactive %s: %s", title, exc)
            continue
        figure.update_layout(title=title)
        parts.append(pio.to_html(figure, full_html=False, include_plotlyjs=not parts))
    if not parts:
        return False
    name = study.study_name.replace("<", "&lt;").replace(">", "&gt;").replace("&", "&amp;")
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{name}</title></head>"
        f"<body><h2>droptune study {name}</h2>" + "\n".join(parts) + "</body></html>",
        encoding="utf-8",
    )
    return True


def upload_study_artifacts(study: optuna.Study, client: Any, parent_run_id: str) -> list[str]:
    """Write the artifacts to a temporary folder and log them on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_study_artifacts(study, Path(tmp))
        for path in paths:
            client.log_artifact(parent_run_id, str(path))
        return [p.name for p in paths]


def study_metrics(study: optuna.Study, trials: list[Any]) -> tuple[dict[str, float], Any]:
    """The study run's metrics — trial counts by state and ``best_<metric>`` (one objective) —
    with the best trial (None without one); ``trials`` are the study's."""
    metrics = {
        f"trials_{state.lower()}": float(sum(t.state.name == state for t in trials))
        for state in ("COMPLETE", "PRUNED", "FAIL")
    }
    metric = str(study.user_attrs.get(METRIC_ATTR, "objective"))
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:
            return metrics, None
        metrics[f"best_{metric}"] = float(best.value)  # type: ignore[arg-type]
        return metrics, best
    return metrics, None
