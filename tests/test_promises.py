"""Public promises of the worker API that had no test of their own (configuration checks,
environment defaults, events, statistics, thread timeouts, callback errors, the grace).

Rules: real PostgreSQL; events and row states, never elapsed times; every wait is an
event or a poll under an absolute ``fail_after``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import pytest
import trio
from test_worker import Recorder, assert_clean, wait_until

import kongtask
from kongtask._pg import Database
from kongtask.testing import WorkerTiming

S = "graphile_worker"
J = f"{S}._private_jobs"
JQ = f"{S}._private_job_queues"
#: Nothing listens here: a check that connected first would fail with a connection error.
NOWHERE = "postgresql://nobody@127.0.0.1:9/nothing"


async def noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    pass


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("concurrency", 0, "concurrency must be a positive integer"),
        ("concurrency", 2.0, "concurrency must be a positive integer"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("poll_interval", 0, "poll_interval must be positive"),
        ("poll_interval", float("nan"), "poll_interval must be positive"),
        ("max_pool_size", 0, "max_pool_size must be a positive integer"),
        ("grace", -1, "grace must be >= 0"),
        ("local_queue_ttl", 0, "local_queue_ttl > 0"),
    ],
)
async def test_open_worker_rejects_bad_options_before_connecting(
    option: str, value: Any, message: str
) -> None:
    with pytest.raises(kongtask.ConfigError, match=message):
        async with kongtask.open_worker(NOWHERE, {"t": noop}, **{option: value}):
            pytest.fail("the pool started")


async def _runs_a_job(tdb: Database, dsn: str | None) -> None:
    job_id = await tdb.fetchval(f"select id from {S}.add_job('env')")
    done = trio.Event()

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        assert job.id == job_id
        done.set()

    async with kongtask.open_worker(dsn, {"env": handler}):
        with trio.fail_after(10):
            await done.wait()
    assert await tdb.fetchval(f"select count(*) from {J}") == 0


async def test_database_url_then_pg_variables_are_the_default_dsn(
    tdb: Database, worker_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", worker_dsn)
    await _runs_a_job(tdb, None)

    monkeypatch.delenv("DATABASE_URL")
    url = urlsplit(worker_dsn)
    if url.hostname:
        monkeypatch.setenv("PGHOST", url.hostname)
    if url.port:
        monkeypatch.setenv("PGPORT", str(url.port))
    if url.username:
        monkeypatch.setenv("PGUSER", unquote(url.username))
    if url.password:
        monkeypatch.setenv("PGPASSWORD", unquote(url.password))
    monkeypatch.setenv("PGDATABASE", unquote(url.path.lstrip("/")))
    for part in url.query.split("&"):  # a socket folder travels as ?host=...
        key, _, value = part.partition("=")
        if key == "host":
            monkeypatch.setenv("PGHOST", unquote(value))
    await _runs_a_job(tdb, None)
    await assert_clean(tdb)


async def test_job_start_complete_and_pool_release_events(tdb: Database, worker_dsn: str) -> None:
    rec = Recorder()
    ok_id = await tdb.fetchval(f"select id from {S}.add_job('t')")
    bad_id = await tdb.fetchval(f"select id from {S}.add_job('t', '{{\"bad\": 1}}')")

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        if job.payload.get("bad"):
            raise ValueError("bad")

    async with kongtask.open_worker(worker_dsn, {"t": handler}, on_event=rec.on_event) as w:
        await wait_until(lambda: len(rec.names("job:complete")) == 2)
    starts = sorted(cast(kongtask.Job, e["job"]).id for e in rec.names("job:start"))
    completes = sorted(cast(kongtask.Job, e["job"]).id for e in rec.names("job:complete"))
    # job:complete follows every run, failed or not, once per job
    assert starts == completes == sorted([ok_id, bad_id])
    names = [e.name for e in rec.events]
    for job_id in (ok_id, bad_id):
        start = next(
            i
            for i, e in enumerate(rec.events)
            if e.name == "job:start" and cast(kongtask.Job, e["job"]).id == job_id
        )
        complete = next(
            i
            for i, e in enumerate(rec.events)
            if e.name == "job:complete" and cast(kongtask.Job, e["job"]).id == job_id
        )
        assert start < complete
    # pool:release once, after every job event and before stop
    assert names.count("pool:release") == 1
    assert names[-2:] == ["pool:release", "stop"]
    assert all(e["pool_id"] == w.pool_id for e in rec.events)
    await assert_clean(tdb)


async def test_second_shorter_shutdown_is_forceful_and_cancels_now(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()
    running = trio.Event()

    async def forever(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        running.set()
        await trio.sleep_forever()

    job_id = await tdb.fetchval(f"select id from {S}.add_job('f')")
    async with kongtask.open_worker(worker_dsn, {"f": forever}, on_event=rec.on_event) as w:
        with trio.fail_after(10):
            await running.wait()
        w.shutdown_nowait(grace=3600)
        await wait_until(lambda: rec.names("pool:gracefulShutdown"))
        assert not rec.names("pool:forcefulShutdown")
        w.shutdown_nowait(grace=0)
        with trio.fail_after(20):  # far below the first grace: the second call shortened it
            await w.wait_stopped()
    assert len(rec.names("pool:forcefulShutdown")) == 1
    row = await tdb.fetchrow(f"select attempts, last_error from {J} where id = $1", job_id)
    assert row is not None
    assert (row["attempts"], row["last_error"]) == (1, "Worker pool is shutting down gracefully")
    await assert_clean(tdb)


async def test_a_job_that_ends_within_the_grace_completes(tdb: Database, worker_dsn: str) -> None:
    rec = Recorder()
    release = trio.Event()
    running = trio.Event()

    async def waits(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        running.set()
        await release.wait()

    await tdb.execute(f"select {S}.add_job('w')")
    async with kongtask.open_worker(
        worker_dsn, {"w": waits}, on_event=rec.on_event, grace=3600
    ) as w:
        with trio.fail_after(10):
            await running.wait()
        w.shutdown_nowait()
        # the pool has handed back what it held and now waits out the grace period
        await wait_until(lambda: w.statistics().state == "grace")
        release.set()  # the job ends during the grace period
        with trio.fail_after(20):
            await w.wait_stopped()
    assert [e.name for e in rec.events if e.name.startswith("job:")] == [
        "job:start",
        "job:success",
        "job:complete",
    ]
    assert await tdb.fetchval(f"select count(*) from {J}") == 0
    await assert_clean(tdb)


async def test_a_failed_job_unlocks_its_named_queue(tdb: Database, worker_dsn: str) -> None:
    ran: list[str] = []
    second_ran = trio.Event()

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append(job.payload["n"])
        if job.payload["n"] == "first":
            raise RuntimeError("first fails")
        second_ran.set()

    first = await tdb.fetchval(
        f"""select id from {S}.add_job('q', '{{"n": "first"}}', queue_name => 'serial')"""
    )
    await tdb.execute(f"""select {S}.add_job('q', '{{"n": "second"}}', queue_name => 'serial')""")
    # a long poll: only the failure's own queue unlock (and its nudge) lets the second run
    async with kongtask.open_worker(worker_dsn, {"q": handler}, poll_interval=3600):
        with trio.fail_after(10):
            await second_ran.wait()
    assert ran == ["first", "second"]
    row = await tdb.fetchrow(f"select attempts, last_error from {J} where id = $1", first)
    assert row is not None
    assert row["attempts"] == 1
    assert row["last_error"].startswith("first fails")
    await assert_clean(tdb)


async def test_statistics_count_pending_writes(tdb: Database, worker_dsn: str) -> None:
    gate = trio.Event()

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await gate.wait()

    async def execute(conn: Any, sql: str, *args: object) -> None:
        await conn.execute(sql, *args)

    job_ids = [await tdb.fetchval(f"select id from {S}.add_job('t')") for _ in range(3)]
    async with kongtask.open_worker(worker_dsn, {"t": handler}, concurrency=3) as w:
        await wait_until(lambda: w.statistics().running == 3)
        assert w.statistics().pending_writes == 0
        blocker = await tdb.connect()
        try:
            # the completer's delete waits on these row locks: the outcomes stay pending
            await tdb.run(execute, blocker, "begin")
            await tdb.run(
                execute, blocker, f"select from {J} where id = any($1) for update", job_ids
            )
            gate.set()
            await wait_until(lambda: w.statistics().pending_writes == 3)
            assert w.statistics().completed == 0
            await tdb.run(execute, blocker, "commit")
        finally:
            await tdb.close_connection(blocker)
        await wait_until(lambda: w.statistics().completed == 3)
        assert w.statistics().pending_writes == 0
    assert await tdb.fetchval(f"select count(*) from {J}") == 0
    await assert_clean(tdb)


async def test_statistics_count_jobs_returned_at_shutdown(tdb: Database, worker_dsn: str) -> None:
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
        assert w.statistics().returned == 0
        gate.set()
        w.shutdown_nowait(grace=30)
        await w.wait_stopped()
    stats = w.statistics()
    assert stats.completed == len(started)
    assert stats.returned == 5 - len(started)
    assert await tdb.fetchval(f"select count(*) from {J} where attempts = 0") == stats.returned
    await assert_clean(tdb)


async def test_thread_handler_with_a_timeout_fails_when_it_runs_over(
    tdb: Database, worker_dsn: str
) -> None:
    rec = Recorder()

    def sync_handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        if job.payload.get("slow"):
            time.sleep(0.3)  # the behaviour under test: a thread that outlives its timeout

    slow = await tdb.fetchval(f"""select id from {S}.add_job('s', '{{"slow": true}}')""")
    await tdb.execute(f"select {S}.add_job('s')")
    async with kongtask.open_worker(
        worker_dsn, {"s": kongtask.task(sync_handler, timeout=0.1)}, on_event=rec.on_event
    ) as w:
        await wait_until(lambda: w.statistics().completed + w.statistics().failed == 2)
    assert w.statistics().failed == 1
    rows = await tdb.fetch(f"select id, last_error from {J}")
    assert [(r["id"], r["last_error"]) for r in rows] == [(slow, "timed out after 0.1 s")]
    (error,) = rec.names("job:error")
    assert isinstance(error["error"], TimeoutError)
    await assert_clean(tdb)


async def test_a_raising_event_callback_is_logged_and_the_pool_goes_on(
    tdb: Database, worker_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def on_event(event: kongtask.Event) -> None:
        seen.append(event.name)
        if event.name == "job:start":
            raise RuntimeError("observer bug")

    await tdb.execute(f"select {S}.add_job('t') from generate_series(1, 2)")
    with caplog.at_level(logging.ERROR, logger="kongtask.events"):
        async with kongtask.open_worker(worker_dsn, {"t": noop}, on_event=on_event) as w:
            await wait_until(lambda: w.statistics().completed == 2)
    records = [
        r for r in caplog.records if r.name == "kongtask.events" and "job:start" in r.getMessage()
    ]
    assert len(records) == 2
    assert all(r.exc_info is not None and "observer bug" in str(r.exc_info[1]) for r in records)
    assert seen.count("job:complete") == 2
    await assert_clean(tdb)
