"""Mistakes that used to pass in silence: a handler that cannot take ``(job, ctx)``, jobs
that no pool runs, a batch added in reverse order.

Rules: real PostgreSQL; no sleeps to wait for a result.
"""

from __future__ import annotations

import functools
import itertools
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
from _worker_helpers import add_job_row
from test_worker import assert_clean

import kongtask
from kongtask._config import quote_ident
from kongtask._events import EventEmitter
from kongtask._migrate import migrate, own_function_statement, refresh_own_bodies, render_sql
from kongtask._outage import OutageLog
from kongtask._pg import Database
from kongtask._sql import WorkerQueries
from kongtask._worker._claim_sizing import ClaimSizer
from kongtask._worker._fetcher import FetchWakeup, TaskRegistry
from kongtask._worker._housekeeping import Housekeeping, watch_unsupported_tasks
from kongtask.testing import WorkerTiming

S = "graphile_worker"
J = f"{S}._private_jobs"
#: Nothing listens here: a pool that got as far as connecting would fail differently.
NOWHERE = "postgresql://nobody@127.0.0.1:9/nothing?connect_timeout=1"


async def takes_job_and_ctx(job: Any, ctx: Any) -> None: ...


def takes_more(job: Any, ctx: Any, extra: int = 1, *rest: Any, flag: bool = False) -> None: ...


def takes_anything(*args: Any, **kwargs: Any) -> None: ...


def needs_a_prefix(prefix: str, job: Any, ctx: Any) -> None: ...


def takes_job_only(job: Any) -> None: ...


async def takes_nothing() -> None: ...


def needs_a_keyword(job: Any, ctx: Any, *, required: str) -> None: ...


class CallableHandler:
    async def __call__(self, job: Any, ctx: Any) -> None: ...


class CallableWithoutArgs:
    def __call__(self) -> None: ...


ACCEPTED: dict[str, Any] = {
    "async def": takes_job_and_ctx,
    "defaults and *rest": takes_more,
    "*args": takes_anything,
    "partial": functools.partial(needs_a_prefix, "p"),
    "callable object": CallableHandler(),
    "builtin without a signature": max,
    "task() wrapper": kongtask.task(takes_job_and_ctx, timeout=5),
}

