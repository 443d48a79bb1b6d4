"""No wasted trials: a resumed study, restarted and hand-started workers never sample a finished
config again; the study's budget is recorded once and honoured by every worker that joins; the
spec's fixed configuration runs first as the baseline trial. Real CLI processes and SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from droptune.records import BASELINE_ATTR
from droptune.records import DUPLICATE_ATTR
from droptune.study.objective import PruningCallback
from droptune.study.runner import create_study
from droptune.study.runner import study_budget
from droptune.study.sampling import TrialSeededSampler
from droptune.study.space import baseline_params
from droptune.study.spec import spec_from_dict
from tests.study.helpers import TINY
from tests.study.helpers import Procs
from tests.study.helpers import SpecWriter
from tests.study.helpers import assert_distinct_configs
from tests.study.helpers import counts
from tests.study.helpers import finished
from tests.study.helpers import merge
from tests.study.helpers import trials


def _params(trial_list: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    return [t.params for t in sorted(trial_list, key=lambda t: t.number)]


@pytest.mark.slow
def test_resumed_study_never_repeats_a_config_and_starts_with_the_baseline(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    path = write_spec(study={"name": "resume"}, n_trials=4, pruner={"name": "none"})
    assert procs.run("run", str(path)).returncode == 0
    first = trials(sqlite_url, "resume")
    assert finished(first) == 4

    result = procs.run("run", str(path), "--n-trials", "8")

    assert result.returncode == 0, result.stderr[-3000:]
    trial_list = trials(sqlite_url, "resume")
    assert finished(trial_list) == 8
    # The old code rebuilt the seeded sampler and replayed trials 0-3 as trials 4-7.
    assert_distinct_configs(trial_list)
    assert _params(trial_list)[:4] == _params(first)
    baseline = min(trial_list, key=lambda t: t.number)
    assert baseline.user_attrs[BASELINE_ATTR] is True
    # The spec's values where the search can take them; l2.strength (spec value 0, searched
    # on a log range) is not sampled, so the baseline trains with the spec's 0.
    assert baseline.params == {
        "regularization.dropout.kind": "standard",
        "regularization.dropout.hidden_rate": 0.2,
    }
    assert [t.number for t in trial_list if t.user_attrs.get(BASELINE_ATTR)] == [0]
    assert study_budget(sqlite_url, "resume") == 8


@pytest.mark.slow
def test_the_same_spec_and_seed_give_the_same_sequence(
    procs: Procs, write_spec: SpecWriter, tmp_path: Path
) -> None:
    sequences = []
    for copy in ("a", "b"):
        url = f"sqlite:///{tmp_path / copy / 'study.db'}"
        path = write_spec(copy, study={"name": "same"}, storage=url, n_trials=4)
        assert procs.run("run", str(path)).returncode == 0
        sequences.append(_params(trials(url, "same")))
    assert sequences[0] == sequences[1]
    assert len({repr(p) for p in sequences[0]}) == 4


@pytest.mark.slow
def test_hand_started_workers_honour_the_recorded_budget_and_never_repeat(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    """`run --workers 0 --n-trials 5`, then two `droptune worker` without --worker-index and a
    spec that says 9: the study ends with exactly 5 finished trials, all different (the old
    code ran the spec's count, with repeats)."""
    path = write_spec(study={"name": "hand"}, n_trials=9, pruner={"name": "none"})
    created = procs.run("run", str(path), "--workers", "0", "--n-trials", "5")
    assert created.returncode == 0, created.stderr[-3000:]
    assert study_budget(sqlite_url, "hand") == 5

    workers = [procs.start("worker", str(path)) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]

    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
        assert "has a budget of 5 trials" in err and "asks for 9: using 5" in err, err[-2000:]
    trial_list = trials(sqlite_url, "hand")
    assert finished(trial_list) == 5, counts(trial_list)
    assert counts(trial_list) == {"COMPLETE": 5}
    assert_distinct_configs(trial_list)


@pytest.mark.slow
def test_a_budget_grows_but_never_shrinks(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    path = write_spec(study={"name": "grow"}, n_trials=3)
    assert procs.run("run", str(path), "--workers", "0", "--n-trials", "4").returncode == 0

    shrink = procs.run("run", str(path), "--workers", "0", "--n-trials", "2")

    assert shrink.returncode == 2
    assert "--n-trials: study 'grow' has a budget of 4 trials; it can grow, not shrink" in (
        shrink.stderr
    )
    assert study_budget(sqlite_url, "grow") == 4
    # the spec's own n_trials (3) neither shrinks nor raises it
    assert procs.run("run", str(path), "--workers", "0").returncode == 0
    assert study_budget(sqlite_url, "grow") == 4


@pytest.mark.slow
def test_a_discrete_space_is_searched_without_repeats_until_exhausted(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    """Three configs exist (none, standard at 0.1 or 0.2). The random sampler proposes
    finished ones again; those trials fail before training, marked, and are sampled anew; a
    budget beyond the space stops the worker with a message instead of spinning."""
    search = {
        "regularization.dropout.kind": {"choices": ["none", "standard"]},
        "regularization.dropout.hidden_rate": {"choices": [0.1, 0.2]},
    }
    path = write_spec(
        study={"name": "small"},
        search=search,
        sampler={"name": "random", "seed": 3},
        pruner={"name": "none"},
        n_trials=3,
    )

    assert procs.run("run", str(path)).returncode == 0

    trial_list = trials(sqlite_url, "small")
    assert finished(trial_list) == 3
    assert_distinct_configs(trial_list)
    for trial in trial_list:
        if trial.state.name == "FAIL":  # only duplicates fail here, and none was trained
            assert DUPLICATE_ATTR in trial.user_attrs
            assert (
                "droptune.history" not in trial.user_attrs
                or not trial.user_attrs["droptune.history"]
            )

    more = procs.run("run", str(path), "--n-trials", "4")

    assert more.returncode == 1
    assert "the search space looks exhausted" in more.stderr
    assert finished(trials(sqlite_url, "small")) == 3


def test_trial_seeded_sampler_streams_depend_on_the_trial_number_only() -> None:
    def build() -> optuna.Study:
        sampler = TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), 5)
        return optuna.create_study(sampler=sampler)

    one, other = build(), build()
    for _ in range(3):  # `other` skips trials 0-2: it is a second process joining late
        one.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    other.enqueue_trial({"x": 0.5})
    for _ in range(3):
        other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    # a rebuilt sampler replays nothing: trial n draws from (seed, n) whoever asks
    again = build()
    again.add_trials(one.trials)
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    xs = [t.params["x"] for t in one.trials]
    assert len(set(xs)) == 3
    assert again.trials[3].params["x"] not in xs
    assert other.trials[1].params["x"] == one.trials[1].params["x"]


def test_baseline_params_keep_what_the_search_can_take() -> None:
    spec = spec_from_dict(
        merge(
            TINY,
            {
                "regularization": {"max_norm": None, "l2": {"strength": 1.0e-3}},
                "search": {
                    "regularization.dropout.kind": {"choices": ["gaussian", "alpha"]},
                    "regularization.dropout.hidden_rate": {"low": 0.3, "high": 0.5},
                    "regularization.dropout.input_rate": {"low": 0.0, "high": 0.3},
                    "regularization.l2.strength": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
                    "regularization.max_norm": {"choices": [None, 2.0, 4.0]},
                    "regularization.early_stopping.patience": {"low": 2, "high": 8, "type": "int"},
                },
            },
        )
    )
    # kind 'standard' is not a choice, hidden_rate 0.2 is below the range, patience is null:
    # left out, so the baseline trial keeps the spec's values there.
    assert baseline_params(spec, spec.base) == {
        "regularization.dropout.input_rate": 0.1,
        "regularization.l2.strength": 1.0e-3,
        "regularization.max_norm": None,
    }


def test_baseline_is_enqueued_once_and_can_be_turned_off(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    spec = spec_from_dict(merge(TINY, {"storage": sqlite_url}))
    for _ in range(2):  # a second process joining does not enqueue it again
        study = create_study(spec, sqlite_url, "with")
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs for t in waiting] == [{BASELINE_ATTR: True}]

    off = spec_from_dict(merge(TINY, {"storage": sqlite_url, "study": {"baseline": False}}))
    assert create_study(off, sqlite_url, "without").get_trials() == []


class _Trainer:
    """What PruningCallback reads of a Trainer after a validation epoch."""

    sanity_checking = False
    current_epoch = 0
    callback_metrics: dict[str, float] = {"val_loss": 5.0}  # noqa: RUF012


def test_the_baseline_trial_is_never_pruned() -> None:
    study = optuna.create_study(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0)
    )
    for _ in range(3):
        trial = study.ask()
        trial.report(0.1, step=0)
        study.tell(trial, 0.1)
    study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True})
    baseline = study.ask()
    PruningCallback(baseline, "val_loss").on_validation_end(_Trainer(), None)  # type: ignore[arg-type]
    other = study.ask()
    with pytest.raises(optuna.TrialPruned):
        PruningCallback(other, "val_loss").on_validation_end(_Trainer(), None)  # type: ignore[arg-type]


