"""The worker pool (kongtask.open_worker) against a real PostgreSQL.

Rules: handlers hold >= 20 ms and log their start and end, so overlaps and wake-ups are
visible; no sleeps to wait for results (events, or polling under an absolute
``fail_after``); every test checks afterwards that no connection of ours is left.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import trio

import kongtask
from kongtask._migrate import migrate
from kongtask._pg import Database, open_database
from kongtask._sql import WorkerQueries
from kongtask.testing import WorkerTiming

log = logging.getLogger("tests.worker")
S = "graphile_worker"
J = f"{S}._private_jobs"
JQ = f"{S}._private_job_queues"
HOLD = 0.02


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
        return bool(n == 0)

    # the server ends a closed session asynchronously
    # (docs/design/stack.md#server-side-cancel-is-asynchronous)
    await wait_until(no_connections, limit=5)


async def test_sql_jobs_run_exactly_once(tdb: Database, worker_dsn: str) -> None:
    threads_before = threading.active_count()
    rec = Recorder()
    await tdb.execute(
        f"select {S}.add_job('t', json_build_object('i', i)) from generate_series(1, 30) i"
    )
    running = peak = 0
    four_running = trio.Event()

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            four_running.set()
        try:
            await four_running.wait()  # the first four wait for each other: 4 at once
            await rec.handler(job, ctx)
        finally:
            running -= 1

    async with kongtask.open_worker(
        worker_dsn, {"t": handler}, concurrency=4, on_event=rec.on_event
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
    # concurrency 4 was used (the first four met), but never more
    assert peak == 4
    await assert_clean(tdb)
    assert threading.active_count() <= threads_before


async def pool_connections(db: Database) -> int:
    return int(
        await db.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'kongtask' "
            "and datname = current_database()"
        )
    )


async def test_client_jobs_and_ctx_helpers(tdb: Database, worker_dsn: str) -> None:
    seen: list[tuple[str, object]] = []
    done = trio.Event()

    async def count_jobs(conn: Any, task: str) -> int:  # asyncio side (ctx.with_connection)
        return int(
            await conn.fetchval(f"select count(*) from {S}.jobs where task_identifier = $1", task)
        )

    async def parent(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ctx.logger.info("start")
        await trio.sleep(HOLD)
        seen.append(("parent", job.payload))
        await ctx.add_job("child", {"from": job.id})
        seen.append(("count", await ctx.with_connection(count_jobs, "child")))
        ctx.logger.info("end")

    def child(job: kongtask.Job, ctx: kongtask.JobContext) -> None:  # sync: runs in a thread
        log.info("child %d start", job.id)
        time.sleep(HOLD)
        seen.append(("child", threading.current_thread() is not threading.main_thread()))
        trio.from_thread.run_sync(done.set)

    async with kongtask.open_client(worker_dsn) as client:
        await client.add_job("parent", {"n": 1})
    async with kongtask.open_worker(worker_dsn, {"parent": parent, "child": child}) as w:
        with trio.fail_after(10):
            await done.wait()
        await wait_until(lambda: w.statistics().completed == 2)
    assert seen == [("parent", {"n": 1}), ("count", 1), ("child", True)]
    # trio may keep an idle worker thread cached; none is still running a handler
    assert not [th.name for th in threading.enumerate() if th.name.startswith("kongtask")]
    assert await jobs_left(tdb) == 0
    await assert_clean(tdb)


async def test_failure_backoff_and_permanent_failure(tdb: Database, worker_dsn: str) -> None:
    rec = Recorder()

    async def fails(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.sleep(HOLD)
        raise ValueError("boom")

    job_id = await tdb.fetchval(f"select id from {S}.add_job('f', max_attempts => 2)")
    before = await tdb.fetchval("select now()")
    async with kongtask.open_worker(worker_dsn, {"f": fails}, on_event=rec.on_event) as w:
        await wait_until(lambda: w.statistics().failed == 1)
        after = await tdb.fetchval("select now()")
        row = await tdb.fetchrow(f"select * from {J} where id = $1", job_id)
        assert row is not None
        assert row["attempts"] == 1
        assert row["locked_by"] is None
        assert row["last_error"].startswith("boom\n")
        assert "ValueError: boom" in row["last_error"]  # traceback summary
        assert "in fails" in row["last_error"]
        # run_at = greatest(now, run_at) + exp(1) s, now being the moment of failure
        assert (
            before + timedelta(seconds=math.e) <= row["run_at"] <= after + timedelta(seconds=math.e)
        )
        assert not rec.names("job:failed")
        # make it due again at once, and wake the worker
        await tdb.execute(f"update {J} set run_at = now() where id = $1", job_id)
        await tdb.execute("""select pg_notify('jobs:insert', '{"count":1}')""")
        await wait_until(lambda: w.statistics().failed == 2)
    row = await tdb.fetchrow(f"select * from {J} where id = $1", job_id)
    assert row is not None
    assert (row["attempts"], row["max_attempts"], row["locked_by"]) == (2, 2, None)
    assert [e["job"].id for e in rec.names("job:failed")] == [job_id]  # type: ignore[attr-defined]
    assert len(rec.names("job:error")) == 2
    await assert_clean(tdb)


async def test_priority_order_and_future_run_at(tdb: Database, worker_dsn: str) -> None:
    rec = Recorder()
    run_at = await tdb.fetchval("select now() + interval '1.5 seconds'")
    future = await tdb.fetchval(f"select id from {S}.add_job('t', run_at => $1)", run_at)
    ids = [
        await tdb.fetchval(f"select id from {S}.add_job('t', priority => $1)", p)
        for p in (5, -3, 0, 2, -1)
    ]
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, poll_interval=0.2) as w:
        await wait_until(lambda: len(rec.intervals) == 5)
        order = [i[0] for i in rec.intervals]
        assert order == [ids[1], ids[4], ids[2], ids[3], ids[0]]
        await wait_until(lambda: len(rec.intervals) == 6)
        assert rec.intervals[-1][0] == future
        started_at = await tdb.fetchval("select now()")
        assert started_at >= run_at
        await wait_until(lambda: w.statistics().completed == 6)
    await assert_clean(tdb)


async def test_forbidden_flags_are_skipped(tdb: Database, worker_dsn: str) -> None:
    rec = Recorder()
    flagged = await tdb.fetchval(f"select id from {S}.add_job('t', flags => array['gpu'])")
    other = await tdb.fetchval(f"select id from {S}.add_job('t', flags => array['cpu'])")
    plain = await tdb.fetchval(f"select id from {S}.add_job('t')")
    async with kongtask.open_worker(
        worker_dsn, {"t": rec.handler}, forbidden_flags=["gpu"], poll_interval=0.1
    ) as w:
        await wait_until(lambda: w.statistics().completed == 2)
    assert sorted(i[0] for i in rec.intervals) == sorted([other, plain])
    row = await tdb.fetchrow(f"select attempts, locked_by from {J} where id = $1", flagged)
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (0, None)
    # a callable is asked before each claim
    async with kongtask.open_worker(
        worker_dsn, {"t": rec.handler}, forbidden_flags=lambda: []
    ) as w:
        await wait_until(lambda: w.statistics().completed == 1)
    assert rec.intervals[-1][0] == flagged
    await assert_clean(tdb)


async def test_job_key_update_is_seen(tdb: Database, worker_dsn: str) -> None:
    payloads: list[object] = []

    async def h(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.sleep(HOLD)
        payloads.append(job.payload)

    await tdb.execute(
        f"select {S}.add_job('k', '{{\"v\": 1}}', job_key => 'K', "
        "run_at => now() + interval '1 hour')"
    )
    async with kongtask.open_worker(worker_dsn, {"k": h}, poll_interval=3600) as w:
        # the replacement brings the job forward and changes the payload
        await w.add_job("k", {"v": 2}, job_key="K")
        await wait_until(lambda: w.statistics().completed == 1)
    assert payloads == [{"v": 2}]
    assert await jobs_left(tdb) == 0
    await assert_clean(tdb)


async def test_notify_wakes_an_idle_worker(tdb: Database, worker_dsn: str) -> None:
    started = trio.Event()

    async def h(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started.set()
        await trio.sleep(HOLD)

    async with kongtask.open_worker(worker_dsn, {"t": h}, poll_interval=3600) as w:
        # let the first (empty) claim happen, so only the notification can wake the pool
        await wait_until(lambda: w.statistics().fetcher == "waiting for jobs")  # found none
        await tdb.execute(f"select {S}.add_job('t')")
        with trio.fail_after(20):  # far below the 3600 s poll: only the NOTIFY can do it
            await started.wait()
        await wait_until(lambda: w.statistics().completed == 1)
    await assert_clean(tdb)


async def test_shutdown_cancels_running_and_returns_unstarted(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    running = trio.Event()

    async def slow(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        log.info("slow %d start", job.id)
        running.set()
        await trio.sleep_forever()

    slow_id = await tdb.fetchval(f"select id from {S}.add_job('slow', queue_name => 'q')")
    queued_id = await tdb.fetchval(f"select id from {S}.add_job('slow', queue_name => 'q')")
    t0 = 0.0
    async with kongtask.open_worker(
        worker_dsn, {"slow": slow}, on_event=rec.on_event, grace=0.3
    ) as w:
        with trio.fail_after(5):
            await running.wait()
        t0 = trio.current_time()
    elapsed = trio.current_time() - t0
    # not cancelled before the grace ran out (a lower bound: trio never cancels early);
    # that a job ending within the grace completes is tested in test_promises.py
    assert elapsed >= 0.3
    rows = {r["id"]: r for r in await tdb.fetch(f"select * from {J}")}
    assert rows[slow_id]["attempts"] == 1
    assert rows[slow_id]["last_error"] == "Worker pool is shutting down gracefully"
    assert rows[queued_id]["attempts"] == 0  # never claimed: one job per queue
    assert rec.names("pool:gracefulShutdown")
    assert w.statistics().running == 0
    await assert_clean(tdb)


async def test_unstarted_claimed_jobs_are_returned(tdb: Database, worker_dsn: str) -> None:
    gate = trio.Event()
    started: list[int] = []

    async def h(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started.append(job.id)
        await gate.wait()

    await tdb.execute(f"select {S}.add_job('t') from generate_series(1, 5)")
    # claim four ahead of the busy worker, as a high job rate would
    ahead = WorkerTiming(min_prefetch=4)
    async with kongtask.open_worker(worker_dsn, {"t": h}, concurrency=1, timing=ahead) as w:
        await wait_until(lambda: started)
        await wait_until(lambda: w.statistics().queued_locally == 4)
        counts = await tdb.fetchval(f"select count(*) from {J} where locked_by = $1", w.pool_id)
        assert counts == 5
        gate.set()
        await w.shutdown(grace=5)
    rows = await tdb.fetch(f"select attempts, locked_by from {J}")
    # the running job finished; the others came back with their attempt undone (or ran)
    assert all(r["attempts"] == 0 and r["locked_by"] is None for r in rows)
    assert w.statistics().completed + len(rows) == 5
    await assert_clean(tdb)


async def test_breaking_migration_notification_stops_with_57(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, on_event=rec.on_event) as w:
        await wait_until(lambda: rec.names("pool:listen:success"))
        await tdb.execute(
            """select pg_notify('worker:migrate', '{"migrationNumber":21,"breaking":true}')"""
        )
        with trio.fail_after(5):
            await w.wait_stopped()
        assert w.exit_code == 57
    await assert_clean(tdb)


async def test_non_breaking_migration_notification_is_ignored(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, on_event=rec.on_event) as w:
        await wait_until(lambda: rec.names("pool:listen:success"))
        await tdb.execute(
            """select pg_notify('worker:migrate', '{"migrationNumber":21,"breaking":false}')"""
        )
        await tdb.execute(f"select {S}.add_job('t')")
        await wait_until(lambda: w.statistics().completed == 1)
        assert not w.stopping
        assert w.exit_code is None


async def test_migrating_another_schema_of_the_database_does_not_stop_the_pool(
    tdb: Database, worker_dsn: str
) -> None:
    # worker:migrate is one channel per database: installing a second schema announces
    # its breaking migrations (1, 3, 11, ...) to every pool listening there
    rec = Recorder()
    async with kongtask.open_worker(
        worker_dsn, {"t": rec.handler}, on_event=rec.on_event, poll_interval=3600
    ) as w:
        await wait_until(lambda: rec.names("pool:listen:success"))
        await migrate(tdb, "another_app_jobs")
        # delivered on the pool's LISTEN connection after the migration's notices
        await tdb.execute(f"select {S}.add_job('t')")
        await wait_until(lambda: w.statistics().completed == 1)
        assert not w.stopping
        assert w.exit_code is None


async def test_batch_job_partial_failure_and_timeout(tdb: Database, worker_dsn: str) -> None:
    async def batch(job: kongtask.Job, ctx: kongtask.JobContext) -> list[Exception | None]:
        await trio.sleep(HOLD)
        return [None if x % 2 == 0 else ValueError(f"odd {x}") for x in job.payload]

    async def wrong_length(job: kongtask.Job, ctx: kongtask.JobContext) -> list[None]:
        await trio.sleep(HOLD)
        return [None]

    async def hangs(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.sleep_forever()

    b = await tdb.fetchval(f"select id from {S}.add_job('batch', '[1, 2, 3, 4, 5]')")
    await tdb.execute(f"select {S}.add_job('wrong', '[1, 2, 3]')")
    h = await tdb.fetchval(f"select id from {S}.add_job('hangs')")
    tasks: dict[str, Callable[..., Any] | kongtask.TaskSpec] = {
        "batch": batch,
        "wrong": wrong_length,
        "hangs": kongtask.task(hangs, timeout=0.2),
    }
    async with kongtask.open_worker(worker_dsn, tasks, concurrency=3) as w:
        await wait_until(lambda: w.statistics().completed == 1 and w.statistics().failed == 2)
    rows = {
        r["id"]: r for r in await tdb.fetch(f"select id, payload::text as p, last_error from {J}")
    }
    assert set(rows) == {b, h}
    assert rows[b]["p"] == "[1, 3, 5]"
    assert rows[b]["last_error"] == "Batch failures:\nodd 1\nodd 3\nodd 5"
    assert rows[h]["last_error"].startswith("timed out after 0.2 s")
    await assert_clean(tdb)


async def test_raising_event_callback_does_not_kill_the_pool(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()

    def bad(event: kongtask.Event) -> None:
        raise RuntimeError("observer bug")

    await tdb.execute(f"select {S}.add_job('t') from generate_series(1, 3)")
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, on_event=bad) as w:
        await wait_until(lambda: w.statistics().completed == 3)
    await assert_clean(tdb)


async def test_unknown_tasks_are_never_claimed_and_once_mode(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    other = await tdb.fetchval(f"select id from {S}.add_job('not_ours')")
    await tdb.execute(f"select {S}.add_job('t', queue_name => 'q') from generate_series(1, 3)")
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, once=True) as w:
        assert w.pool_id.startswith("otpool-")
        with trio.fail_after(10):
            await w.wait_stopped()
    assert len(rec.intervals) == 3
    rows = await tdb.fetch(f"select id, attempts from {J}")
    assert [(r["id"], r["attempts"]) for r in rows] == [(other, 0)]
    await assert_clean(tdb)


async def test_body_error_still_cleans_up(tdb: Database, worker_dsn: str) -> None:
    running = trio.Event()

    async def slow(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        running.set()
        await trio.sleep_forever()

    job_id = await tdb.fetchval(f"select id from {S}.add_job('slow')")
    with pytest.raises(KeyError):  # noqa: PT012  (the block is the point)
        async with kongtask.open_worker(worker_dsn, {"slow": slow}):
            with trio.fail_after(5):
                await running.wait()
            raise KeyError("user bug")
    row = await tdb.fetchrow(f"select attempts, last_error from {J} where id = $1", job_id)
    assert row is not None
    assert (row["attempts"], row["last_error"]) == (1, "Worker pool is shutting down gracefully")
    await assert_clean(tdb)


async def kongtask_backends(db: Database) -> list[str]:
    """The last statement of each kongtask backend of ``db``'s database."""
    rows = await db.fetch(
        "select query from pg_stat_activity where application_name = 'kongtask' "
        "and datname = current_database()"
    )
    return [r["query"] for r in rows]


