"""Worker-level lifecycle properties: real pools, random job mixes, random shutdowns.

Rules: fixed seeds; each scenario waits at most ``patience`` (1 s) for its shutdown point,
below the first retry delay (2.7 s), so a job that runs twice is always a bug.
"""

from __future__ import annotations

import pytest
from hypothesis import given, seed, settings

from kongtask.testing.lifecycle import (
    ScenarioJob,
    WorkerHarness,
    WorkerScenario,
    open_worker_harness,
    worker_scenarios,
)


@pytest.fixture
def harness(kongtask_dsn: str) -> object:
    with open_worker_harness(kongtask_dsn) as h:
        yield h


def test_random_mixes_and_shutdowns(harness: WorkerHarness) -> None:
    @seed(424242)
    @settings(max_examples=20, deadline=None, database=None)
    @given(worker_scenarios())
    def check(scenario: WorkerScenario) -> None:
        harness.check(scenario)

    check()
    assert harness.scenarios >= 20


def test_hung_serial_queue_is_failed_and_its_sibling_kept(harness: WorkerHarness) -> None:
    """A fixed scenario: the hang blocks its queue, shutdown fails it, the sibling waits."""
    harness.check(
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
