"""Everything that talks to PostgreSQL, through a real pgBouncer in transaction pooling.

The worker (``prepared_statements=False`` / ``--no-prepared-statements``), the trio
client, the producers (asyncpg, psycopg 3, psycopg2) and cron. Without a ``pgbouncer``
binary these tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio
from oracle import under_ci
from test_worker import wait_until

import kongtask
import kongtask.aio
from kongtask._client import open_client
from kongtask._cron import crontab
from kongtask._liveness import is_marked_pool_id
from kongtask._pg import Database, open_database
from kongtask._worker import open_worker
from kongtask.testing import PostgresServer
from kongtask.testing._pgbouncer import PgBouncer, find_pgbouncer, provide_pgbouncer

S = "graphile_worker"
J = f"{S}._private_jobs"


async def assert_unlocked(db: Database) -> None:
    """No job or queue left locked (pgBouncer keeps its server sessions open, so the
    count of sessions that the direct tests check says nothing here)."""
    locked = await db.fetchval(f"select count(*) from {J} where locked_by is not null")
    queues = await db.fetchval(
        f"select count(*) from {S}._private_job_queues where locked_by is not null"
    )
    assert (locked, queues) == (0, 0)


@pytest.fixture(scope="session")
def pgbouncer(kongtask_server: PostgresServer) -> Iterator[PgBouncer]:
    if find_pgbouncer() is None:
        reason = "no pgbouncer binary (Debian: apt-get install pgbouncer)"
        if under_ci():
            pytest.fail(f"{reason} (CI=true: the pgBouncer tests may not skip)", pytrace=False)
        pytest.skip(reason)
    if "://" not in kongtask_server.dsn:
        pytest.skip("the pgBouncer fixture needs the test server as a URL")
    with provide_pgbouncer(kongtask_server.dsn) as bouncer:
        yield bouncer


@pytest.fixture
async def direct(kongtask_dsn: str) -> Any:
    async with open_database(kongtask_dsn, server_settings={"application_name": "test"}) as db:
        yield db


@pytest.fixture
def bounced_dsn(pgbouncer: PgBouncer, kongtask_dsn: str) -> str:
    return pgbouncer.dsn_for(kongtask_dsn)


def run_asyncio(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run asyncio code on a private loop (trio_asyncio replaces the default policy)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(make())


async def test_the_fixture_is_a_transaction_pooler(
    direct: Database, bounced_dsn: str, pgbouncer: PgBouncer
) -> None:
    assert pgbouncer.pool_mode == "transaction"

    async def five_idle_clients() -> None:
        clients = []
        try:
            for _ in range(5):
                conn = await asyncpg.connect(bounced_dsn, statement_cache_size=0)
                clients.append(conn)
                await conn.fetchval("select 1")
            # idle clients hold no server connection: the queries shared one
            server_sessions = await clients[0].fetchval(
                "select count(*) from pg_stat_activity "
                "where datname = current_database() and application_name <> 'test'"
            )
            assert server_sessions < 5
        finally:
            for conn in clients:
                await conn.close()

    await trio.to_thread.run_sync(run_asyncio, five_idle_clients)


async def test_worker_runs_jobs_through_pgbouncer(direct: Database, bounced_dsn: str) -> None:
    done: list[int] = []

    async def work(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        if job.payload == {"fail": True}:
            raise RuntimeError("asked to fail")
        await ctx.with_connection(lambda conn: conn.fetchval("select 1"))
        done.append(job.id)

    await direct.execute(f"select {S}.add_job('work') from generate_series(1, 30)")
    await direct.execute(f"""select {S}.add_job('work', '{{"fail": true}}')""")
    async with open_worker(
        bounced_dsn,
        {"work": work},
        concurrency=4,
        poll_interval=0.1,
        prepared_statements=False,
    ) as worker:
        # no LISTEN through a transaction pooler: jobs added now are found by polling
        await wait_until(lambda: len(done) == 30, limit=60)
        await direct.execute(f"select {S}.add_job('work') from generate_series(1, 10)")
        await wait_until(lambda: len(done) == 40, limit=60)
        assert not is_marked_pool_id(worker.pool_id)  # no session lock: the 4-hour rule
    row = await direct.fetchrow(f"select attempts, last_error, locked_by from {J}")
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (1, None)
    assert row["last_error"].startswith("asked to fail")
    await assert_unlocked(direct)


TASKS_MODULE = """
async def hello(job, ctx):
    await ctx.with_connection(lambda conn: conn.execute("insert into seen values ($1)", job.id))

