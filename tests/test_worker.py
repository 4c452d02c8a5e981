"""The worker pool (kongtask.open_worker) against a real PostgreSQL.

Rules: handlers hold >= 20 ms and log their start and end, so overlaps and wake-ups are
visible; no sleeps to wait for results (events, or polling under an absolute
``fail_after``); every test checks afterwards that no connection of ours is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from _worker_helpers import gw_template as gw_template, worker_dsn as worker_dsn

import kongtask
from kongtask._pg import Database, open_database

log = logging.getLogger("tests.worker")
S = "graphile_worker"
J = f"{S}._private_jobs"
JQ = f"{S}._private_job_queues"
HOLD = 0.02


@pytest.fixture
async def tdb(worker_dsn: str) -> AsyncIterator[Database]:
    # the test's own connections carry another application_name, so that "no kongtask
    # connection left" can be checked through them
    async with open_database(
        worker_dsn, server_settings={"application_name": "kongtask-test"}
    ) as d:
        yield d


@dataclass
class Recorder:
    """Handlers that record (job id, start, end) and hold for HOLD seconds."""

    intervals: list[tuple[int, str | None, float, float]] = field(default_factory=list)
    events: list[kongtask.Event] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def handler(self, job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        start = time.monotonic()
        ctx.logger.info("start")
        await trio.sleep(HOLD)
        ctx.logger.info("end")
        self.intervals.append((job.id, job.queue_name, start, time.monotonic()))

    def on_event(self, event: kongtask.Event) -> None:
        self.events.append(event)
        self.changed.set()

    def names(self, name: str) -> list[kongtask.Event]:
        return [e for e in self.events if e.name == name]


async def wait_until(pred: Callable[[], Any], limit: float = 10) -> None:
    """Poll ``pred`` (sync or async) until truthy, at most ``limit`` seconds."""
    with trio.fail_after(limit):
        while True:
            value = pred()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await trio.sleep(0.01)


async def jobs_left(db: Database) -> int:
    return int(await db.fetchval(f"select count(*) from {J}"))


async def assert_clean(db: Database) -> None:
    """No lock held, no kongtask connection left."""
    locked = await db.fetchval(f"select count(*) from {J} where locked_by is not null")
    qlocked = await db.fetchval(f"select count(*) from {JQ} where locked_by is not null")
    assert (locked, qlocked) == (0, 0)

    async def no_connections() -> bool:
        n = await db.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'kongtask' "
            "and datname = current_database()"
        )
        return n == 0

    # the server reaps a closed session asynchronously (STACK.md P5)
    await wait_until(no_connections, limit=5)


async def test_sql_jobs_run_exactly_once(tdb: Database, worker_dsn: str) -> None:
    threads_before = threading.active_count()
    rec = Recorder()
    await tdb.execute(
        f"select {S}.add_job('t', json_build_object('i', i)) from generate_series(1, 30) i"
    )
    async with kongtask.open_worker(
        worker_dsn, {"t": rec.handler}, concurrency=4, on_event=rec.on_event
    ) as w:
        assert w.pool_id.startswith("pool-")
        assert len(w.pool_id) == 23
        await wait_until(lambda: len(rec.intervals) == 30)
        await wait_until(lambda: w.statistics().completed == 30)
    assert sorted(i[0] for i in rec.intervals) == sorted(set(i[0] for i in rec.intervals))
    assert await jobs_left(tdb) == 0
    assert [e.name for e in rec.events][:1] == ["pool:create"]
    assert rec.events[-1].name == "stop"
    assert len(rec.names("job:success")) == 30
    # concurrency 4 was used, but never more
    points = sorted(
        [(s, 1) for _, _, s, _ in rec.intervals] + [(e, -1) for _, _, _, e in rec.intervals]
    )
    level = peak = 0
    for _, d in points:
        level += d
        peak = max(peak, level)
    assert 2 <= peak <= 4
    await assert_clean(tdb)
    assert threading.active_count() <= threads_before
