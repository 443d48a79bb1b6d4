"""Does tuning pay? Test accuracy of tuned regularization against the spec's hand-picked default.

For each study spec (MNIST-1D MLP, CNN and GRU, digits MLP), in one run on the CPU:

1. **tune**: the spec's study with droptune (population mode, 2 workers, the baseline trial
   first, no pruning so that every trial's full learning curve is kept for step 4);
2. **confirm**: its top 3 configs re-trained with 3 seeds each, the best mean chosen;
3. **naive**: Optuna + Lightning one trial at a time (the same search space, model and TPE
   sampler, ``study.optimize`` with a timeout) for the same wall-clock time as 1 + 2;
4. **pruning replay**: each candidate pruner replayed over the tuned study's recorded curves
   in trial order: the epochs it would have trained, and whether it would have pruned the
   confirmed best;
5. **evaluate**: every arm's config trained with the same 5 new seeds, test accuracy of the
   final weights (as ``droptune train`` reports it): no regularization, the spec default,
   tuned (best trial), tuned + confirmed, naive; and the source article's comparisons (CNN
   ``spatial`` vs ``standard``, GRU ``variational`` vs ``standard``, MLP L2 vs dropout vs early
   stopping alone).

It prints and writes a markdown table (mean ± 95% t interval over seeds, and the paired
difference confirmed − default over the same seeds), a PNG of the means with their intervals
and the raw numbers as JSON.

Run: python bench/evidence.py [--out docs/evidence] [--families mnist1d-mlp,...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time
from typing import Any
import warnings

import yaml


ROOT = Path(__file__).resolve().parents[1]

#: Trials and population size of each study: sized so that the whole run fits in about an
#: hour on a 2-core machine.
FAMILIES: dict[str, dict[str, Any]] = {
    "mnist1d-mlp": {"spec": "studies/mnist1d-mlp.yaml", "trials": 48, "population": 12},
    "mnist1d-cnn": {"spec": "studies/mnist1d-cnn.yaml", "trials": 32, "population": 8},
    "mnist1d-gru": {"spec": "studies/mnist1d-gru.yaml", "trials": 16, "population": 4},
    "digits-mlp": {"spec": "studies/digits-mlp.yaml", "trials": 32, "population": 8},
}
#: MNIST-1D paper's test accuracies (4,000 training samples).
PUBLISHED = {"mnist1d-mlp": 0.68, "mnist1d-cnn": 0.94, "mnist1d-gru": 0.91}
EVAL_SEEDS = 5
#: Most members trained together when evaluating (bounds memory).
MAX_POPULATION = 40
TOP_K, CONFIRM_SEEDS = 3, 3

#: Pruners replayed over the recorded curves: (label, spec pruner section).
PRUNERS: list[tuple[str, dict[str, Any]]] = [
    (
        "median, warm-up 2 (old default)",
        {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 2},
    ),
    ("median, warm-up 10", {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 10}),
    (
        "median, warm-up 1/3 of max epochs",
        {"name": "median", "n_startup_trials": 5, "warmup_fraction": 1 / 3},
    ),
    ("ASHA, min 5 epochs, factor 3", {"name": "asha", "min_resource": 5, "reduction_factor": 3}),
    ("ASHA, min 10 epochs, factor 3", {"name": "asha", "min_resource": 10, "reduction_factor": 3}),
]

log = logging.getLogger("evidence")


# ----------------------------------------------------------------------------------------------
# Statistics


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval."""
    from scipy.stats import t

    clean = [v for v in values if math.isfinite(v)]
    if len(clean) < 2:
        return (clean[0] if clean else math.nan), math.nan
    sem = statistics.stdev(clean) / math.sqrt(len(clean))
    return statistics.fmean(clean), float(t.ppf(0.975, len(clean) - 1) * sem)


def fmt(values: list[float]) -> str:
    mean, ci = mean_ci(values)
    return f"{mean:.3f} ± {ci:.3f}"


# ----------------------------------------------------------------------------------------------
# Training many configs: populations where they can train together, else one at a time.


def test_accuracies(configs: list[Any]) -> list[float]:
    """Test accuracy of each config's final weights (``droptune train``'s ``test_acc``).

    Identical configs (an arm that equals another, such as the GRU spec default and "GRU
    variational dropout", with the same seed) are trained once."""
    keys = [json.dumps(config.to_dict(), sort_keys=True, default=str) for config in configs]
    unique = list(dict.fromkeys(keys))
    accs = dict(
        zip(unique, _train_and_test([configs[keys.index(k)] for k in unique]), strict=True)
    )
    return [accs[k] for k in keys]


