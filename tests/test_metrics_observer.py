"""The metrics observer's per-job path: what each job start and end adds to a task's
counters and histograms, on jobs built as the worker builds them, with a stepped clock.

The end-to-end view (scraped over HTTP from a running pool) is in test_ops_http.py.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

import kongtask._metrics
from kongtask._job import Job
from kongtask._metrics import BUCKETS, PoolMetrics

NOW = 1_800_000_000.0  # the fake wall clock's start (seconds since the epoch)


class Clock:
    """A wall clock the test sets (what ``time.time`` returns in kongtask._metrics)."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(kongtask._metrics, "time", SimpleNamespace(time=fake))
    return fake


def claimed(task: str = "t", *, run_at: float = NOW, attempts: int = 1, **row: Any) -> Job:
    """A job as the worker's claim builds it (run_at as epoch microseconds)."""
    base = {
        "id": 1, "queue_name": None, "payload": "{}", "flags": None, "priority": 0,
        "attempts": attempts, "max_attempts": 3, "key": None, "last_error": None,
        "locked_by": "pool", "revision": 0, "run_at_us": int(run_at * 1e6),
        "created_at_us": 0, "updated_at_us": 0, "locked_at_us": 0,
    }  # fmt: skip
    base.update(row)
    return Job.from_claim(base, task)


def bucket_of(seconds: float) -> int:
    """The index of the histogram bucket ``seconds`` belongs to (le bounds, +Inf last)."""
    return next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))


def test_started_and_completed_follow_the_histograms(clock: Clock) -> None:
    metrics = PoolMetrics()
    first, second = claimed(), claimed(id=2)
    started_first = metrics.job_started(first)
    started_second = metrics.job_started(second)
    counts = metrics._tasks["t"]
    assert (counts.started, counts.completed, counts.failed) == (2, 0, 0)  # both running
    clock.now += 0.2
    metrics.job_ended(first, started_first, None, "")
    assert (counts.started, counts.completed, counts.failed) == (2, 1, 0)
    metrics.job_ended(second, started_second, RuntimeError("no"), "RuntimeError: no")
    assert (counts.started, counts.completed, counts.failed) == (2, 1, 1)
    assert counts.permanently_failed == 0  # attempt 1 of 3
    last = claimed(id=3, attempts=3)
    metrics.job_ended(last, metrics.job_started(last), None, "Error: again")
    assert (counts.started, counts.completed, counts.failed) == (3, 1, 2)
    assert counts.permanently_failed == 1
    assert sum(counts.run_buckets) == 3


@pytest.mark.parametrize(
    "took", [0.0, 0.0005, BUCKETS[0], 0.0011, 0.003, 0.2, 7.0, 4000.0], ids=str
)
def test_run_time_lands_in_its_bucket(clock: Clock, took: float) -> None:
    metrics = PoolMetrics()
    job = claimed()
    started = metrics.job_started(job)
    clock.now += took
    took = clock.now - NOW  # as the float clock measures it
    metrics.job_ended(job, started, None, "")
    counts = metrics._tasks["t"]
    expected = [0] * (len(BUCKETS) + 1)
    expected[bucket_of(took)] = 1
    assert counts.run_buckets == expected
    assert counts.run_sum == took


def test_a_clock_stepped_back_during_a_run_counts_zero_seconds(clock: Clock) -> None:
    metrics = PoolMetrics()
    job = claimed()
    started = metrics.job_started(job)
    clock.now -= 30.0  # the wall clock was stepped back while the job ran
    metrics.job_ended(job, started, None, "")
    counts = metrics._tasks["t"]
    assert counts.run_buckets[0] == 1
    assert counts.run_sum == 0.0
    assert counts.completed == 1


def test_queue_wait_from_the_claimed_row(clock: Clock) -> None:
    metrics = PoolMetrics()
    metrics.job_started(claimed(run_at=NOW - 7200.0))  # due two hours ago
    metrics.job_started(claimed(run_at=NOW - 0.02))
    metrics.job_started(claimed(run_at=NOW + 5.0))  # claimed early: no negative wait
    counts = metrics._tasks["t"]
    assert counts.wait_buckets[len(BUCKETS)] == 1  # +Inf: over an hour
    assert counts.wait_buckets[bucket_of(0.02)] == 1
    assert counts.wait_buckets[0] == 1
    assert counts.wait_sum == pytest.approx(7200.02, abs=1e-5)


def test_queue_wait_of_a_job_not_built_from_a_claimed_row(clock: Clock) -> None:
    row = {
        "id": 1, "payload": "{}", "priority": 0, "attempts": 1, "max_attempts": 3,
        "key": None, "flags": None, "last_error": None, "locked_by": None, "revision": 0,
        "run_at": datetime.fromtimestamp(NOW, UTC) - timedelta(seconds=90),
        "created_at": datetime.fromtimestamp(NOW, UTC), "updated_at": None, "locked_at": None,
    }  # fmt: skip
    metrics = PoolMetrics()
    metrics.job_started(Job.from_record(row, "t", None))
    counts = metrics._tasks["t"]
    assert counts.wait_buckets[bucket_of(90.0)] == 1
    assert counts.wait_sum == pytest.approx(90.0, abs=1e-5)


def test_tasks_are_counted_apart(clock: Clock) -> None:
    metrics = PoolMetrics()
    for task in ("a", "b", "a"):
        job = claimed(task)
        metrics.job_ended(job, metrics.job_started(job), None, "")
    assert {t: c.completed for t, c in metrics._tasks.items()} == {"a": 2, "b": 1}


def test_the_observer_never_raises(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    metrics = PoolMetrics()
    broken = claimed(run_at_us="not a number")  # a row the claim would never return
    with caplog.at_level(logging.ERROR, logger="kongtask.metrics"):
        started = metrics.job_started(broken)
        metrics.job_ended(broken, "not a time", None, "")
    assert [r.message for r in caplog.records] == [
        "metrics: counting the start of job 1 failed",
        "metrics: counting the end of job 1 failed",
    ]
    assert isinstance(started, float)