tasks = {"hello": hello}
"""


async def test_cli_migrates_and_runs_a_fleet_through_pgbouncer(
    pgbouncer: PgBouncer, kongtask_blank_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "bounced_tasks.py").write_text(TASKS_MODULE)
    dsn = pgbouncer.dsn_for(kongtask_blank_dsn)
    base = [sys.executable, "-m", "kongtask", "run", "-c", dsn, "--no-prepared-statements"]
    with trio.fail_after(60):
        migrated = await trio.run_process(
            [*base, "--schema-only"], capture_stderr=True, check=False, cwd=tmp_path
        )
    assert migrated.returncode == 0, migrated.stderr.decode()
    async with open_database(kongtask_blank_dsn) as db:
        await db.execute("create table seen(id bigint)")
        await db.execute(f"select {S}.add_job('hello') from generate_series(1, 20)")
        with trio.fail_after(90):
            ran = await trio.run_process(
                [*base, "--tasks", "bounced_tasks", "--once", "--processes", "2", "-j", "2"],
                capture_stderr=True,
                check=False,
                cwd=tmp_path,
            )
        assert ran.returncode == 0, ran.stderr.decode()
        assert await db.fetchval("select count(distinct id) from seen") == 20
        assert await db.fetchval(f"select count(*) from {J}") == 0


async def test_client_through_pgbouncer(direct: Database, bounced_dsn: str) -> None:
    async with open_client(bounced_dsn, prepared_statements=False) as client:
        job = await client.add_job("a", {"x": 1}, job_key="k", queue_name="q")
        specs = [kongtask.JobSpec("b", {"n": n}) for n in range(5)]
        added = await client.add_jobs(specs)
        assert [j.payload for j in added] == [{"n": n} for n in range(5)]
        removed = await client.remove_job("k")
        assert removed is not None
        assert removed.id == job.id
        completed = await client.complete_jobs([j.id for j in added[:2]])
        assert sorted(j.id for j in completed) == sorted(j.id for j in added[:2])
    assert await direct.fetchval(f"select count(*) from {J}") == 3


async def test_producers_through_pgbouncer(direct: Database, bounced_dsn: str) -> None:
    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(bounced_dsn, statement_cache_size=0)
        try:
            async with conn.transaction():
                await kongtask.aio.add_job(conn, "from_asyncpg", {"n": 1})
                await kongtask.aio.add_jobs(conn, [kongtask.JobSpec("from_asyncpg", {"n": 2})])
        finally:
            await conn.close()

    await trio.to_thread.run_sync(run_asyncio, with_asyncpg)

    def with_sync_drivers() -> None:
        import psycopg
        import psycopg2

        with psycopg.connect(bounced_dsn, prepare_threshold=None) as conn:
            for n in range(6):  # more than psycopg's default prepare threshold
                kongtask.add_job_sync(conn, "from_psycopg", {"n": n})
        conn2 = psycopg2.connect(bounced_dsn)
        try:
            with conn2:
                kongtask.add_jobs_sync(conn2, [kongtask.JobSpec("from_psycopg2", {"n": 0})])
        finally:
            conn2.close()

    await trio.to_thread.run_sync(with_sync_drivers)
    rows = await direct.fetch(
        f"select t.identifier, count(*) from {J} j join {S}._private_tasks t "
        "on t.id = j.task_id group by 1 order by 1"
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("from_asyncpg", 2),
        ("from_psycopg", 6),
        ("from_psycopg2", 1),
    ]


async def test_cron_backfills_and_runs_through_pgbouncer(
    direct: Database, bounced_dsn: str
) -> None:
    ran: list[datetime] = []

    async def tick(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.append(job.run_at)

    now = datetime.now(UTC)
    # known since long ago, last run ten minutes ago: the start backfills the last 5 min
    await direct.execute(
        f"insert into {S}._private_known_crontabs values ('tick', $1, $2)",
        now - timedelta(hours=1),
        now - timedelta(minutes=10),
    )
    async with open_worker(
        bounced_dsn,
        {"tick": tick},
        crontab=crontab("* * * * * tick ?fill=5m"),
        poll_interval=0.1,
        prepared_statements=False,
    ):
        await wait_until(lambda: len(ran) >= 4, limit=60)
    assert len(set(ran)) == len(ran)  # one job per minute
    last = await direct.fetchval(
        f"select last_execution from {S}._private_known_crontabs where identifier = 'tick'"
    )
    assert last is not None
    assert last > now - timedelta(minutes=6)
    await assert_unlocked(direct)
