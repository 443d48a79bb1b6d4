"""End to end through the real command line: ``droptune run`` with worker processes on SQLite and
PostgreSQL, resume, export → train, Optuna's own CLI, ``load_best``, exact trial counts with many
workers, and a multi-objective study."""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
from pathlib import Path
import re
import subprocess
import sys
import time
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
import yaml

import droptune
from droptune.cli import main
from droptune.records import BASELINE_ATTR
from droptune.study.objective import trial_seed
from droptune.study.space import KIND_PATH
from droptune.study.space import baseline_params
from droptune.study.spec import load_spec
from droptune.training import build_datamodule
from droptune.training import build_module
from droptune.training import build_trainer
from tests.study.helpers import DELETE
from tests.study.helpers import TINY
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import cli_env
from tests.study.helpers import counts
from tests.study.helpers import finished
from tests.study.helpers import merge
from tests.study.helpers import trials


NAME = "digits-e2e"
SEARCH: dict[str, Any] = {
    KIND_PATH: {"choices": ["none", "standard", "gaussian"]},
    "regularization.dropout.input_rate": {"low": 0.0, "high": 0.3, "step": 0.1},
    "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
    "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    "regularization.early_stopping.patience": {"low": 1, "high": 3, "type": "int"},
}


@dataclass
class Study:
    """The module's study: run to 6 trials, then resumed to 8."""

    spec_path: Path
    url: str
    name: str
    seed: int
    first: subprocess.CompletedProcess[str]
    after_first: list[optuna.trial.FrozenTrial]
    second: subprocess.CompletedProcess[str]
    after_second: list[optuna.trial.FrozenTrial]
    workdir: Path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("e2e")
    url = f"sqlite:///{work / 'db' / 'study.db'}"
    data = merge(
        TINY,
        {
            "study": {"name": NAME, "seed": 11},
            "train": {"max_epochs": 3},
            "search": SEARCH,
            "storage": url,
            "n_trials": 6,
        },
    )
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    runner = Procs(work)
    try:
        start = time.monotonic()
        first = runner.run("run", str(spec_path), "--workers", "2", timeout=400)
        print(f"6 trials, 2 workers, SQLite: {time.monotonic() - start:.1f}s wall")
        after_first = trials(url, NAME)
        second = runner.run("run", str(spec_path), "--workers", "2", "--n-trials", "8")
        after_second = trials(url, NAME)
        yield Study(spec_path, url, NAME, 11, first, after_first, second, after_second, work)
    finally:
        runner.close()


@pytest.mark.slow
def test_run_finishes_exactly_the_requested_trials(study: Study) -> None:
    assert study.first.returncode == 0, study.first.stderr[-3000:]
    trial_list = study.after_first
    assert counts(trial_list).get("RUNNING", 0) == 0
    assert finished(trial_list) == 6
    assert len(trial_list) == 6, counts(trial_list)  # no failure, no overshoot
    assert sorted(t.number for t in trial_list) == list(range(6))
    assert f"study: {NAME}" in study.first.stdout
    assert re.search(r"^trials: .*complete \d", study.first.stdout, re.M)
    for trial in trial_list:
        assert set(trial.params) <= set(SEARCH)
        assert KIND_PATH in trial.params
        if trial.number == 0:  # the baseline: the spec's values the search can take
            assert trial.user_attrs[BASELINE_ATTR] is True
            spec = load_spec(study.spec_path)
            assert trial.params == baseline_params(spec, spec.base)
            assert trial.params[KIND_PATH] == "standard"
            continue
        assert "regularization.l2.strength" in trial.params
        if trial.params[KIND_PATH] == "none":
            assert "regularization.dropout.hidden_rate" not in trial.params
        else:
            assert "regularization.dropout.hidden_rate" in trial.params
        assert trial.user_attrs["droptune.seed"] == trial_seed(study.seed, trial.number)
        assert trial.user_attrs["droptune.worker"].startswith("run-")


@pytest.mark.slow
def test_run_again_with_more_trials_resumes(study: Study) -> None:
    assert study.second.returncode == 0, study.second.stderr[-3000:]
    trial_list = study.after_second
    assert counts(trial_list).get("RUNNING", 0) == 0
    assert finished(trial_list) == 8 == len(trial_list)
    before = {t.number: (t.state, t.values, t.params) for t in study.after_first}
    again = {t.number: (t.state, t.values, t.params) for t in trial_list if t.number < 6}
    assert again == before  # the first six are kept, not rerun
    assert "A new study created" not in study.second.stderr