REJECTED: dict[str, tuple[Any, str]] = {
    "one parameter": (takes_job_only, "too many positional arguments"),
    "no parameter": (takes_nothing, "too many positional arguments"),
    "required keyword": (needs_a_keyword, "missing a required argument: 'required'"),
    "partial binding too much": (
        functools.partial(needs_a_prefix, "p", "job"),
        "too many positional arguments",
    ),
    "callable object": (CallableWithoutArgs(), "too many positional arguments"),
    "task() wrapper": (kongtask.task(takes_job_only, timeout=5), "too many positional"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
async def test_a_handler_that_cannot_take_job_and_ctx_is_refused_at_start(case: str) -> None:
    handler, reason = REJECTED[case]
    tasks = {"fine": takes_job_and_ctx, "the_bad_one": handler}
    with pytest.raises(kongtask.ConfigError) as caught:
        async with kongtask.open_worker(NOWHERE, tasks):
            raise AssertionError("not reached")
    message = str(caught.value)
    assert "'the_bad_one'" in message
    assert "handler(job, ctx)" in message
    assert reason in message


async def test_handlers_that_can_take_job_and_ctx_are_accepted() -> None:
    # they pass the check, so the pool gets as far as connecting (and fails there)
    with pytest.raises(Exception) as caught:
        async with kongtask.open_worker(NOWHERE, ACCEPTED):
            raise AssertionError("not reached")
    assert not isinstance(caught.value, kongtask.ConfigError), caught.value


# --- ready jobs that no pool supports ---------------------------------------------------


async def test_ready_jobs_of_unsupported_tasks_are_reported(
    tdb: Database, worker_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    for _ in range(3):
        await add_job_row(tdb, "nobody_runs_this", run_at=long_ago)
    await add_job_row(tdb, "nor_this", run_at=long_ago)
    # not reported: just added (another pool may take it in a moment), in the future,
    # locked by some pool, permanently failed, or a task of this pool
    await add_job_row(tdb, "fresh")
    await add_job_row(tdb, "later", run_at=datetime(2999, 1, 1, tzinfo=UTC))
    locked = await add_job_row(tdb, "locked_elsewhere", run_at=long_ago)
    failed = await add_job_row(tdb, "failed_for_good", run_at=long_ago)
    await tdb.execute(
        f"update {J} set locked_at = now(), locked_by = 'pool-elsewhere' where id = $1", locked
    )
    await tdb.execute(f"update {J} set attempts = max_attempts where id = $1", failed)

    async def ours(job: Any, ctx: Any) -> None: ...

    async with kongtask.open_worker(
        worker_dsn, {"ours": ours}, forbidden_flags=["never"], poll_interval=60
    ) as worker:
        ours_id = await add_job_row(tdb, "ours", run_at=long_ago, flags=["never"])
        check = await unsupported_task_check(tdb, worker.pool_id, ["ours"])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kongtask.worker"):
            found = await check.report_unsupported_tasks()
        assert found == {"nobody_runs_this": 3, "nor_this": 1}
        [record] = [r for r in caplog.records if "does not support" in r.getMessage()]
        text = record.getMessage()
        assert "4 ready job(s)" in text
        assert "nobody_runs_this (3), nor_this (1)" in text
        # once they are gone, nothing is reported
        await tdb.execute(
            f"delete from {J} where task_id in (select id from {S}._private_tasks "
            "where identifier in ('nobody_runs_this', 'nor_this'))"
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kongtask.worker"):
            assert await check.report_unsupported_tasks() == {}
        assert not [r for r in caplog.records if "does not support" in r.getMessage()]
    await tdb.execute(f"delete from {J} where id = any($1)", [locked, ours_id])
    await assert_clean(tdb)


async def test_the_unsupported_task_check_runs_rarely(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """First after 60-120 s, then every 270-330 s: a warning at most every few minutes."""
    calls: list[float] = []

    async def report() -> dict[str, int]:
        calls.append(trio.current_time())
        return {}

    with trio.move_on_after(60 + 120 + 4 * 330):
        await watch_unsupported_tasks(report)
    assert 60 <= calls[0] <= 120
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(gaps) >= 3
    assert all(270 <= gap <= 330 for gap in gaps)


async def test_a_pool_without_tasks_does_not_watch_for_unsupported_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cron-only pool knows no task to compare: it starts no watch."""
    started: list[object] = []

    class Nursery:
        def start_soon(self, fn: object, *args: object) -> None:
            started.append(fn)

    with_tasks = Housekeeping(None, None, "pool-x", **_housekeeping_parts(["t"]))  # type: ignore[arg-type]
    with_tasks.start(Nursery())  # type: ignore[arg-type]
    assert watch_unsupported_tasks in started
    started.clear()
    without = Housekeeping(None, None, "pool-x", **_housekeeping_parts([]))  # type: ignore[arg-type]
    without.start(Nursery())  # type: ignore[arg-type]
    assert started
    assert watch_unsupported_tasks not in started


def _housekeeping_parts(identifiers: list[str], db: Any = None) -> dict[str, Any]:
    pool_id = "pool-test"
    return {
        "schema": "graphile_worker",
        "tasks": TaskRegistry(db, WorkerQueries("graphile_worker"), identifiers),
        "wakeup": FetchWakeup(ClaimSizer(1, 1, lookahead=0.1)),
        "events": EventEmitter(None, pool_id),
        "outage": OutageLog(logging.getLogger("kongtask.worker"), pool_id),
        "timing": WorkerTiming(),
    }


async def unsupported_task_check(db: Database, pool_id: str, ours: list[str]) -> Housekeeping:
    """The check for unsupported tasks of a pool that runs ``ours``."""
    parts = _housekeeping_parts(ours, db)
    await parts["tasks"].register()
    return Housekeeping(db, WorkerQueries("graphile_worker"), pool_id, **parts)


# --- add_jobs keeps the batch's order ------------------------------------------------------

BATCH_SQL = """
select (j.payload->>'n')::int as n, j.id
from {s}.add_jobs(array(
  select ('t', json_build_object('n', i), $1::text, null, null, null, null, null)::{s}.job_spec
  from generate_series(0, 4) as i order by i
)) as j
"""
IN_ORDER = ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
BACKWARDS = ([4, 3, 2, 1, 0], [4, 3, 2, 1, 0])


async def _batch_order(
    db: Database, queue: str | None, schema: str = S
) -> tuple[list[int], list[int]]:
    """``n`` of a batch 0..4 in the order add_jobs returned them, and in id order."""
    rows = await db.fetch(BATCH_SQL.format(s=quote_ident(schema)), queue)
    return [r["n"] for r in rows], [r["n"] for r in sorted(rows, key=lambda r: r["id"])]


async def _add_jobs_body(db: Database, schema: str = S) -> str:
    body = await db.fetchval(
        "select p.prosrc from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
        "where n.nspname = $1 and p.proname = 'add_jobs'",
        schema,
    )
    assert isinstance(body, str)
    return body


@pytest.mark.oracle
@pytest.mark.parametrize("queue", ["q", None])
async def test_add_jobs_keeps_the_batch_order_unlike_graphile_worker(
    db: Database, gw_db: Database, queue: str | None
) -> None:
    # graphile-worker 0.18.0 inserts (and returns) the batch backwards
    assert await _batch_order(gw_db, queue) == BACKWARDS
    assert await _batch_order(db, queue) == IN_ORDER


async def test_client_add_jobs_into_one_queue_runs_in_batch_order(
    db: Database, kongtask_dsn: str
) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        jobs = await client.add_jobs(
            [kongtask.JobSpec("t", {"n": n}, queue_name="q") for n in range(5)]
        )
    assert [job.payload["n"] for job in jobs] == [0, 1, 2, 3, 4]
    ran: list[int] = []

    async def t(job: kongtask.Job, ctx: Any) -> None:
        ran.append(job.payload["n"])

    async with kongtask.open_worker(kongtask_dsn, {"t": t}, once=True) as worker:
        await worker.wait_stopped()
    assert ran == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("schema", [S, 'Odd $"kongtask" Schema'])
async def test_migrate_updates_an_older_kongtask_add_jobs_body(db: Database, schema: str) -> None:
    """A database migrated by an earlier kongtask (body without the ordering) gets the
    current body from ``migrate``; the migrations table is not touched."""
    if schema != S:
        await migrate(db, schema)
    statement, body = own_function_statement("add_jobs")
    older = statement.replace("with ordinality as spec", "spec").replace(
        "        order by spec.ordinality\n", ""
    )
    assert older.count("ordinality") == 0
    assert "-- kongtask" in older
    await db.execute(render_sql(older, schema))
    assert await _batch_order(db, "q", schema) == BACKWARDS  # what the older body did
    migrations = await db.fetch(f"select * from {quote_ident(schema)}.migrations order by id")
    await migrate(db, schema)
    assert await _batch_order(db, "q", schema) == IN_ORDER
    assert await _add_jobs_body(db, schema) == body.replace(
        ":GRAPHILE_WORKER_SCHEMA", quote_ident(schema)
    )
    assert await db.fetch(f"select * from {quote_ident(schema)}.migrations order by id") == (
        migrations
    )
    assert await db.with_connection(refresh_own_bodies, schema) == []  # up to date now


@pytest.mark.oracle
async def test_migrate_leaves_graphile_workers_own_body_alone(gw_db: Database) -> None:
    before = await _add_jobs_body(gw_db)
    assert "kongtask" not in before
    await migrate(gw_db)
    assert await _add_jobs_body(gw_db) == before
    assert await _batch_order(gw_db, "q") == BACKWARDS


async def test_migrate_skips_the_update_when_a_newer_revision_is_installed(
    db: Database,
) -> None:
    statement, _ = own_function_statement("add_jobs")
    older = statement.replace("with ordinality as spec", "spec").replace(
        "        order by spec.ordinality\n", ""
    )
    await db.execute(render_sql(older, S))
    # a newer graphile-worker (non-breaking revision 21) may have its own add_jobs
    await db.execute(f"insert into {S}.migrations (id, breaking) values (21, false)")
    await migrate(db)
    assert "ordinality" not in await _add_jobs_body(db)
