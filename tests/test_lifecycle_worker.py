"""Worker-level lifecycle properties: real pools, random job mixes, random shutdowns.

Rules: every scenario reaches its shutdown point through the pool's own progress (a
scenario that does not is a failure); the scenarios' jobs have max_attempts 1, so a job
that runs twice is always a bug; and each test asserts that it saw the handler starts and
the outcomes it is about, so a pool that runs nothing cannot pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings

from kongtask.testing.lifecycle import (
    ScenarioJob,
    WorkerHarness,
    WorkerScenario,
    open_worker_harness,
    worker_scenarios,
)


@pytest.fixture
def harness(kongtask_dsn: str) -> Iterator[WorkerHarness]:
    # a scenario of at most 8 jobs reaches its shutdown point in well under a second
    with open_worker_harness(kongtask_dsn, progress_timeout=15) as h:
        yield h


def test_random_mixes_and_shutdowns(harness: WorkerHarness) -> None:
    # starts the scenarios that stop after a number of starts owe (how many more happen
    # before a shutdown lands depends on timing; a "quiet" scenario's starts are checked
    # by the harness itself)
    owed = 0

    @settings(max_examples=20, deadline=None, database=None)
    @given(worker_scenarios())
    def check(scenario: WorkerScenario) -> None:
        nonlocal owed
        result = harness.check(scenario)
        if result.stop == "starts":
            owed += scenario.stop_after_starts

    check()
    assert harness.scenarios >= 20
    # every kind of end and both kinds of shutdown point were exercised
    assert all(harness.totals[kind] > 0 for kind in harness.totals), harness.totals
    assert owed > 0
    assert harness.totals["starts"] >= owed, (owed, harness.totals)


def test_hung_serial_queue_is_failed_and_its_sibling_kept(harness: WorkerHarness) -> None:
    """The hang blocks its queue, the shutdown fails it, its queue sibling never starts, and
    the jobs without a queue run to their ends."""
    result = harness.check(
        WorkerScenario(
            jobs=(
                ScenarioJob("wq1", "hang", -1),
                ScenarioJob("wq1", "ok"),
                ScenarioJob(None, "raise"),
                ScenarioJob(None, "ok"),
            ),
            concurrency=4,
            stop_after_starts=3,
            grace=0.0,
        )
    )
    assert result.stop == "quiet"
    assert result.starts == 3
    assert result.fates == {0: "cancelled", 1: "never started", 2: "raise", 3: "ok"}
    hung, sibling, raised, done = (result.rows[i] for i in range(4))
    assert hung is not None
    assert hung["attempts"] == 1
    assert hung["last_error"].startswith("Worker pool is shutting down gracefully")
    assert sibling is not None
    assert (sibling["attempts"], sibling["last_error"]) == (0, None)
    assert raised is not None
    assert raised["attempts"] == 1
    assert raised["last_error"].startswith("boom 2")
    assert done is None