def _train_and_test(configs: list[Any]) -> list[float]:
    import torch

    from droptune.models import build_network
    from droptune.population import population_support
    from droptune.population import train_population
    from droptune.training import build_datamodule
    from droptune.training import fit

    out: list[float] = [math.nan] * len(configs)
    groups: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config.regularization.dropout.kind, []).append(index)
    chunks = [
        indices[start : start + MAX_POPULATION]
        for indices in groups.values()
        for start in range(0, len(indices), MAX_POPULATION)
    ]
    for indices in chunks:
        members = [configs[i] for i in indices]
        if len(members) > 1 and population_support(members) is None:
            data = build_datamodule(members[0])
            data.setup("fit")
            results = train_population(members, datamodule=data, return_weights=True)
            x, y = data.splits["test"]
            for i, result in zip(indices, results, strict=True):
                net = build_network(configs[i], data.info)
                assert result.state_dict is not None
                net.load_state_dict(result.state_dict)
                net.eval()
                with torch.no_grad():
                    logits = net(x.cpu())
                out[i] = float((logits.argmax(-1) == y.cpu()).float().mean())
        else:
            for i in indices:
                out[i] = float(fit(configs[i], test=True).metrics["test_acc"])
    return out


def seeded(config: Any, seeds: list[int]) -> list[Any]:
    return [config.with_overrides({"train.seed": s}) for s in seeds]


# ----------------------------------------------------------------------------------------------
# The arms


def tune(name: str, spec_path: Path, work: Path, trials: int, population: int) -> dict[str, Any]:
    """Run the study with droptune (no pruning), then confirm its top configs."""
    from droptune.study.confirm import confirm_study
    from droptune.study.runner import run_study
    from droptune.study.spec import load_spec

    raw = yaml.safe_load(spec_path.read_text())
    raw["storage"] = f"sqlite:///{work / name / 'droptune.db'}"
    raw["tracking"] = {"enabled": False}
    raw["pruner"] = {"name": "none"}
    raw["n_trials"] = trials
    raw["execution"] = {**(raw.get("execution") or {}), "workers": 2, "population": population}
    raw.pop("confirm", None)
    path = work / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(path)
    started = time.perf_counter()
    summary = run_study(spec, path, progress=False)
    tune_s = time.perf_counter() - started
    if not summary.finished:
        raise RuntimeError(f"{name}: the study did not finish: {summary.counts}")
    from droptune.export import load_study

    study = load_study(spec.study.name, raw["storage"])
    started = time.perf_counter()
    confirmed = confirm_study(study, TOP_K, CONFIRM_SEEDS)
    confirm_s = time.perf_counter() - started
    return {
        "spec": spec,
        "study": study,
        "confirmation": confirmed,
        "tune_s": tune_s,
        "confirm_s": confirm_s,
    }


def naive(spec: Any, budget_s: float) -> dict[str, Any]:
    """Optuna + Lightning, one trial at a time, for ``budget_s`` seconds: the same search
    space, model code and sampler; the value is the best validation loss over epochs."""
    import optuna
    import torch

    from droptune.study.objective import _History
    from droptune.study.space import suggest
    from droptune.training import fit

    torch.set_num_threads(2)
    base = spec.base.with_overrides({"train.num_threads": 2})
    metric = spec.study.objectives[0]

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec, base)
        history = _History()
        fit(
            base.with_overrides({**params, "train.seed": trial.number}),
            test=False,
            callbacks=[history],
        )
        values = [row[metric] for row in history.rows if math.isfinite(row.get(metric, math.nan))]
        return min(values) if values else math.inf

    study = optuna.create_study(
        direction=spec.study.study_directions[0], sampler=optuna.samplers.TPESampler(seed=0)
    )
    started = time.perf_counter()
    study.optimize(objective, timeout=budget_s)
    best = study.best_trial
    return {
        "config": base.with_overrides(
            {**best.params, "train.num_threads": spec.base.train.num_threads}
        ),
        "trials": len(study.trials),
        "wall_s": time.perf_counter() - started,
    }


