"""Time logic of the worker without a database, under trio's MockClock (autojump).

Rules: no database here (autojump would also jump over real I/O); exact time assertions.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import trio
import trio.testing

from kongtask._worker import (
    Worker,
    _JobSlot,
    _runners,
    failure_delay,
    listen_reconnect_delay,
    parse_insert_count,
    retry_delay,
)


def make_worker(**overrides: Any) -> Worker:
    options: dict[str, Any] = {
        "concurrency": 4,
        "poll_interval": 2.0,
        "batch_size": 500,
        "forbidden_flags": None,
        "on_event": None,
        "crontab": None,
        "grace": 5.0,
        "local_queue_ttl": 300.0,
        "once": False,
        "marked": True,
    }
    options.update(overrides)
    return Worker(None, "graphile_worker", _runners({"t": lambda job, ctx: None}), **options)  # type: ignore[arg-type]


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

    class Stub:
        async def _sweep_once(self) -> None:
            times.append(trio.current_time())

    with trio.move_on_after(4000):
        await Worker._sweeper(Stub())  # type: ignore[arg-type]
    assert 0 <= times[0] < 60
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 6
    assert all(480 <= g < 600 for g in gaps)
    assert len(set(gaps)) > 1  # jittered


async def test_grace_deadline_and_forceful_second_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = make_worker(grace=5.0)
    await trio.sleep(10)
    w.shutdown_nowait()
    assert w.stopping
    assert w._grace_deadline == 15.0
    scope = trio.CancelScope(deadline=w._grace_deadline)
    w._grace_scope = scope
    await trio.sleep(1)
    w.shutdown_nowait(grace=30)  # a longer grace never extends the first
    assert w._grace_deadline == 15.0
    w.shutdown_nowait(grace=0)  # the second signal: now
    assert w._grace_deadline == scope.deadline == 11.0


async def test_claim_size_tracks_capacity_and_job_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = make_worker(concurrency=4, batch_size=500)
    # idle, no rate known: claim exactly the free slots
    assert w._claim_size() == 4
    # all four running: nothing to claim, a refill is due when a quarter (one) is free
    w._running = {i: _JobSlot() for i in range(4)}
    assert w._claim_size() == 0
    assert w._refill_below == 3
    # a high job rate adds a prefetch (0.1 s of work), capped by batch_size
    w._started = 0
    await trio.sleep(1)
    w._started = 3000
    size = w._claim_size()
    assert size == 300  # 3000 jobs/s * 0.1 s, workers busy
    w._started = 1_000_000
    await trio.sleep(1)
    assert w._claim_size() == 500
