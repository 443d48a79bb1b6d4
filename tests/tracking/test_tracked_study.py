"""A real study through the real command line (``droptune run``: PostgreSQL storage, two worker
processes) mirrored into a real MLflow store, then ``report``, ``sync``,
``load_config("runs:/...")``, ``droptune ui`` and the MLflow UI in headless Chromium.

The storage URL carries a password (PostgreSQL's trust authentication ignores it): it must not
appear in any MLflow param, tag or artifact, nor in what the commands print.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
import os
from pathlib import Path
import secrets
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from mlflow import MlflowClient
import optuna
import pytest
import yaml

from droptune import load_config
from droptune.exceptions import ConfigError
from droptune.records import HISTORY_ATTR
from droptune.records import RUN_ID_ATTR
from droptune.records import SECONDS_ATTR
from droptune.records import TIMING_ATTR
from droptune.timing import CATEGORIES
from tests.study.helpers import PG_URL
from tests.study.helpers import TINY
from tests.study.helpers import Procs
from tests.study.helpers import drop_database
from tests.study.helpers import merge
from tests.study.helpers import pg_admin
from tests.study.helpers import trials


pytestmark = pytest.mark.slow

SECRET = "s3cret-pw-7791"
NAME = "tracked"
N = 4
EPOCHS = 3
ARTIFACTS = Path(
    os.environ.get("DROPTUNE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@dataclass
class Tracked:
    """The finished study and everything the test needs to look at it."""

    tmp: Path
    storage: str
    tracking_uri: str
    procs: Procs
    run: subprocess.CompletedProcess[str]
    client: MlflowClient
    experiment_id: str
    parent: Any
    children: list[Any]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracked]:
    try:
        admin = pg_admin()
    except Exception as exc:
        pytest.skip(f"PostgreSQL is unreachable at 127.0.0.1:5432: {exc}")
    db = f"droptune_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    tmp = tmp_path_factory.mktemp("tracked")
    storage = PG_URL.format(db=db).replace("postgres@", f"postgres:{SECRET}@")
    tracking_uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    spec = merge(
        TINY,
        {
            "study": {"name": NAME},
            "storage": storage,
            "train": {"max_epochs": EPOCHS},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
            "tracking": {"enabled": True, "uri": tracking_uri},
            "execution": {"workers": 2},
            "n_trials": N,
        },
    )
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    procs = Procs(tmp)
    try:
        result = procs.run("run", str(path), timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(NAME)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1, [r.info.run_name for r in parents]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        yield Tracked(
            tmp,
            storage,
            tracking_uri,
            procs,
            result,
            client,
            experiment.experiment_id,
            parents[0],
            children,
        )
    finally:
        procs.close()
        drop_database(db)


def _by_number(children: list[Any]) -> dict[int, Any]:
    return {int(r.data.tags["droptune.trial_number"]): r for r in children}


def test_every_trial_has_exactly_one_child_run_under_the_study_run(tracked: Tracked) -> None:
    study_trials = trials(tracked.storage, NAME)
    assert len(study_trials) == N
    numbers = [int(r.data.tags["droptune.trial_number"]) for r in tracked.children]
    assert sorted(numbers) == [t.number for t in study_trials]  # one each, no duplicate
    assert tracked.parent.info.run_name == NAME
    assert tracked.parent.data.tags["droptune.role"] == "study"
    assert tracked.parent.info.status == "FINISHED"
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    runs = _by_number(tracked.children)
    for trial in study_trials:
        run = runs[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == tracked.parent.info.run_id
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.info.status == expected[trial.state.name]
        assert run.data.tags["optuna.state"] == trial.state.name
    assert not [r for r in tracked.children if r.info.status == "RUNNING"]
    # The parent run carries the spec and the study's counts.
    assert tracked.parent.data.params["study.name"] == NAME
    assert tracked.parent.data.metrics["trials_complete"] == sum(
        t.state.name == "COMPLETE" for t in study_trials
    )
    assert "best_val_loss" in tracked.parent.data.metrics
    # ... and links its best trial's run
    best = min((t for t in study_trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert tracked.parent.data.tags["droptune.best_trial"] == str(best.number)
    best_run = next(r for r in tracked.children if r.info.run_name == f"trial-{best.number}")
    assert tracked.parent.data.tags["droptune.best_run_id"] == best_run.info.run_id


def test_child_runs_hold_params_resolved_config_epoch_curves_and_tags(tracked: Tracked) -> None:
    import droptune

    runs = _by_number(tracked.children)
    for trial in trials(tracked.storage, NAME):
        run = runs[trial.number]
        params = run.data.params
        for key, value in trial.params.items():
            assert params[key] == str(value)
        # The resolved config: spec defaults, the trial's values and its seed.
        assert params["config.model.family"] == "mlp"
        assert params["config.train.seed"] == str(trial.user_attrs["droptune.seed"])
        # the sampled values once, under their own names; the rest under config.
        assert not {f"config.{key}" for key in trial.params} & set(params)
        assert params["regularization.dropout.kind"] == str(
            trial.params["regularization.dropout.kind"]
        )
        tags = run.data.tags
        assert tags["droptune.study"] == NAME
        assert tags["droptune.trial_number"] == str(trial.number)
        assert tags["droptune.seed"] == str(trial.user_attrs["droptune.seed"])
        assert tags["droptune.device"] == "cpu"
        assert tags["droptune.version"] == droptune.__version__
        history = trial.user_attrs[HISTORY_ATTR]
        epochs = len(history)
        assert epochs == (EPOCHS if trial.state.name == "COMPLETE" else epochs) and epochs >= 1
        val = tracked.client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in val] == list(range(epochs))
        assert [round(m.value, 5) for m in val] == [round(r["val_loss"], 5) for r in history]
        for key in ("val_acc", "epoch_time"):
            assert len(tracked.client.get_metric_history(run.info.run_id, key)) == epochs
        if trial.state.name == "COMPLETE":
            for key in ("train_loss", "lr"):
                assert len(tracked.client.get_metric_history(run.info.run_id, key)) == epochs
            assert tags["optuna.values"] == f"{trial.value:.6g}"
            # the trial's value (its best epoch), so that sorting by it agrees with `best`
            objective = tracked.client.get_metric_history(run.info.run_id, "objective")
            assert [m.value for m in objective] == [pytest.approx(trial.value)]
            # The trial's value is the best val_loss over its epochs.
            assert trial.value == pytest.approx(min(r["val_loss"] for r in history), abs=1e-6)


def test_trial_and_run_link_both_ways_and_tracking_overhead_is_recorded(
    tracked: Tracked,
) -> None:
    runs = _by_number(tracked.children)
    seconds = []
    for trial in trials(tracked.storage, NAME):
        assert trial.user_attrs[RUN_ID_ATTR] == runs[trial.number].info.run_id
        assert "droptune.tracking_error" not in trial.user_attrs
        seconds.append(trial.user_attrs[SECONDS_ATTR])
    study = optuna.load_study(study_name=NAME, storage=tracked.storage)
    assert study.user_attrs["droptune.mlflow_parent_run_id"] == tracked.parent.info.run_id
    assert study.user_attrs["droptune.mlflow_experiment_id"] == tracked.experiment_id
    print(f"tracking seconds per trial: {seconds}")
    assert all(0 < s < 30 for s in seconds)


def test_every_trial_records_where_its_time_went_and_run_prints_the_mean(
    tracked: Tracked,
) -> None:
    for trial in trials(tracked.storage, NAME):
        spent = trial.user_attrs[TIMING_ATTR]
        assert set(spent) == {*CATEGORIES, "total"}
        # Trainer and data built, epochs trained, the study written, the run logged
        for key in ("setup", "train", "storage", "tracking"):
            assert spent[key] > 0, (trial.number, spent)
        assert sum(spent[key] for key in CATEGORIES) == pytest.approx(spent["total"], abs=1e-3)
        # the objective's window lies inside the trial's: asked before, told after
        assert trial.datetime_start is not None and trial.datetime_complete is not None
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        assert spent["total"] <= wall + 0.01, (spent, wall)
    assert "time per trial (mean of" in tracked.run.stdout
    assert "MLflow" in tracked.run.stdout


def test_parent_run_holds_the_study_artifacts(tracked: Tracked) -> None:
    names = {a.path for a in tracked.client.list_artifacts(tracked.parent.info.run_id)}
    expected = {
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinates.png",
        "metric_vs_dropout_rate.png",
        "metric_vs_l2_strength.png",
        "learning_curves.png",
        "best_config.yaml",
        "summary.md",
        "summary.csv",
    }
    assert expected <= names, names
    local = Path(
        tracked.client.download_artifacts(tracked.parent.info.run_id, "", str(tracked.tmp / "dl"))
    )
    for png in local.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    csv_rows = (local / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == N + 1
    assert f"# Study {NAME}" in (local / "summary.md").read_text()


def test_load_config_from_a_runs_uri_equals_droptune_best(
    tracked: Tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.tracking_uri)
    cfg = load_config(f"runs:/{tracked.parent.info.run_id}/best_config.yaml")
    best = tracked.procs.run("best", "--study", NAME, "--storage", tracked.storage)
    assert best.returncode == 0, best.stderr
    assert cfg.to_dict() == yaml.safe_load(best.stdout)
    with pytest.raises(ConfigError, match=r"runs:/.*/nope\.yaml.*could not be fetched"):
        load_config(f"runs:/{tracked.parent.info.run_id}/nope.yaml")


def test_report_refreshes_and_sync_finds_nothing_to_back_fill(tracked: Tracked) -> None:
    report = tracked.procs.run(
        "report", NAME, "--storage", tracked.storage, "--tracking-uri", tracked.tracking_uri
    )
    assert report.returncode == 0, report.stderr
    assert "best_config.yaml" in report.stdout
    sync = tracked.procs.run(
        "sync", NAME, "--storage", tracked.storage, "--tracking-uri", tracked.tracking_uri
    )
    assert sync.returncode == 0, sync.stderr
    assert "runs created 0, completed 0, adopted 0, duplicates removed 0" in sync.stdout
    experiment = tracked.experiment_id
    assert len(tracked.client.search_runs([experiment], max_results=1000)) == N + 1


def test_the_storage_password_appears_nowhere(tracked: Tracked) -> None:
    out = tracked.run.stdout + tracked.run.stderr
    assert SECRET not in out
    assert "postgres:***@" in out
    runs = tracked.client.search_runs([tracked.experiment_id], max_results=1000)
    for run in runs:
        for text in [*run.data.params.values(), *run.data.tags.values()]:
            assert SECRET not in text, run.info.run_name
    assert tracked.parent.data.tags["droptune.storage"].startswith(
        "postgresql+psycopg://postgres:***@"
    )
    local = Path(
        tracked.client.download_artifacts(tracked.parent.info.run_id, "", str(tracked.tmp / "s"))
    )
    for path in local.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path
    study = optuna.load_study(study_name=NAME, storage=tracked.storage)
    assert SECRET not in repr(study.user_attrs)


# ----------------------------------------------------------------------------------------------
# `droptune ui` and the MLflow UI in a real browser.


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        message = "Debian chromium and chromium-driver are not installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)
    return browser, driver


def _read_url(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if "http://" in line:
            return line[line.index("http://") :].strip()
        if not line and proc.poll() is not None:
            pytest.fail(f"droptune ui exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    pytest.fail("droptune ui printed no URL")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_droptune_ui_lists_the_study_and_trial_runs_in_headless_chromium(tracked: Tracked) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    ui = tracked.procs.start(
        "ui", NAME, "--storage", tracked.storage, "--tracking-uri", tracked.tracking_uri
    )
    url = _read_url(ui, 180)
    assert url.startswith("http://127.0.0.1:")
    assert f"/#/experiments/{tracked.experiment_id}/runs?" in url
    assert "workflowType=machine_learning" in url  # the model-training view, not GenAI
    port = int(url.split(":")[2].split("/")[0])
    options = Options()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tracked.tmp / 'chromium-profile'}",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-ui-runs.png"
    try:
        driver.get(url)
        # the page droptune prints lists the trials themselves (no collapsed study run in
        # front of them), best first by their objective
        names = [f"trial-{n}" for n in range(N)]

        def listed(d: Any) -> bool:
            text = d.find_element("tag name", "body").text
            return all(name in text for name in names) and "Sort: objective" in text

        try:
            # The table re-renders while it loads: an element found a moment ago may be gone.
            wait = WebDriverWait(
                driver, 90, poll_frequency=1, ignored_exceptions=[StaleElementReferenceException]
            )
            wait.until(listed)
        except TimeoutException:
            body = driver.find_element("tag name", "body").text
            pytest.fail(f"the runs table never listed {names}; the page shows:\n{body[-3000:]}")
        finally:
            driver.save_screenshot(str(screenshot))
        body = driver.find_element("tag name", "body").text
        for name in names:
            assert name in body
    finally:
        driver.quit()
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=120)  # the server gets 20 s to stop, then SIGKILL; a loaded CI is slow
    assert screenshot.stat().st_size > 10_000
    assert ui.returncode == 0, ui.stderr.read()[-3000:] if ui.stderr else ""
    assert not _port_open(port), "droptune ui left its server running"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_droptune_ui_stops_its_server_on_signals_and_when_it_dies(
    tracked: Tracked, how: str
) -> None:
    """A closed terminal (SIGHUP), a service manager (SIGTERM) or kill -9 of `ui` itself: the
    MLflow server it started is gone afterwards and its port closed."""
    ui = tracked.procs.start(
        "ui", NAME, "--storage", tracked.storage, "--tracking-uri", tracked.tracking_uri
    )
    url = _read_url(ui, 180)
    port = int(url.split(":")[2].split("/")[0])
    assert _port_open(port)

    ui.send_signal(getattr(signal, how))
    ui.wait(timeout=60)

    if how != "SIGKILL":
        assert ui.returncode == 0, ui.stderr.read()[-3000:] if ui.stderr else ""
    deadline = time.monotonic() + 30
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _port_open(port), f"droptune ui left its server running after {how}"
