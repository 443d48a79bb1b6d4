"""droptune.timing: exclusive per-thread accounting of a trial's time by category."""

from __future__ import annotations

import threading
import time

import pytest

from droptune import timing


def test_nested_blocks_count_for_themselves_and_not_for_the_phase_they_interrupt() -> None:
    # each block's wall time measured next to the switches, so that a loaded machine's late
    # wake-ups change the expected values, not the verdict
    start = timing.snapshot()
    t0 = time.perf_counter()
    timing.phase("train")
    time.sleep(0.05)
    a = time.perf_counter()
    with timing.timed("storage"):
        time.sleep(0.05)
        b = time.perf_counter()
        with timing.timed("tracking"):  # e.g. MLflow inside a storage call
            time.sleep(0.05)
        c = time.perf_counter()
        with timing.timed("storage"):  # re-entered: still storage, counted once
            time.sleep(0.05)
    d = time.perf_counter()
    time.sleep(0.05)
    e = time.perf_counter()
    timing.phase("other")
    spent = timing.since(start)
    tolerance = 0.01  # each block lasts >= 0.05 s: a block counted twice or wrongly is off more
    assert spent["storage"] == pytest.approx(d - a - (c - b), abs=tolerance)
    assert spent["tracking"] == pytest.approx(c - b, abs=tolerance)
    assert spent["train"] == pytest.approx((a - t0) + (e - d), abs=tolerance)
    assert spent["setup"] == 0.0
    # exclusive: the categories add up to the window's wall time
    parts = sum(spent[key] for key in timing.CATEGORIES)
    assert spent["total"] == pytest.approx(parts, abs=1e-3)
    assert spent["total"] == pytest.approx(e - t0, abs=tolerance)


def test_a_block_that_raises_gives_the_thread_back_its_category() -> None:
    start = timing.snapshot()
    timing.phase("setup")
    with pytest.raises(RuntimeError), timing.timed("storage"):
        raise RuntimeError("boom")
    time.sleep(0.05)
    timing.phase("other")
    spent = timing.since(start)
    assert spent["setup"] >= 0.05
    assert spent["storage"] < spent["setup"]


def test_threads_keep_their_own_accounts() -> None:
    start = timing.snapshot()
    seen: dict[str, float] = {}

    def other_thread() -> None:
        begin = timing.snapshot()
        with timing.timed("tracking"):
            time.sleep(0.08)
        seen.update(timing.since(begin))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen["tracking"] >= 0.07
    assert timing.since(start)["tracking"] == 0.0


def test_shares_sums_and_summaries() -> None:
    start = timing.snapshot()
    a = time.perf_counter()
    with timing.timed("train"):
        time.sleep(0.04)
    b = time.perf_counter()
    share = timing.since(start, share=4)
    assert share["train"] == pytest.approx((b - a) / 4, abs=0.002)
    both = timing.add(share, {"train": 1.0, "total": 1.0})
    assert both["train"] == pytest.approx(share["train"] + 1.0)
    assert both["total"] == pytest.approx(share["total"] + 1.0)
    attrs = [
        {timing.TIMING_ATTR: {"setup": 1.0, "train": 3.0, "total": 4.0}},
        {timing.TIMING_ATTR: {"setup": 3.0, "train": 1.0, "storage": 0.002, "total": 4.002}},
        {"droptune.seed": 1},  # a trial without timing (e.g. from an older droptune)
    ]
    mean = timing.summarize(attrs)
    assert mean is not None
    assert mean["trials"] == 2 and mean["setup"] == 2.0 and mean["train"] == 2.0
    line = timing.summary_line(attrs)
    assert line is not None
    assert "mean of 2" in line and "setup 2.0 s" in line and "storage 1.0 ms" in line
    assert "MLflow 0.0 ms" in line
    assert timing.summarize([{}]) is None and timing.summary_line([]) is None


def test_an_unknown_category_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'gpu'.*setup, train, storage, tracking, other"):
        timing.phase("gpu")