@pytest.mark.slow
def test_export_then_train_reproduces_the_best_value(study: Study, procs: Procs) -> None:
    best = optuna.load_study(study_name=study.name, storage=study.url).best_trial
    out = procs.run("export", "--study", study.name, "--storage", study.url, "-o", "best.yaml")
    assert out.returncode == 0, out.stderr
    exported = yaml.safe_load((procs.cwd / "best.yaml").read_text())
    assert "search" not in exported and "study" not in exported
    assert exported["train"]["seed"] == trial_seed(study.seed, best.number)
    for path, value in best.params.items():
        node = exported
        for part in path.split("."):
            node = node[part]
        assert node == value, path
    trained = procs.run("train", "best.yaml", "--output", "train-out")
    assert trained.returncode == 0, trained.stderr[-3000:]
    line = re.search(r"^best_val_loss: (\S+)$", trained.stdout, re.M)
    assert line, trained.stdout
    # The line has 6 significant digits; metrics.json has the full value.
    assert float(line.group(1)) == float(f"{best.value:.6g}")
    metrics = json.loads((procs.cwd / "train-out" / "metrics.json").read_text())
    assert math.isclose(metrics["best_val_loss"], best.value, rel_tol=1e-6), (
        metrics["best_val_loss"],
        best.value,
    )


