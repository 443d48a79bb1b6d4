"""The background MLflow writer of population rounds: jobs run in order on one thread, a failing
job neither stops the thread nor reaches the caller, and drain/close wait for everything."""

from __future__ import annotations

import threading
import time

import pytest

from droptune.tracking._writer import TrackingWriter


def test_jobs_run_in_order_off_the_callers_thread_and_drain_waits() -> None:
    writer = TrackingWriter()
    done: list[int] = []
    threads: set[str] = set()

    def job(i: int) -> None:
        time.sleep(0.01)
        threads.add(threading.current_thread().name)
        done.append(i)

    for i in range(20):
        writer.submit(lambda i=i: job(i))
    assert len(done) < 20  # submit returns at once
    writer.drain()
    assert done == list(range(20))
    assert threads == {"droptune-tracking-writer"}
    writer.close()


def test_a_failing_job_is_logged_and_the_next_ones_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = TrackingWriter()
    done: list[str] = []

    def boom() -> None:
        raise RuntimeError("MLflow is down")

    writer.submit(boom)
    writer.submit(lambda: done.append("after"))
    writer.close()
    assert done == ["after"]
    assert "writing an MLflow run failed" in caplog.text


def test_close_writes_what_is_queued_and_can_start_again() -> None:
    writer = TrackingWriter()
    writer.close()  # never started: nothing to do
    done: list[int] = []
    for i in range(5):
        writer.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
    writer.close()
    assert done == list(range(5))
    writer.submit(lambda: done.append(5))
    writer.close()
    assert done == list(range(6))