def replay(study: Any, spec: Any, confirmed_best: int) -> list[dict[str, Any]]:
    """Each candidate pruner over the study's recorded curves, in trial order."""
    import optuna
    from optuna.trial import TrialState

    from droptune.study.factories import make_pruner
    from droptune.study.spec import spec_from_dict

    metric = spec.study.objectives[0]
    direction = spec.study.study_directions[0]
    finished = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number
    )
    curves = {
        t.number: [
            row[metric] for row in t.user_attrs.get("droptune.history", []) if metric in row
        ]
        for t in finished
    }
    full = sum(len(c) for c in curves.values())
    best_full = (min if direction == "minimize" else max)(t.value for t in finished)
    rows = []
    for label, section in PRUNERS:
        section = dict(section)
        fraction = section.pop("warmup_fraction", None)
        if fraction is not None:
            section["n_warmup_steps"] = int(spec.base.train.max_epochs * fraction)
        pruner = make_pruner(spec_from_dict({**spec.to_dict(), "pruner": section}))
        sim = optuna.create_study(direction=direction, pruner=pruner)
        used, pruned, survivors = 0, set(), []
        for trial in finished:
            live = sim.ask()
            curve = curves[trial.number]
            stopped = False
            for epoch, value in enumerate(curve):
                live.report(value, epoch)
                used += 1
                if live.should_prune():
                    sim.tell(live, state=TrialState.PRUNED)
                    pruned.add(trial.number)
                    stopped = True
                    break
            if not stopped:
                sim.tell(live, trial.value)
                survivors.append(trial.value)
        best_kept = (min if direction == "minimize" else max)(survivors)
        rows.append(
            {
                "pruner": label,
                "epochs_fraction": used / full,
                "speedup": full / used,
                "pruned": len(pruned),
                "trials": len(finished),
                "confirmed_best_pruned": confirmed_best in pruned,
                "best_kept": best_kept,
                "best_full": best_full,
            }
        )
    return rows


def no_regularization(config: Any) -> Any:
    return config.with_overrides(
        {
            "regularization.dropout.kind": "none",
            "regularization.l2.strength": 0.0,
            "regularization.max_norm": None,
            "regularization.early_stopping.patience": None,
        }
    )


def article(name: str, base: Any) -> dict[str, Any]:
    """The source article's comparisons on this family (configs by label), or {}."""
    if name == "mnist1d-cnn":
        return {
            "CNN spatial dropout": base.with_overrides({"regularization.dropout.kind": "spatial"}),
            "CNN standard dropout": base.with_overrides(
                {"regularization.dropout.kind": "standard"}
            ),
        }
    if name == "mnist1d-gru":
        return {
            "GRU variational dropout": base.with_overrides(
                {"regularization.dropout.kind": "variational"}
            ),
            "GRU standard (naive) dropout": base.with_overrides(
                {"regularization.dropout.kind": "standard"}
            ),
        }
    if name == "mnist1d-mlp":
        plain = no_regularization(base)
        reg = base.regularization
        return {
            "MLP L2 alone": plain.with_overrides({"regularization.l2.strength": reg.l2.strength}),
            "MLP dropout alone": plain.with_overrides(
                {
                    "regularization.dropout.kind": reg.dropout.kind,
                    "regularization.dropout.input_rate": reg.dropout.input_rate,
                    "regularization.dropout.hidden_rate": reg.dropout.hidden_rate,
                }
            ),
            "MLP early stopping alone": plain.with_overrides(
                {"regularization.early_stopping.patience": reg.early_stopping.patience}
            ),
        }
    return {}


# ----------------------------------------------------------------------------------------------