async def test_the_claim_loop_goes_on_with_the_connection_the_start_warmed_up(
    tdb: Database, worker_dsn: str
) -> None:
    """The start opens the claiming connection and warms the claim up on it beside the
    task registration; the claim loop then claims on that same connection."""
    claim = WorkerQueries(S).claim
    rec = Recorder()
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, poll_interval=3600) as w:
        await wait_until(lambda: w.statistics().fetcher == "waiting for jobs")
        # one backend ran the claim: the warmed-up one was not left aside for a new one
        last = await kongtask_backends(tdb)
        assert len([q for q in last if q and claim.startswith(q)]) == 1, last
        await tdb.execute(f"select {S}.add_job('t')")
        await wait_until(lambda: w.statistics().completed == 1)
    await assert_clean(tdb)


async def test_a_failed_start_leaves_no_connection(
    kongtask_blank_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No schema and no migration: the start fails while the claiming connection waits
    for the schema check to warm up; that connection is closed with the others."""
    with pytest.raises(kongtask.KongtaskError, match="is not installed"):
        async with kongtask.open_worker(
            kongtask_blank_dsn, {"t": Recorder().handler}, migrate=False
        ):
            raise AssertionError("not reached")
    async with open_database(
        kongtask_blank_dsn, server_settings={"application_name": "kongtask-test"}
    ) as observer:

        async def no_connections() -> bool:
            return not await kongtask_backends(observer)

        await wait_until(no_connections, limit=5)


async def test_a_pool_whose_start_installs_the_schema_is_not_stopped_by_it(
    kongtask_blank_dsn: str,
) -> None:
    """The install announces its breaking migrations on ``worker:migrate``; the start
    listens there only once its own migrations are done, so the pool runs on."""
    rec = Recorder()
    async with kongtask.open_worker(kongtask_blank_dsn, {"t": rec.handler}) as w:
        await w.add_job("t", {})
        await wait_until(lambda: w.statistics().completed == 1)
        assert not w.stopping
    assert w.exit_code is None


async def test_listen_connection_is_reestablished(tdb: Database, worker_dsn: str) -> None:
    rec = Recorder()
    async with kongtask.open_worker(
        worker_dsn, {"t": rec.handler}, poll_interval=3600, on_event=rec.on_event
    ) as w:
        await wait_until(lambda: rec.names("pool:listen:success"))
        killed = await tdb.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = 'kongtask' and datname = current_database() "
            "and query ilike 'listen%'"
        )
        assert killed == 1
        await wait_until(lambda: len(rec.names("pool:listen:success")) == 2)
        assert rec.names("pool:listen:error")
        await wait_until(lambda: w.statistics().fetcher == "waiting for jobs")
        await tdb.execute(f"select {S}.add_job('t')")
        await wait_until(lambda: len(rec.intervals) == 1, limit=2)
        await wait_until(lambda: w.statistics().completed == 1)
    await assert_clean(tdb)


async def test_lost_connections_lose_no_job_and_run_none_twice(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    await tdb.execute(
        f"select {S}.add_job('t', json_build_object('i', i)) from generate_series(1, 200) i"
    )
    async with kongtask.open_worker(worker_dsn, {"t": rec.handler}, concurrency=8) as w:
        await wait_until(lambda: w.statistics().completed >= 40)
        # every connection of the pool dies: fetcher's, completer's, LISTEN's
        await tdb.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where application_name = 'kongtask' and datname = current_database()"
        )
        await wait_until(lambda: w.statistics().completed == 200, limit=30)
    ids = [i[0] for i in rec.intervals]
    assert len(ids) == len(set(ids)) == 200  # each ran once: an outcome is never dropped
    assert await jobs_left(tdb) == 0
    await assert_clean(tdb)


async def test_claimed_jobs_waiting_past_the_ttl_are_returned(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    gate = trio.Event()
    started: list[int] = []

    async def h(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started.append(job.id)
        await gate.wait()

    await tdb.execute(f"select {S}.add_job('t') from generate_series(1, 5)")
    # claim four ahead of the busy worker, as a high job rate would
    ahead = WorkerTiming(min_prefetch=4)
    async with kongtask.open_worker(
        worker_dsn, {"t": h}, local_queue_ttl=0.3, on_event=rec.on_event, timing=ahead
    ) as w:
        await wait_until(lambda: started)
        await wait_until(lambda: w.statistics().queued_locally == 4)
        # nobody starts them: after the TTL they go back to the table for other pools
        await wait_until(lambda: [e for e in rec.names("job:returned") if e["reason"] == "ttl"])
        returned = rec.names("job:returned")[0]["job_ids"]
        assert len(returned) == 4  # type: ignore[arg-type]
        assert started[0] not in returned  # type: ignore[operator]
        gate.set()
        await wait_until(lambda: w.statistics().completed == 5)
    await assert_clean(tdb)


async def test_crontab_is_scheduled_and_no_prepared_statements(
    tdb: Database, worker_dsn: str
) -> None:
    from kongtask._liveness import is_marked_pool_id

    rec = Recorder()
    items = kongtask.crontab("* * * * * t ?id=every_minute")
    await tdb.execute(f"select {S}.add_job('t') from generate_series(1, 3)")
    async with kongtask.open_worker(
        worker_dsn, {"t": rec.handler}, crontab=items, prepared_statements=False
    ) as w:
        # behind pgBouncer no session lock can be held, so the id carries no marker
        assert not is_marked_pool_id(w.pool_id)
        await wait_until(lambda: w.statistics().completed == 3)

        async def registered() -> bool:
            n = await tdb.fetchval(
                f"select count(*) from {S}._private_known_crontabs "
                "where identifier = 'every_minute'"
            )
            return bool(n)

        await wait_until(registered)
    await assert_clean(tdb)


async def test_nul_in_an_error_message_does_not_poison_the_batch(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()

    async def nul(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.sleep(HOLD)
        raise ValueError("bad\x00byte")

    bad = await tdb.fetchval(f"select id from {S}.add_job('nul')")
    await tdb.execute(f"select {S}.add_job('t') from generate_series(1, 5)")
    async with kongtask.open_worker(worker_dsn, {"nul": nul, "t": rec.handler}, concurrency=6) as w:
        await wait_until(lambda: w.statistics().completed == 5 and w.statistics().failed == 1)
    row = await tdb.fetchrow(f"select last_error from {J} where id = $1", bad)
    assert row is not None
    assert row["last_error"].startswith("bad\\0byte")
    await assert_clean(tdb)


async def test_job_cancel_scope_cancels_only_its_own_job(tdb: Database, worker_dsn: str) -> None:
    """Workers share a cancel scope between jobs: each kind of cancellation must end
    exactly its job, and the same worker (concurrency 1) must run the next one fine."""
    kept: list[kongtask.JobContext] = []
    ran: list[str] = []

    async def cancels_itself(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append("self")
        ctx.cancel_scope.cancel()
        assert ctx.cancel_scope.cancel_called
        await trio.lowlevel.checkpoint()  # delivers it
        ran.append("not reached")

    async def cancels_and_returns(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append("returns")
        ctx.cancel_scope.cancel()  # no checkpoint afterwards: the handler completes

    async def keeps_context(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append("keeps")
        kept.append(ctx)

    async def nursery_in_handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append("nursery")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            ctx.cancel_scope.cancel()  # arrives wrapped in an exception group

    async def times_out(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append("timeout")
        assert ctx.cancel_scope.deadline < math.inf
        await trio.sleep_forever()

    async def after(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        # a context kept from an earlier job must not reach this one
        for old in kept:
            old.cancel_scope.cancel()
            assert not old.cancel_scope.cancel_called
        assert ctx.cancel_scope.deadline == math.inf  # the timeout did not stay behind
        await trio.sleep(HOLD)
        ran.append("after")

    names = ["self", "returns", "keeps", "nursery", "timeout", "after"]
    ids = {}
    for priority, name in enumerate(names):
        ids[name] = await tdb.fetchval(
            f"select id from {S}.add_job($1, priority => $2, max_attempts => 1)", name, priority
        )
    tasks: dict[str, Callable[..., Any] | kongtask.TaskSpec] = {
        "self": cancels_itself,
        "returns": cancels_and_returns,
        "keeps": keeps_context,
        "nursery": nursery_in_handler,
        "timeout": kongtask.task(times_out, timeout=0.1),
        "after": after,
    }
    async with kongtask.open_worker(worker_dsn, tasks, concurrency=1) as w:
        await wait_until(lambda: w.statistics().completed + w.statistics().failed == 6)
    assert ran == ["self", "returns", "keeps", "nursery", "timeout", "after"]
    rows = {r["id"]: r["last_error"] for r in await tdb.fetch(f"select id, last_error from {J}")}
    assert rows == {
        ids["self"]: "Job was cancelled",
        ids["nursery"]: "Job was cancelled",
        ids["timeout"]: "timed out after 0.1 s",
    }
    assert (w.statistics().completed, w.statistics().failed) == (3, 3)
    await assert_clean(tdb)
