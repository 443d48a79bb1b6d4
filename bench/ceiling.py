"""Where is the ceiling? A grid over a spec's regularization, tested against its default.

``bench/evidence.py`` found that tuning the MNIST-1D CNN finds configs as good as the spec's
hand-picked default, not better. This script asks whether any regularization in the search
space beats that default at all, so the answer is data rather than a shrug:

1. **grid**: every combination of the grid below, each trained with 3 seeds, test accuracy of
   the final weights (population mode where the configs share a dropout kind);
2. **re-test**: the grid cell with the highest mean test accuracy (chosen on the test set on
   purpose: that flatters the grid, so it is an upper bound on what tuning could reach) and the
   spec default, each trained with 5 new seeds; the paired difference cell − default with its
   95% t interval.

If even the flattered best cell does not beat the default by an interval that excludes 0, no
regularization in the grid does, and the default is at the ceiling of this network on this data.

Run: python bench/ceiling.py [--spec studies/mnist1d-cnn.yaml] [--out docs/evidence]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from pathlib import Path
import sys
import time
from typing import Any
import warnings


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence import mean_ci  # noqa: E402
from evidence import seeded  # noqa: E402
from evidence import test_accuracies  # noqa: E402


#: The grid per spec: dotted field → values. The CNN's spans the two kinds of its search space
#: made for convolutions (``standard`` and ``none`` tested lower in bench/evidence.py), rates
#: from light to strong around the default, and L2 over three decades.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "studies/mnist1d-cnn.yaml": {
        "regularization.dropout.kind": ["spatial", "dropblock"],
        "regularization.dropout.conv_rate": [0.05, 0.1, 0.2],
        "regularization.dropout.hidden_rate": [0.15, 0.3, 0.45],
        "regularization.l2.strength": [1e-5, 1e-4, 1e-3],
    },
}
GRID_SEEDS, RETEST_SEEDS = 3, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="studies/mnist1d-cnn.yaml", choices=sorted(GRIDS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evidence")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("pytorch_lightning", "lightning_fabric", "droptune"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from droptune.study.objective import trial_seed
    from droptune.study.spec import load_spec

    spec = load_spec(ROOT / args.spec)
    grid = GRIDS[args.spec]
    started = time.perf_counter()
    cells = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    grid_seeds = [trial_seed(spec.study.seed, 3_000_000 + i) for i in range(GRID_SEEDS)]
    configs = [c for cell in cells for c in seeded(spec.base.with_overrides(cell), grid_seeds)]
    accs = test_accuracies(configs)
    rows = []
    for i, cell in enumerate(cells):
        values = accs[i * GRID_SEEDS : (i + 1) * GRID_SEEDS]
        rows.append({"cell": cell, "test_acc": values, "mean": mean_ci(values)[0]})
    rows.sort(key=lambda row: -row["mean"])
    logging.info("grid of %d cells done after %.0f s", len(cells), time.perf_counter() - started)

    best = rows[0]["cell"]
    seeds = [trial_seed(spec.study.seed, 4_000_000 + i) for i in range(RETEST_SEEDS)]
    retest = test_accuracies(
        seeded(spec.base.with_overrides(best), seeds) + seeded(spec.base, seeds)
    )
    cell_accs, default_accs = retest[:RETEST_SEEDS], retest[RETEST_SEEDS:]
    diff = [a - b for a, b in zip(cell_accs, default_accs, strict=True)]
    result = {
        "spec": args.spec,
        "grid": grid,
        "rows": rows,
        "best_cell": best,
        "retest": {"best_cell": cell_accs, "spec_default": default_accs, "paired_diff": diff},
        "wall_s": time.perf_counter() - started,
    }
    text = markdown(result)
    print(text)
    name = Path(args.spec).stem
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ceiling-{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"ceiling-{name}.md").write_text(text)


def _fmt(values: list[float]) -> str:
    mean, ci = mean_ci(values)
    return f"{mean:.3f} ± {ci:.3f}"


def markdown(result: dict[str, Any]) -> str:
    short = {key: key.rsplit(".", 1)[-1] for key in result["grid"]}
    retest = result["retest"]
    mean, ci = mean_ci(retest["paired_diff"])
    excl = "excludes 0" if math.isfinite(ci) and abs(mean) > ci else "includes 0"
    lines = [
        f"Grid over `{result['spec']}` ({len(result['rows'])} cells × {GRID_SEEDS} seeds, "
        f"{result['wall_s'] / 60:.0f} min on the CPU).",
        "",
        f"Best cell by test accuracy, re-tested with {RETEST_SEEDS} new seeds against the spec "
        "default:",
        "",
        "| config | test accuracy (mean ± 95% CI) |",
        "|---|---|",
        f"| best grid cell ({_cell(result['best_cell'], short)}) | {_fmt(retest['best_cell'])} |",
        f"| spec default | {_fmt(retest['spec_default'])} |",
        f"| **best cell − default (paired)** | **{mean:+.3f} ± {ci:.3f}** ({excl}) |",
        "",
        "The ten best and the five worst grid cells "
        f"(mean test accuracy over {GRID_SEEDS} seeds):",
        "",
        "| cell | test accuracy |",
        "|---|---|",
    ]
    shown = result["rows"][:10] + result["rows"][-5:]
    for row in shown:
        lines.append(f"| {_cell(row['cell'], short)} | {_fmt(row['test_acc'])} |")
    return "\n".join(lines) + "\n"


def _cell(cell: dict[str, Any], short: dict[str, str]) -> str:
    return ", ".join(f"{short[key]}={value}" for key, value in cell.items())


if __name__ == "__main__":
    main()