def run_family(name: str, info: dict[str, Any], work: Path, quick: bool) -> dict[str, Any]:
    from droptune.export import best_trial
    from droptune.export import trial_config
    from droptune.study.objective import trial_seed

    trials = 8 if quick else info["trials"]
    started = time.perf_counter()
    tuned = tune(name, ROOT / info["spec"], work, trials, info["population"])
    spec, study, confirmed = tuned["spec"], tuned["study"], tuned["confirmation"]
    log.info("%s: tuned in %.0f s, confirmed in %.0f s", name, tuned["tune_s"], tuned["confirm_s"])
    naive_run = naive(spec, tuned["tune_s"] + tuned["confirm_s"])
    log.info("%s: naive ran %d trials in %.0f s", name, naive_run["trials"], naive_run["wall_s"])
    by_value = min if spec.study.study_directions[0] == "minimize" else max
    top = by_value(
        (t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
        key=lambda t: t.value,
    )
    arms = {
        "no regularization": no_regularization(spec.base),
        "spec default": spec.base,
        "tuned (best trial)": trial_config(study, top),
        "tuned + confirmed": trial_config(study, best_trial(study)),
        "naive Optuna + Lightning": naive_run["config"],
        **article(name, spec.base),
    }
    seeds = [trial_seed(spec.study.seed, 2_000_000 + i) for i in range(2 if quick else EVAL_SEEDS)]
    configs = [c for config in arms.values() for c in seeded(config, seeds)]
    accs = test_accuracies(configs)
    results = {label: accs[i * len(seeds) : (i + 1) * len(seeds)] for i, label in enumerate(arms)}
    diff = [
        c - d for c, d in zip(results["tuned + confirmed"], results["spec default"], strict=True)
    ]
    return {
        "name": name,
        "trials": trials,
        "tune_s": tuned["tune_s"],
        "confirm_s": tuned["confirm_s"],
        "naive_trials": naive_run["trials"],
        "baseline_trial_value": next(
            (
                t.value
                for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("droptune.baseline")
            ),
            None,
        ),
        "tuned_trial": top.number,
        "confirmed_trial": confirmed.best_trial,
        "confirmed_params": next(
            t.params for t in study.trials if t.number == confirmed.best_trial
        ),
        "test_acc": results,
        "paired_diff": diff,
        "pruning": replay(study, spec, confirmed.best_trial),
        "wall_s": time.perf_counter() - started,
    }


def markdown(families: list[dict[str, Any]]) -> str:
    lines = [
        "| study | arm | test accuracy (mean ± 95% CI) |",
        "|---|---|---|",
    ]
    for fam in families:
        for label, values in fam["test_acc"].items():
            lines.append(f"| {fam['name']} | {label} | {fmt(values)} |")
        mean, ci = mean_ci(fam["paired_diff"])
        excl = "excludes 0" if math.isfinite(ci) and abs(mean) > ci else "includes 0"
        lines.append(
            f"| {fam['name']} | **tuned + confirmed − default (paired)** | "
            f"**{mean:+.3f} ± {ci:.3f}** ({excl}) |"
        )
    lines += [
        "",
        "| study | trials | tune s | confirm s | naive trials (same wall clock) | published |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fam in families:
        pub = PUBLISHED.get(fam["name"])
        lines.append(
            f"| {fam['name']} | {fam['trials']} | {fam['tune_s']:.0f} | {fam['confirm_s']:.0f} | "
            f"{fam['naive_trials']} | {'' if pub is None else f'{pub:.2f}'} |"
        )
    lines += [
        "",
        "| study | pruner (replayed) | epochs trained | speed-up | pruned "
        "| confirmed best pruned | best kept / best |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for fam in families:
        for row in fam["pruning"]:
            lines.append(
                f"| {fam['name']} | {row['pruner']} | {row['epochs_fraction']:.0%} | "
                f"{row['speedup']:.2f}x | {row['pruned']}/{row['trials']} | "
                f"{'yes' if row['confirmed_best_pruned'] else 'no'} | "
                f"{row['best_kept']:.4f} / {row['best_full']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot(families: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], families, strict=True):
        labels = list(fam["test_acc"])
        stats = [mean_ci(fam["test_acc"][label]) for label in labels]
        colors = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2"] + ["#dd8452"] * 10
        ax.barh(
            range(len(labels)),
            [s[0] for s in stats],
            xerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
            color=colors[: len(labels)],
            capsize=3,
        )
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        low = min(s[0] - (s[1] if math.isfinite(s[1]) else 0) for s in stats)
        ax.set_xlim(max(0.0, low - 0.03), 1.0 if fam["name"] != "mnist1d-mlp" else 0.8)
        if fam["name"] in PUBLISHED:
            ax.axvline(PUBLISHED[fam["name"]], color="black", lw=0.8, ls="--")
        ax.set_title(fam["name"], fontsize=10)
        ax.set_xlabel("test accuracy (mean, 95% CI)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evidence")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--quick", action="store_true", help="8 trials, 2 seeds: a smoke run")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="rebuild evidence.md and evidence.png from the families' JSON files in --out",
    )
    args = parser.parse_args()
    if args.tables_only:
        order = {name: i for i, name in enumerate(FAMILIES)}
        loaded = [json.loads(p.read_text()) for p in args.out.glob("*.json") if p.stem in order]
        loaded.sort(key=lambda fam: order[fam["name"]])
        (args.out / "evidence.md").write_text(markdown(loaded))
        plot(loaded, args.out / "evidence.png")
        print(markdown(loaded))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("pytorch_lightning", "lightning_fabric", "droptune", "optuna"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault(
        "DROPTUNE_CACHE_DIR", str(Path(tempfile.gettempdir()) / "droptune-cache")
    )
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {unknown}; allowed: {', '.join(FAMILIES)}")
    started = time.perf_counter()
    families = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            families.append(run_family(name, FAMILIES[name], Path(tmp), args.quick))
            log.info("%s done after %.0f s in all", name, time.perf_counter() - started)
            # each family's numbers as soon as it is done (a later failure keeps them)
            print(markdown(families[-1:]), flush=True)
            (args.out / f"{name}.json").write_text(json.dumps(families[-1], indent=2, default=str))
    text = markdown(families)
    print(text)
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    (args.out / "evidence.md").write_text(text)
    plot(families, args.out / "evidence.png")


if __name__ == "__main__":
    main()
