"""Producers on asyncpg: ``kongtask.aio`` on a ``Connection`` in the caller's transaction,
on a ``Pool`` (its own transaction), and inside a handler's ``ctx.with_connection``
(scenarios: producer_scenarios)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
import pytest
import trio
from producer_scenarios import *  # noqa: F403  (the scenarios, run for this driver)
from producer_scenarios import AsyncTx, Tx, count, wait_until

import kongtask
import kongtask.aio
from kongtask._pg import Database

T = TypeVar("T")
S = "graphile_worker"


class ConnectionDriver:
    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        loop = asyncio.new_event_loop()
        conn: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(dsn))
        try:
            transaction = conn.transaction()
            loop.run_until_complete(transaction.start())
            tx = AsyncTx(loop, conn, conn.execute, conn.transaction, asyncpg.DivisionByZeroError)
            result = body(tx)
            loop.run_until_complete(transaction.commit() if commit else transaction.rollback())
            return result
        finally:
            loop.run_until_complete(conn.close())
            loop.close()


@pytest.fixture
def driver() -> object:
    return ConnectionDriver()


async def _pool_adds(dsn: str) -> list[kongtask.Job]:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=2) as pool:
        one = await kongtask.aio.add_job(pool, "t", {"n": 1}, job_key="k")
        more = await kongtask.aio.add_jobs(pool, [kongtask.JobSpec("t", n) for n in (2, 3)])
        return [one, *more]


async def test_a_pool_adds_and_commits_on_its_own(appdb: Database, kongtask_dsn: str) -> None:
    jobs = await trio.to_thread.run_sync(lambda: asyncio.run(_pool_adds(kongtask_dsn)))
    assert [job.payload for job in jobs][:1] == [{"n": 1}]
    assert await count(appdb, f"{S}._private_jobs") == 3


async def test_a_handler_adds_a_job_in_its_own_transaction(
    appdb: Database, kongtask_dsn: str
) -> None:
    children: list[object] = []
    child_ran = trio.Event()

    async def write_and_enqueue(conn: Any, order: int, fail: bool) -> None:
        # asyncio side: the connection is the handler's; one transaction for both writes
        async with conn.transaction():
            await conn.execute("insert into orders values ($1)", order)
            await kongtask.aio.add_job(conn, "child", {"order": order})
            if fail:
                raise RuntimeError("after the enqueue")

    async def parent(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await ctx.with_connection(write_and_enqueue, job.payload["order"], job.payload["fail"])

    async def child(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        children.append(job.payload)
        child_ran.set()

    async with kongtask.open_worker(
        kongtask_dsn, {"parent": parent, "child": child}, poll_interval=3600
    ) as w:
        await w.add_job("parent", {"order": 1, "fail": True}, max_attempts=1)
        await wait_until(lambda: w.statistics().failed == 1)
        await w.add_job("parent", {"order": 2, "fail": False})
        with trio.fail_after(10):
            await child_ran.wait()
        await wait_until(lambda: w.statistics().completed == 2)
    # the failed handler's order and child job were rolled back together
    assert children == [{"order": 2}]
    assert await appdb.fetchval("select array_agg(id) from orders") == [2]


async def test_trio_code_adds_jobs_in_its_own_transaction_through_the_client(
    appdb: Database, kongtask_dsn: str
) -> None:
    async def place_order(conn: Any, number: int) -> kongtask.Job:
        async with conn.transaction():
            await conn.execute("insert into orders values ($1)", number)
            job = await kongtask.aio.add_job(conn, "confirm_order", {"order": number})
            if number < 0:
                raise ValueError("refused")
            return job

    async with kongtask.open_client(kongtask_dsn) as client:
        with pytest.raises(ValueError, match="refused"):
            await client.with_connection(place_order, -1)
        job = await client.with_connection(place_order, 7)
    assert job.payload == {"order": 7}
    assert await appdb.fetchval("select array_agg(id) from orders") == [7]
    assert await appdb.fetchval(f"select array_agg(id) from {S}._private_jobs") == [job.id]