@pytest.mark.slow
def test_best_status_and_studies_commands(
    study: Study, capsys: pytest.CaptureFixture[str]
) -> None:
    opened = optuna.load_study(study_name=study.name, storage=study.url)
    assert main(["best", "--study", study.name, "--storage", study.url, "--format", "json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["train"]["seed"] == trial_seed(study.seed, opened.best_trial.number)
    assert best["regularization"]["dropout"]["kind"] == opened.best_params[KIND_PATH]

    assert main(["best", "--study", study.name, "--storage", study.url, "--format", "xml"]) == 2
    capsys.readouterr()

    assert main(["status", "--storage", study.url]) == 0
    status = capsys.readouterr().out
    assert re.search(rf"^study {re.escape(study.name)}: .*complete \d", status, re.M), status
    assert f"best: trial {opened.best_trial.number}" in status
    assert KIND_PATH in status

    assert main(["studies", "--storage", study.url]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^{re.escape(study.name)}\ttrials=8\tbest=\[", listing, re.M), listing

    assert main(["best", "--study", "nope", "--storage", study.url]) == 2
    assert f"studies there: {study.name}" in capsys.readouterr().err


@pytest.mark.slow
def test_optuna_cli_lists_the_trials(study: Study) -> None:
    exe = str(Path(sys.executable).with_name("optuna"))
    result = subprocess.run(
        [exe, "trials", "--study-name", study.name, "--storage", study.url, "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 8
    names: set[str] = set()
    for row in rows:
        params = row["params"]
        names |= set(params)
        assert row["state"] in ("COMPLETE", "PRUNED")
    assert KIND_PATH in names and names <= set(SEARCH)


@pytest.mark.slow
def test_load_best_gives_a_config_that_builds_and_trains(study: Study) -> None:
    cfg = droptune.load_best(study.name, study.url)
    best = optuna.load_study(study_name=study.name, storage=study.url).best_trial
    assert cfg.train.seed == trial_seed(study.seed, best.number)
    assert cfg.regularization.dropout.kind == best.params[KIND_PATH]
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, max_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.current_epoch == 1
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))


# ----------------------------------------------------------------------------------------------
# Exact counts with many workers.


def _slot_rows(url: str, name: str) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.text(
                        "SELECT slot, owner, trial_number FROM droptune_slots "
                        "WHERE study_name = :name ORDER BY slot"
                    ),
                    {"name": name},
                )
            )
    finally:
        engine.dispose()


def _count_run(
    procs: Procs, write_spec: SpecWriter, url: str, workers: int, n: int, separate: bool
) -> str:
    """``n`` tiny trials with ``workers`` processes: one ``droptune run --workers`` or, with
    ``separate``, that many ``droptune worker`` commands started together on the fresh
    database (they race to create the tables, the study and the slots). Returns the output."""
    name = f"count-{workers}"
    path = write_spec(
        study={"name": name},
        train={"max_epochs": 1},
        search={
            KIND_PATH: {"choices": ["none", "standard"]},
            "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
            # continuous for kind none too: 500 distinct configs, no duplicate to refuse
            "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
        },
        sampler={"name": "random", "seed": 0},
        storage=url,
        n_trials=n,
    )
    start = time.monotonic()
    if separate:
        started = [
            procs.start("worker", str(path), "--worker-index", str(i)) for i in range(workers)
        ]
        results = []
        for proc in started:
            out, err = proc.communicate(timeout=max(1.0, 580 - (time.monotonic() - start)))
            results.append((proc.returncode, out, err))
        codes = [code for code, _, _ in results]
        output = "\n".join(out + err for _, out, err in results)
    else:
        result = procs.run("run", str(path), "--workers", str(workers), timeout=580)
        codes = [result.returncode]
        output = result.stdout + result.stderr
    wall = time.monotonic() - start
    trial_list = trials(url, name)
    state_counts = counts(trial_list)
    backend = url.split(":", 1)[0]
    how = f"{workers} x droptune worker" if separate else f"droptune run --workers {workers}"
    print(
        f"\n[count] {backend}: {how}, {n} trials: {wall:.1f}s wall, states {state_counts}, "
        f"exit codes {sorted(set(codes))}"
    )
    assert codes == [0] * len(codes), output[-5000:]
    assert finished(trial_list) == n, state_counts
    assert set(state_counts) <= {"COMPLETE", "PRUNED"}, state_counts  # no FAIL, no RUNNING
    numbers = [t.number for t in trial_list]
    assert sorted(numbers) == list(range(n))  # no duplicate, no gap, no overshoot
    rows = _slot_rows(url, name)
    assert len(rows) == n
    assert sorted(row.trial_number for row in rows) == list(range(n))  # one slot per trial
    workers_used = {t.user_attrs["droptune.worker"] for t in trial_list}
    print(f"[count] {len(workers_used)} of {workers} workers ran a trial")
    assert len(workers_used) >= 2
    lowered = output.lower()
    for bad in ("database is locked", "unreachable", "traceback", "operationalerror"):
        assert bad not in lowered, output[-5000:]
    return output


@pytest.mark.slow
def test_postgres_16_workers_500_trials_exact(
    procs: Procs, write_spec: SpecWriter, pg_url: str
) -> None:
    _count_run(procs, write_spec, pg_url, workers=16, n=500, separate=True)


@pytest.mark.slow
def test_sqlite_8_workers_500_trials_exact_and_never_locked(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    _count_run(procs, write_spec, sqlite_url, workers=8, n=500, separate=False)


@pytest.mark.slow
def test_worker_memory_does_not_grow_over_200_trials(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    """The worker's resident memory after trial 200 is within 10% of after trial 20 (each
    trial records it in ``droptune.rss_mb``)."""
    name = "long-life"
    n = 200
    path = write_spec(
        study={"name": name},
        data={"train_subset": 64},
        train={"max_epochs": 1},
        search={"regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5}},
        sampler={"name": "random", "seed": 0},
        pruner={"name": "none"},
        n_trials=n,
    )
    result = procs.run("worker", str(path), timeout=580)
    assert result.returncode == 0, result.stderr[-3000:]
    trial_list = sorted(trials(sqlite_url, name), key=lambda t: t.number)
    assert finished(trial_list) == n
    rss = [t.user_attrs["droptune.rss_mb"] for t in trial_list]
    print(f"\n[memory] rss MiB after trials 1/20/100/200: {rss[0]} {rss[19]} {rss[99]} {rss[-1]}")
    assert rss[-1] <= 1.10 * rss[19], (rss[19], rss[-1])


@pytest.mark.slow
def test_multi_objective_study(procs: Procs, write_spec: SpecWriter, sqlite_url: str) -> None:
    path = write_spec(
        study={
            "name": "mo",
            "metric": DELETE,
            "direction": DELETE,
            "metrics": ["val_loss", "val_train_gap"],
            "directions": ["minimize", "minimize"],
        },
        sampler={"name": "nsgaii", "seed": 0},
        n_trials=3,
    )
    result = procs.run("run", str(path), "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    trial_list = trials(sqlite_url, "mo")
    assert counts(trial_list) == {"COMPLETE": 3}
    for trial in trial_list:
        assert trial.values is not None and len(trial.values) == 2
        gap = trial.user_attrs["metric.val_loss"] - trial.user_attrs["metric.train_loss"]
        assert math.isclose(trial.values[0], trial.user_attrs["metric.val_loss"])
        assert math.isclose(trial.values[1], gap, rel_tol=1e-6, abs_tol=1e-9)
    assert [d.name for d in optuna.load_study(study_name="mo", storage=sqlite_url).directions] == [
        "MINIMIZE",
        "MINIMIZE",
    ]
    assert "best value: [[" in result.stdout
    # best/export take the first trial of the Pareto front.
    best = procs.cwd / "mo-best.yaml"
    assert main(["export", "--study", "mo", "--storage", sqlite_url, "-o", str(best)]) == 0
    assert yaml.safe_load(best.read_text())["model"]["hidden"] == [16]


def test_commands_that_only_read_or_watch_a_study_never_import_lightning_or_torch(
    write_spec: SpecWriter, sqlite_url: str
) -> None:
    """``run``'s own process (its workers train) and ``status`` / ``studies`` start without
    PyTorch Lightning and without torch: seconds of start-up on every command."""
    # the spec's default devices (auto: counted without torch on a host with no GPU driver)
    # and a population (whether the spec trains as populations is said up front)
    path = write_spec(study={"name": "startup"}, execution={"devices": "auto", "population": 2})
    code = (
        "import sys\n"
        "from droptune.cli import main\n"
        "for args in sys.argv[1:]:\n"
        "    assert main(args.split('|')) == 0, args\n"
        "print('lightning imported:', 'pytorch_lightning' in sys.modules)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    commands = [
        f"run|{path}|--workers|0",
        f"run|{path}|--workers|0|--population|3",
        f"status|--storage|{sqlite_url}",
        f"studies|--storage|{sqlite_url}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, *commands],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "startup" in result.stdout
    assert "lightning imported: False" in result.stdout, result.stdout
    assert "torch imported: False" in result.stdout, result.stdout


@pytest.mark.parametrize("package", ["droptune", "droptune.study", "droptune.population"])
def test_every_exported_name_resolves(package: str) -> None:
    """The lazy exports (PEP 562): every name in ``__all__`` and ``dir()`` resolves, a
    submodule is reachable as an attribute, and an unknown name is an AttributeError."""
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))
    assert importlib.import_module("droptune").layers.__name__ == "droptune.layers"
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name