def test_a_release_decided_on_an_old_row_never_frees_a_new_claim(sqlite_url: str) -> None:
    """The race that let a study finish more trials than its budget: worker B reads a slot
    whose trial failed and decides to free it; meanwhile its owner A frees it itself, claims
    it again and binds a new trial; B's release must not free A's new claim."""
    from droptune.study.slots import Slots

    Path(sqlite_url.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    slots = Slots(sqlite_url, "race")
    try:
        slots.ensure(1)
        assert slots.claim("A") == 0
        slots.bind(0, "A", 1)
        seen = slots.rows()[0]  # B: trial 1 FAILed, free its slot
        assert slots.release(0, "A")  # A does it first
        assert slots.claim("A") == 0
        unbound = slots.rows()[0]

        # B, deciding on the old row, while A's new claim is not bound yet, then bound
        assert not slots.release(0, "A", trial_number=seen.trial_number)
        # an orphan release needs the claim to be older than the cutoff it decided on
        assert not slots.release(0, "A", claimed_before=unbound.claimed_at - 30)
        slots.bind(0, "A", 2)
        assert not slots.release(0, "A", trial_number=seen.trial_number)

        row = slots.rows()[0]
        assert (row.owner, row.trial_number) == ("A", 2)
        # a release decided on the current row still works
        assert slots.release(0, "A", trial_number=2)
    finally:
        slots.close()


@pytest.mark.slow
def test_exact_counts_hold_while_many_duplicates_are_refused(
    procs: Procs, write_spec: SpecWriter, sqlite_url: str
) -> None:
    """kind none has no rates: every later 'none' the random sampler proposes is a duplicate,
    failed before training and sampled anew, by 8 workers at once. The study still ends with
    exactly its budget, every finished trial bound to one slot (this found a slot race)."""
    n = 100
    path = write_spec(
        study={"name": "dups"},
        train={"max_epochs": 1},
        search={
            "regularization.dropout.kind": {"choices": ["none", "standard"]},
            "regularization.dropout.hidden_rate": {"low": 0.0, "high": 0.5},
        },
        sampler={"name": "random", "seed": 0},
        n_trials=n,
    )

    result = procs.run("run", str(path), "--workers", "8", timeout=580)

    assert result.returncode == 0, result.stderr[-3000:]
    trial_list = trials(sqlite_url, "dups")
    assert finished(trial_list) == n, counts(trial_list)
    # (Distinct configs are not asserted here: two of 8 workers that sample 'none' at the same
    # moment, before either has written its params, both run it; see FinishedConfigs.)
    failed = [t for t in trial_list if t.state.name == "FAIL"]
    assert failed and all(DUPLICATE_ATTR in t.user_attrs for t in failed)
    from droptune.study.slots import Slots

    slots = Slots(sqlite_url, "dups")
    try:
        bound = sorted(r.trial_number for r in slots.rows())
    finally:
        slots.close()
    done = sorted(t.number for t in trial_list if t.state.name in ("COMPLETE", "PRUNED"))
    assert bound == done


def test_no_partial_baseline_for_samplers_that_learn_their_space_from_finished_trials(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "db").mkdir()
    # TINY searches l2.strength on a log range; the spec's value (0) is outside it
    spec = spec_from_dict(merge(TINY, {"storage": sqlite_url, "sampler": {"name": "cmaes"}}))
    study = create_study(spec, sqlite_url, "cma")
    assert study.get_trials() == []
    assert "regularization.l2.strength" in caplog.text and "no baseline trial" in caplog.text
    full = spec_from_dict(
        merge(
            TINY,
            {
                "storage": sqlite_url,
                "sampler": {"name": "cmaes"},
                "regularization": {"l2": {"strength": 1.0e-4}},
            },
        )
    )
    assert len(create_study(full, sqlite_url, "cma-full").get_trials()) == 1


def test_a_diverged_candidate_is_never_the_confirmed_best() -> None:
    from droptune.study.confirm import Candidate
    from droptune.study.confirm import pick_best

    for direction in ("minimize", "maximize"):
        diverged = Candidate(0, 0.1, [float("nan"), 0.2])
        fine = [Candidate(1, 0.2, [0.5, 0.6]), Candidate(2, 0.3, [0.4, 0.45])]
        best = pick_best([diverged, *fine], direction)
        assert best.trial == (2 if direction == "minimize" else 1)


def test_a_study_from_an_earlier_droptune_keeps_the_budget_its_slots_say(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Made before budgets were recorded: slots for 7 trials and two finished trials, no
    budget row. Joining it records 7 (not the spec's 3) and enqueues no baseline."""
    from droptune.storage import open_storage
    from droptune.study.slots import Slots

    (tmp_path / "db").mkdir()
    old = optuna.create_study(study_name="old", storage=open_storage(sqlite_url))
    for value in (1.0, 2.0):
        old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    slots = Slots(sqlite_url, "old")
    try:
        slots.ensure(7)
    finally:
        slots.close()
    spec = spec_from_dict(merge(TINY, {"storage": sqlite_url, "n_trials": 3}))

    study = create_study(spec, sqlite_url, "old")

    assert study_budget(sqlite_url, "old") == 7
    assert len(study.trials) == 2  # no baseline enqueued into a study that has trials
