"""Time logic of the worker without a database, under trio's MockClock (autojump).

Rules: no database here (autojump would also jump over real I/O); exact time assertions.
"""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing

from kongtask._events import EventEmitter
from kongtask._worker._claim_sizing import ClaimSizer
from kongtask._worker._housekeeping import run_stale_sweeps
from kongtask._worker._lifecycle import Lifecycle
from kongtask._worker._timing import (
    WorkerTiming,
    failure_delay,
    listen_reconnect_delay,
    parse_insert_count,
    retry_delay,
)

LOOKAHEAD = WorkerTiming().prefetch_lookahead


def test_failure_delay_follows_exp_of_attempts_capped_at_10() -> None:
    assert failure_delay(1) == pytest.approx(2.718, abs=1e-3)
    assert failure_delay(5) == pytest.approx(148.4, abs=0.1)
    assert failure_delay(10) == failure_delay(25) == pytest.approx(22026.47, abs=0.01)


def test_retry_delay_is_capped_with_jitter() -> None:
    assert retry_delay(0, lambda: 0.0) == pytest.approx(0.05)
    assert retry_delay(0, lambda: 1.0) == pytest.approx(0.1)
    assert retry_delay(3, lambda: 1.0) == pytest.approx(0.8)
    assert retry_delay(50, lambda: 1.0) == 10.0
    assert retry_delay(50, lambda: 0.0) == 5.0


def test_listen_reconnect_delay_matches_graphile_worker() -> None:
    assert listen_reconnect_delay(0, lambda: 0.0) == 0.025
    assert listen_reconnect_delay(0, lambda: 1.0) == 0.05
    assert listen_reconnect_delay(2, lambda: 1.0) == math.ceil(50 * math.e**2) / 1000
    assert listen_reconnect_delay(100, lambda: 1.0) == 60.0


def test_parse_insert_count() -> None:
    assert parse_insert_count("") == 1
    assert parse_insert_count(None) == 1
    assert parse_insert_count("not json") == 1
    assert parse_insert_count('{"r":0.5,"count":7}') == 7
    assert parse_insert_count('{"r":0.5,"count":-1}') == -1
    assert parse_insert_count('{"count":"many"}') == 1
    assert parse_insert_count("[1]") == 1


async def test_sweep_schedule(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []

    async def sweep_once() -> None:
        times.append(trio.current_time())

    with trio.move_on_after(4000):
        await run_stale_sweeps(sweep_once)
    assert 0 <= times[0] < 60
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 6
    assert all(480 <= g < 600 for g in gaps)
    assert len(set(gaps)) > 1  # jittered


def test_timing_retry_delay_is_capped_by_its_setting() -> None:
    assert WorkerTiming().retry_delay(50) <= 10.0
    assert WorkerTiming(retry_cap=0.01).retry_delay(50) <= 0.01
    assert WorkerTiming(retry_cap=0.01).retry_delay(50) >= 0.005


async def test_grace_deadline_and_forceful_second_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lifecycle = Lifecycle("pool-test", EventEmitter(None, "pool-test"), default_grace=5.0)
    await trio.sleep(10)
    lifecycle.request_stop()
    assert lifecycle.stopping
    assert lifecycle.stop_requested.is_set()
    assert lifecycle.grace_deadline == 15.0
    scope = lifecycle.grace_scope()
    assert scope.deadline == 15.0
    await trio.sleep(1)
    lifecycle.request_stop(grace=30)  # a longer grace never extends the first
    assert lifecycle.grace_deadline == scope.deadline == 15.0
    lifecycle.request_stop(grace=0)  # the second signal: now
    assert lifecycle.grace_deadline == scope.deadline == 11.0


async def test_the_first_exit_code_asked_for_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lifecycle = Lifecycle("pool-test", EventEmitter(None, "pool-test"), default_grace=5.0)
    assert lifecycle.exit_code is None
    lifecycle.request_stop(exit_code=57)
    lifecycle.request_stop(exit_code=1)
    assert lifecycle.exit_code == 57


def test_claim_size_tracks_capacity_and_job_rate() -> None:
    sizer = ClaimSizer(4, 500, lookahead=LOOKAHEAD)
    # idle, no rate known: claim exactly the free slots
    assert sizer.size(0.0, started=0, in_flight=0, idle_worker_waits=True) == 4
    # all four running: nothing to claim, a refill is due when a quarter (one) is free
    assert sizer.size(0.0, started=0, in_flight=4, idle_worker_waits=False) == 0
    assert sizer.refill_below == 3
    # a high job rate adds a prefetch (0.1 s of work), capped by batch_size
    size = sizer.size(1.0, started=3000, in_flight=4, idle_worker_waits=False)
    assert size == 300  # 3000 jobs/s * 0.1 s, workers busy
    assert sizer.size(2.0, started=1_003_000, in_flight=4, idle_worker_waits=False) == 500


def test_claim_size_follows_a_falling_rate_with_a_short_memory() -> None:
    sizer = ClaimSizer(1, 10_000, lookahead=LOOKAHEAD)
    sizer.size(1.0, started=10_000, in_flight=1, idle_worker_waits=False)
    assert sizer.rate == 10_000  # up at once
    sizer.size(1.1, started=10_000, in_flight=1, idle_worker_waits=False)
    assert sizer.rate == pytest.approx(5_000)  # halfway down after half the memory
    sizer.size(1.5, started=10_000, in_flight=1, idle_worker_waits=False)
    assert sizer.rate == 0


def test_claim_size_keeps_the_minimum_prefetch() -> None:
    sizer = ClaimSizer(1, 40, lookahead=LOOKAHEAD, min_prefetch=40)
    assert sizer.size(0.0, started=0, in_flight=0, idle_worker_waits=True) == 40
    # a small deficit waits for a quarter of the target to be free, unless a worker idles
    assert sizer.size(0.0, started=0, in_flight=40, idle_worker_waits=False) == 0
    assert sizer.size(0.0, started=0, in_flight=40, idle_worker_waits=True) == 1
