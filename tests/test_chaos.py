"""The fast chaos tier: one of each fault the reliability promises cover, in-process.

Each test shows that no job is lost and that the recovery docs/reliability.md describes
happens: a server restart and a cut connection are survived by reconnecting; a stalled
connection resumes; a claim whose reply is lost (the connection is cut after the claim
was sent, and the claim commits) has its jobs returned by the pool that claimed them.
The kill -9 of a real ``kongtask run`` is in tests/test_recovery.py. Long runs and real
time budgets stay in ``stress/chaos.py``.

Rules: real PostgreSQL, real TCP resets through :class:`kongtask.testing.TcpProxy`; waits
are events or polls under an absolute ``fail_after`` (generous: a safety net, not a
measurement).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from test_worker import wait_until

import kongtask
from kongtask._pg import Database, open_database
from kongtask.testing import TcpProxy, run_sync_sql
from kongtask.testing._postgres import LocalCluster, find_pg_bindir, wait_for_server

S = "graphile_worker"
J = f"{S}._private_jobs"


def _job_ids(event: kongtask.Event) -> list[int]:
    ids = event["job_ids"]
    assert isinstance(ids, list | tuple), event
    return [int(i) for i in ids]


def _via(dsn: str, port: int) -> str:
    url = urlsplit(dsn)
    return urlunsplit(url._replace(netloc=f"{url.username or 'postgres'}@127.0.0.1:{port}"))


@asynccontextmanager
async def _proxied(dsn: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    url = urlsplit(dsn)
    if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
        pytest.skip("the chaos tier needs a TCP server on loopback")
    proxy = TcpProxy(url.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy, _via(dsn, proxy.port)
        nursery.cancel_scope.cancel()


class Runs:
    """Handler that counts runs per job number; ``wait(n)``: until n distinct numbers ran."""

    def __init__(self) -> None:
        self.count: Counter[int] = Counter()
        self.changed = trio.Event()
        self.events: list[kongtask.Event] = []

    async def handler(self, job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.sleep(0.005)
        self.count[int(job.payload["n"])] += 1
        self.changed.set()
        self.changed = trio.Event()

    def on_event(self, event: kongtask.Event) -> None:
        self.events.append(event)

    def names(self, name: str) -> list[kongtask.Event]:
        return [e for e in self.events if e.name == name]

    async def wait(self, numbers: int, limit: float = 60) -> None:
        with trio.fail_after(limit):
            while len(self.count) < numbers:
                await self.changed.wait()


async def _add(db: Database, first: int, count: int) -> None:
    await db.execute(
        f"select {S}.add_job('chaos', json_build_object('n', n)) "
        "from generate_series($1::int, $2::int) n",
        first,
        first + count - 1,
    )


async def _drained(db: Database) -> None:
    async def empty() -> bool:
        return bool(await db.fetchval(f"select count(*) = 0 from {J}"))

    await wait_until(empty, limit=60)


async def _assert_nothing_lost(db: Database, runs: Runs, total: int) -> None:
    assert sorted(runs.count) == list(range(total))  # every job ran ...
    assert await db.fetchval(f"select count(*) from {J}") == 0  # ... and completed


async def test_cut_connections_are_replaced_and_lose_nothing(kongtask_dsn: str) -> None:
    runs = Runs()
    async with _proxied(kongtask_dsn) as (proxy, via), open_database(kongtask_dsn) as db:
        await _add(db, 0, 100)
        async with kongtask.open_worker(
            via, {"chaos": runs.handler}, concurrency=4, on_event=runs.on_event
        ):
            await runs.wait(30)
            assert proxy.drop_all() >= 3  # LISTEN, claim, outcomes (and the pool's)
            await _add(db, 100, 100)
            await runs.wait(200)
            await _drained(db)
        await _assert_nothing_lost(db, runs, 200)
    # the LISTEN connection came back (it holds the liveness lock)
    assert len(runs.names("pool:listen:success")) >= 2


async def test_a_stalled_connection_resumes_and_loses_nothing(kongtask_dsn: str) -> None:
    runs = Runs()
    async with _proxied(kongtask_dsn) as (proxy, via), open_database(kongtask_dsn) as db:
        await _add(db, 0, 100)
        async with kongtask.open_worker(via, {"chaos": runs.handler}, concurrency=4):
            await runs.wait(20)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.stall, 2.0)  # no byte moves for 2 s
                await _add(db, 100, 50)
            await runs.wait(150)
            await _drained(db)
        await _assert_nothing_lost(db, runs, 150)


@pytest.fixture
def own_cluster() -> Iterator[tuple[LocalCluster, str]]:
    """A cluster of its own (the test restarts it), migrated, and its DSN."""
    from kongtask._migrate import migrate_sync

    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip("no local PostgreSQL binaries to restart")
    cluster = LocalCluster(bindir)
    try:
        dsn = cluster.start()
        migrate_sync(dsn)
        yield cluster, dsn
    finally:
        cluster.stop()


def _restart(cluster: LocalCluster) -> None:
    result = cluster._run(
        # -l: the server must not inherit our output pipes (the call would never return)
        "pg_ctl",
        "-D",
        str(cluster.data),
        "-l",
        str(cluster.logfile),
        "-m",
        "fast",
        "-w",
        "-t",
        "60",
        "restart",
    )
    assert result.returncode == 0, result.stderr


async def test_a_server_restart_is_survived_and_loses_nothing(
    own_cluster: tuple[LocalCluster, str],
) -> None:
    cluster, dsn = own_cluster
    runs = Runs()
    await trio.to_thread.run_sync(
        run_sync_sql,
        dsn,
        f"select {S}.add_job('chaos', json_build_object('n', n)) from generate_series(0, 99) n",
    )
    async with kongtask.open_worker(
        dsn, {"chaos": runs.handler}, concurrency=4, on_event=runs.on_event
    ):
        await runs.wait(20)
        await trio.to_thread.run_sync(_restart, cluster)
        await trio.to_thread.run_sync(wait_for_server, dsn, 60.0)
        await trio.to_thread.run_sync(
            run_sync_sql,
            dsn,
            f"select {S}.add_job('chaos', json_build_object('n', n)) "
            "from generate_series(100, 149) n",
        )
        await runs.wait(150)
        with trio.fail_after(60):
            while True:
                rows: Any = await trio.to_thread.run_sync(
                    run_sync_sql, dsn, f"select count(*) as n from {J}"
                )
                if rows[0][0]["n"] == 0:
                    break
                await trio.sleep(0.1)
    assert sorted(runs.count) == list(range(150))
    assert len(runs.names("pool:listen:success")) >= 2  # LISTEN reconnected


async def test_the_jobs_of_a_claim_whose_reply_is_lost_are_returned(kongtask_dsn: str) -> None:
    """The claim commits on the server, its reply is lost on the way back and the
    connection is then cut: the pool finds the jobs locked by itself that it does not
    know, returns them (``job:returned``, reason "lost claim"), and they run once."""
    runs = Runs()
    claim_conn = (
        "select client_port from pg_stat_activity where application_name = 'kongtask' "
        # how the claim statement begins (the text shown is cut at 1 kB)
        "and state = 'idle' and query like '%with queued as%' and client_port is not null"
    )
    async with _proxied(kongtask_dsn) as (proxy, via), open_database(kongtask_dsn) as db:
        # A poll sent between swallowing and the NOTIFY would have its empty reply
        # swallowed instead of the claim's: polls are made too rare to fall there.
        async with kongtask.open_worker(
            via, {"chaos": runs.handler}, on_event=runs.on_event, poll_interval=3600
        ) as worker:
            idle: list[Any] = []

            async def claim_connection_idle() -> bool:
                # Quiet: the fetcher waits for news (the start's own nudges consumed) and
                # its connection is idle on the server. The row is kept from the query
                # that saw it idle: a second query could meet the connection busy.
                if worker.statistics().fetcher != "waiting for jobs":
                    return False
                idle[:] = await db.fetch(claim_conn)
                return len(idle) == 1 and worker.statistics().fetcher == "waiting for jobs"

            await wait_until(claim_connection_idle, limit=30)
            (row,) = idle
            proxy.swallow_replies(row["client_port"])
            await _add(db, 0, 5)  # its NOTIFY wakes the fetcher: the claim commits

            locked_by_us = f"select id from {J} where locked_by = $1 order by id"

            async def claimed_on_the_server() -> bool:
                return bool(await db.fetch(locked_by_us, worker.pool_id))

            await wait_until(claimed_on_the_server, limit=30)
            claimed = [r["id"] for r in await db.fetch(locked_by_us, worker.pool_id)]
            assert not runs.count  # the reply never arrived
            assert proxy.drop(row["client_port"])
            await runs.wait(5)
            await _drained(db)
        await _assert_nothing_lost(db, runs, 5)
    assert runs.names("worker:getJob:error")
    lost = [e for e in runs.names("job:returned") if e["reason"] == "lost claim"]
    assert [sorted(_job_ids(e)) for e in lost] == [claimed]
    assert max(runs.count.values()) == 1  # returned unstarted: none ran twice
