"""The worker's SQL (kongtask._sql) against a real graphile-worker 0.18 schema.

Rules: real PostgreSQL, no sleeps; each test states the protocol rule it checks.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import trio
from _worker_helpers import add_job_row as add

from kongtask._pg import Database, open_database
from kongtask._sql import (
    WorkerQueries,
    claim_jobs,
    complete_and_fail,
    register_tasks,
    return_unknown,
)

Q = WorkerQueries("graphile_worker")
J = "graphile_worker._private_jobs"
JQ = "graphile_worker._private_job_queues"
P1 = "pool-aaaaaaaaaaaaaaaaaa"
P2 = "pool-bbbbbbbbbbbbbbbbbb"


@pytest.fixture
async def wdb(worker_dsn: str) -> AsyncIterator[Database]:
    async with open_database(worker_dsn) as database:
        yield database


async def tasks(db: Database, *names: str) -> dict[str, int]:
    return await db.with_connection(register_tasks, Q, list(names))


async def claim(
    db: Database, pool: str, task_ids: list[int], n: int, flags: list[str] | None = None
) -> list[int]:
    rows = await db.with_connection(claim_jobs, Q, pool, task_ids, n, flags)
    return [int(r["id"]) for r in rows]


async def test_register_tasks_inserts_only_missing(wdb: Database) -> None:
    first = await tasks(wdb, "a", "b")
    again = await tasks(wdb, "a", "b", "c")
    assert again["a"] == first["a"]
    assert again["b"] == first["b"]
    # #619: registering existing names does not consume identity values
    assert again["c"] == max(first.values()) + 1


async def test_claim_marks_orders_and_filters(wdb: Database) -> None:
    ids = await tasks(wdb, "t", "other")
    low = await add(wdb, "t", priority=5)
    high = await add(wdb, "t", priority=-1)
    await add(wdb, "unknown_task")
    await add(wdb, "t", run_at=datetime(2999, 1, 1, tzinfo=UTC))  # future
    flagged = await add(wdb, "t", flags=["slow"])
    rows = await wdb.with_connection(claim_jobs, Q, P1, [ids["t"]], 10, ["slow"])
    assert [r["id"] for r in rows] == [high, low]  # priority order, flagged/future/unknown skipped
    assert all(r["attempts"] == 1 and r["locked_by"] == P1 for r in rows)
    # empty forbidden list = none forbidden
    assert await claim(wdb, P1, [ids["t"]], 10, []) == [flagged]


async def test_claim_takes_one_job_per_queue_and_skips_locked_queues(wdb: Database) -> None:
    ids = await tasks(wdb, "t")
    q1 = [await add(wdb, "t", queue="q1") for _ in range(3)]
    q2 = [await add(wdb, "t", queue="q2") for _ in range(2)]
    free = [await add(wdb, "t") for _ in range(2)]
    got = await claim(wdb, P1, [ids["t"]], 100)
    assert sorted(got) == sorted([q1[0], q2[0], *free])
    queue_locks = await wdb.fetch(f"select queue_name, locked_by from {JQ} order by queue_name")
    assert [(r["queue_name"], r["locked_by"]) for r in queue_locks] == [("q1", P1), ("q2", P1)]
    # another pool gets nothing of the locked queues
    assert await claim(wdb, P2, [ids["t"]], 100) == []
    # completing q1's job unlocks q1 only; then P2 can take q1's next job
    out = await wdb.with_connection(complete_and_fail, Q, P1, [q1[0]], [], [], [])
    assert out == [("complete", q1[0], None, None)]
    assert await claim(wdb, P2, [ids["t"]], 100) == [q1[1]]
    # completing again is harmless and does not unlock P2's queue lock
    assert await wdb.with_connection(complete_and_fail, Q, P1, [q1[0]], [], [], []) == []
    row = await wdb.fetchrow(f"select locked_by from {JQ} where queue_name = 'q1'")
    assert row is not None
    assert row["locked_by"] == P2


async def test_fail_backoff_payload_and_pool_filter(wdb: Database) -> None:
    ids = await tasks(wdb, "t")
    a = await add(wdb, "t", queue="qa")
    b = await add(wdb, "t", payload="[1,2,3]")
    assert sorted(await claim(wdb, P1, [ids["t"]], 10)) == sorted([a, b])
    before = await wdb.fetchval("select now()")
    # P2 cannot fail P1's jobs
    assert await wdb.with_connection(complete_and_fail, Q, P2, [], [a], ["x"], [None]) == []
    out = await wdb.with_connection(
        complete_and_fail, Q, P1, [], [a, b], ["boom", "Batch failures:\nno"], [None, "[2]"]
    )
    assert sorted(out) == sorted([("fail", a, 1, 25), ("fail", b, 1, 25)])
    rows = {
        r["id"]: r
        for r in await wdb.fetch(
            f"select id, last_error, run_at, locked_by, payload::text as p, attempts from {J}"
        )
    }
    for job_id in (a, b):
        delay = (rows[job_id]["run_at"] - before).total_seconds()
        assert math.e - 0.5 < delay < math.e + 2  # exp(1) s from greatest(now, run_at)
        assert rows[job_id]["locked_by"] is None
        assert rows[job_id]["attempts"] == 1
    assert rows[a]["last_error"] == "boom"
    assert rows[a]["p"] == "{}"
    assert rows[b]["p"] == "[2]"
    q = await wdb.fetchrow(f"select locked_by from {JQ}")
    assert q is not None
    assert q["locked_by"] is None


async def test_return_undoes_attempt_and_unlocks(wdb: Database) -> None:
    ids = await tasks(wdb, "t")
    a = await add(wdb, "t", queue="q")
    assert await claim(wdb, P1, [ids["t"]], 1) == [a]
    assert await wdb.with_connection(return_unknown, Q, P2, [a]) == []  # not ours
    assert await wdb.with_connection(return_unknown, Q, P1, [a]) == [a]
    row = await wdb.fetchrow(f"select attempts, locked_by from {J}")
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (0, None)
    assert await claim(wdb, P2, [ids["t"]], 1) == [a]  # queue unlocked too
    counts = await wdb.fetchrow(Q.release_pool, P2)
    assert counts is not None
    assert (counts["jobs"], counts["queues"]) == (1, 1)


async def test_sweep_releases_only_stale_locks(wdb: Database) -> None:
    ids = await tasks(wdb, "t")
    a = await add(wdb, "t", queue="q")
    b = await add(wdb, "t")
    await claim(wdb, P1, [ids["t"]], 10)
    await wdb.execute(f"update {J} set locked_at = now() - interval '5 hours' where id = $1", a)
    await wdb.execute(f"update {JQ} set locked_at = now() - interval '5 hours'")
    counts = await wdb.fetchrow(Q.sweep_stale)
    assert counts is not None
    assert (counts["jobs"], counts["queues"]) == (1, 1)
    rows = {r["id"]: r for r in await wdb.fetch(f"select id, locked_by, attempts from {J}")}
    assert rows[a]["locked_by"] is None
    assert rows[a]["attempts"] == 1
    assert rows[b]["locked_by"] == P1


async def test_concurrent_claims_never_lock_two_jobs_of_a_queue(wdb: Database) -> None:
    ids = await tasks(wdb, "t")
    await wdb.execute(
        "select graphile_worker.add_job('t', queue_name => 'q' || (i % 5)) "
        "from generate_series(1, 200) i"
    )
    pools = [f"pool-{i:018x}" for i in range(8)]
    claimed: dict[str, list[int]] = {p: [] for p in pools}

    async def claimer(pool: str) -> None:
        for _ in range(5):
            claimed[pool] += await claim(wdb, pool, [ids["t"]], 50)

    async with trio.open_nursery() as n:
        for p in pools:
            n.start_soon(claimer, p)
    per_queue = await wdb.fetch(
        f"select job_queue_id, count(*) as n from {J} "
        "where locked_by is not null group by job_queue_id"
    )
    assert len(per_queue) == 5
    assert all(r["n"] == 1 for r in per_queue)
    bad = await wdb.fetchval(
        f"select count(*) from {J} j join {JQ} q "
        "on q.id = j.job_queue_id where j.locked_by is not null "
        "and q.locked_by is distinct from j.locked_by"
    )
    assert bad == 0


async def test_row_locked_queue_does_not_use_up_the_limit(wdb: Database) -> None:
    # §5.3 step 1: a job whose queue row cannot be locked without waiting is no candidate
    ids = await tasks(wdb, "t")
    await add(wdb, "t", queue="busy", priority=-1)
    free = await add(wdb, "t")
    blocker = await wdb.connect()
    try:
        await wdb.run(blocker.execute, "begin")
        await wdb.run(blocker.execute, f"select 1 from {JQ} where queue_name = 'busy' for update")
        assert await claim(wdb, P1, [ids["t"]], 1) == [free]
    finally:
        await wdb.run(blocker.execute, "rollback")
        await wdb.close_connection(blocker)


async def _claim_in_a_transaction(
    conn: asyncpg.Connection, task_ids: list[int], n: int
) -> tuple[int, str, str]:
    """Claim in an explicit transaction; the setting inside it and in the session after."""
    await conn.execute("set synchronous_commit = on")
    async with conn.transaction():
        rows = await claim_jobs(conn, Q, P1, task_ids, n)
        inside = await conn.fetchval("show synchronous_commit")
    return len(rows), inside, await conn.fetchval("show synchronous_commit")


async def test_a_claim_commits_asynchronously_without_a_session_setting(wdb: Database) -> None:
    """Behind a transaction pooler the claiming session cannot set synchronous_commit:
    a claim that takes jobs turns it off for its own transaction, and only for it."""
    ids = await tasks(wdb, "t")
    await add(wdb, "t")
    claimed, inside, after = await wdb.with_connection(_claim_in_a_transaction, [ids["t"]], 5)
    assert (claimed, inside, after) == (1, "off", "on")
