"""The pool's reset on release: full for connections lent to user code, none otherwise.

Every test uses a one-connection pool, so each borrower gets the same backend, and
checks the outcome from PostgreSQL: ``pg_stat_activity.query`` is the last statement a
backend ran (the reset query, or kongtask's own statement when the reset was skipped),
and session state (settings, listeners, advisory locks, cursors, transactions) is read
back on that same backend or seen from another connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import trio
from client_support import wait_until_blocked_on_lock

from kongtask import Client, JobSpec
from kongtask._pg import Database, open_database

S = "graphile_worker"
APP = "kongtask-reset-test"
LOCK_KEY = 872_364_001


@pytest.fixture(params=[False, True], ids=["pool", "spare"])
async def one(kongtask_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """A one-connection pool with its own application_name, to find its backend;
    with and without the spare connection the client keeps."""
    async with open_database(
        kongtask_dsn,
        min_size=1,
        max_size=1,
        server_settings={"application_name": APP},
        keep_spare=request.param,
    ) as database:
        yield database


@pytest.fixture
async def spare(kongtask_dsn: str) -> AsyncIterator[Database]:
    """A one-connection pool that keeps a spare, as the client's does."""
    async with open_database(
        kongtask_dsn,
        min_size=1,
        max_size=1,
        server_settings={"application_name": APP},
        keep_spare=True,
    ) as database:
        yield database


async def backend(observer: Database) -> asyncpg.Record:
    """pid, state and last statement of the one-connection pool's backend."""
    rows = await observer.fetch(
        "select pid, state, query from pg_stat_activity "
        "where datname = current_database() and application_name = $1",
        APP,
    )
    assert len(rows) == 1, rows
    return rows[0]


def ran_last(seen: str, sql: str) -> bool:
    """Whether ``seen`` (pg_stat_activity's ``query``, which keeps only the first
    ``track_activity_query_size`` bytes) is the statement ``sql``."""
    return bool(seen) and sql.startswith(seen)


def is_reset_query(query: str) -> bool:
    return "pg_advisory_unlock_all" in query and "RESET ALL" in query


async def session_state(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything user code might leave behind, read on the borrowed backend."""
    return {
        "pid": conn.get_server_pid(),
        "in_transaction": conn.is_in_transaction(),
        "xact": await conn.fetchval("select pg_current_xact_id_if_assigned()::text"),
        "statement_timeout": await conn.fetchval("show statement_timeout"),
        "flag": await conn.fetchval("select current_setting('kongtask_test.flag', true)"),
        "channels": await conn.fetchval("select array(select pg_listening_channels())"),
        "cursors": await conn.fetchval("select count(*) from pg_cursors"),
        "advisory": await conn.fetchval(
            "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
        ),
    }


async def lock_is_free(conn: asyncpg.Connection) -> bool:
    """Whether another session can take the advisory lock ``dirty_the_session`` took."""
    taken: bool = await conn.fetchval(f"select pg_try_advisory_lock({LOCK_KEY})")
    if taken:
        await conn.execute(f"select pg_advisory_unlock({LOCK_KEY})")
    return taken


async def dirty_the_session(conn: asyncpg.Connection) -> int:
    await conn.execute("set statement_timeout = 12345")
    await conn.execute("select set_config('kongtask_test.flag', 'on', false)")
    await conn.execute('listen "kongtask_reset_test"')
    await conn.execute(f"select pg_advisory_lock({LOCK_KEY})")
    await conn.execute("declare kongtask_reset_cursor cursor with hold for select 1")
    return conn.get_server_pid()


async def test_own_statements_skip_the_reset_query(one: Database, db: Database) -> None:
    client = Client(one, S)
    q = client._queries
    pid = (await backend(db))["pid"]

    # A new task name: add_job, then the name lookup, and no reset after them.
    await client.add_job("reset_test", {"a": 0})
    after = await backend(db)
    assert after["pid"] == pid
    assert after["query"] == q.names_by_id, after["query"]

    job = await client.add_job("reset_test", {"a": 1})
    assert ran_last((await backend(db))["query"], q.add_job)

    await client.add_jobs([JobSpec("reset_test", {"b": 2})])
    assert ran_last((await backend(db))["query"], q.add_jobs)

    assert await one.fetchval("select 4200 + 42") == 4242
    assert (await backend(db))["query"] == "select 4200 + 42"

    done = await client.complete_jobs([job.id])
    assert [j.id for j in done] == [job.id]
    # complete_jobs and its counterpart for held jobs, in one transaction
    assert (await backend(db))["query"].strip().rstrip(";").upper() == "COMMIT"

    await client.cleanup(["GC_JOB_QUEUES"])
    last = await backend(db)
    assert last["pid"] == pid
    assert last["query"] == q.gc_job_queues


async def test_lent_connection_is_fully_reset(one: Database, db: Database) -> None:
    client = Client(one, S)
    before = await one.with_connection(session_state)

    pid = await one.with_connection(dirty_the_session)
    assert pid == before["pid"]
    last = await backend(db)
    assert last["pid"] == pid
    assert is_reset_query(last["query"]), last["query"]
    # The advisory lock is free for everyone else again (checked on another backend).
    assert await db.with_connection(lock_is_free)

    # The next kongtask statement finds a clean session, and skips the reset again:
    # the lent mark is cleared by the reset.
    await client.add_job("reset_test")
    assert not is_reset_query((await backend(db))["query"])
    state = await one.with_connection(session_state)
    assert state == {**before, "flag": state["flag"]}
    assert state["flag"] in (None, "")  # a placeholder setting stays defined, but empty


async def test_failing_user_code_still_gets_the_reset(one: Database, db: Database) -> None:
    before = await one.with_connection(session_state)

    async def dirty_then_fail(conn: asyncpg.Connection) -> None:
        await dirty_the_session(conn)
        raise LookupError("user code failed")

    with pytest.raises(LookupError):
        await one.with_connection(dirty_then_fail)
    assert is_reset_query((await backend(db))["query"])
    state = await one.with_connection(session_state)
    assert state == {**before, "flag": state["flag"]}


async def test_cancelled_user_code_still_gets_the_reset(one: Database, db: Database) -> None:
    before = await one.with_connection(session_state)

    async def dirty_then_wait(conn: asyncpg.Connection) -> None:
        await dirty_the_session(conn)
        await conn.execute("select pg_sleep(30)")

    with trio.move_on_after(0.5) as scope:
        await one.with_connection(dirty_then_wait)
    assert scope.cancelled_caught
    with trio.fail_after(10):
        state = await one.with_connection(session_state)
    assert state == {**before, "flag": state["flag"]}
    assert await db.with_connection(lock_is_free)


async def test_transaction_left_open_by_user_code_is_rolled_back(
    one: Database, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    before = await one.with_connection(session_state)

    async def begin_and_leave(conn: asyncpg.Connection) -> None:
        await conn.execute("begin")
        await conn.execute("create table kongtask_reset_leak (x int)")
        await conn.execute("set local statement_timeout = 777")

    with caplog.at_level(logging.ERROR, logger="kongtask.pg"):
        await one.with_connection(begin_and_leave)
    # asyncpg's warning is logged, not raised (docs/design/stack.md#the-asyncio-exception-handler)
    assert "active transaction" in caplog.text
    assert await db.fetchval("select to_regclass('kongtask_reset_leak')") is None
    last = await backend(db)
    assert last["state"] == "idle", last
    state = await one.with_connection(session_state)
    assert state == {**before, "flag": state["flag"]}


async def test_transaction_left_open_by_own_statements_is_rolled_back(
    one: Database, db: Database
) -> None:
    """Even on the no-reset path, a transaction never reaches the next borrower."""

    async def begin_and_leave(conn: asyncpg.Connection) -> None:
        await conn.execute("begin")
        await conn.execute("create table kongtask_reset_leak (x int)")

    await one.with_own_connection(begin_and_leave)
    assert await db.fetchval("select to_regclass('kongtask_reset_leak')") is None
    assert (await backend(db))["state"] == "idle"
    assert not await one.with_own_connection(_in_transaction)


async def _in_transaction(conn: asyncpg.Connection) -> bool:
    return conn.is_in_transaction()


async def test_cancelled_add_job_leaves_the_pool_usable(one: Database, db: Database) -> None:
    client = Client(one, S)
    first = await client.add_job("reset_test", {"v": 1}, job_key="k")
    pid = (await backend(db))["pid"]

    # Hold the keyed row locked, so the next add_job with that key waits on it.
    blocker = await db.connect()
    try:
        await db.run(blocker.execute, "begin")
        await db.run(
            blocker.execute, f"select 1 from {S}._private_jobs where id = {first.id} for update"
        )
        async with trio.open_nursery() as nursery:
            cancel_scope = trio.CancelScope()

            async def add_blocked() -> None:
                with cancel_scope:
                    await client.add_job("reset_test", {"v": 2}, job_key="k")
                    pytest.fail("add_job returned while its row was locked")

            nursery.start_soon(add_blocked)
            await wait_until_blocked_on_lock(db)
            cancel_scope.cancel()
        assert cancel_scope.cancelled_caught
    finally:
        await db.run(blocker.execute, "rollback")
        await db.close_connection(blocker)

    # The connection came back to the pool, out of any transaction, and was not
    # thrown away (same backend).
    assert one.pool.get_idle_size() == 1
    with trio.fail_after(10):
        again = await client.add_job("reset_test", {"v": 3}, job_key="k")
    assert again.id == first.id
    assert again.payload == {"v": 3}
    last = await backend(db)
    assert last["pid"] == pid
    assert ran_last(last["query"], client._queries.add_job)
    assert not await one.with_own_connection(_in_transaction)
    rows = await db.fetch(f"select payload from {S}._private_jobs where key = 'k'")
    assert [json.loads(r["payload"]) for r in rows] == [{"v": 3}]


async def test_dedicated_connection_settings_apply_to_that_session_only(one: Database) -> None:
    """The worker's claiming connection gets its own session settings (async commit,
    generic plans); the pool's connections keep the server's."""
    from kongtask._worker import CLAIM_SESSION_SETTINGS

    async def show(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
        rows = await conn.fetch(
            "select name, setting, source from pg_settings"
            " where name in ('synchronous_commit', 'plan_cache_mode') order by name"
        )
        return [(r["name"], r["setting"], r["source"]) for r in rows]

    conn = await one.connect(CLAIM_SESSION_SETTINGS)
    try:
        assert await one.run(show, conn) == [
            ("plan_cache_mode", "force_generic_plan", "client"),
            ("synchronous_commit", "off", "client"),
        ]
    finally:
        await one.close_connection(conn)
    # the pool's sessions: the server's own values, not set by the client
    assert all(source != "client" for _, _, source in await one.with_connection(show))


# --- the spare connection (open_database(keep_spare=True), as open_client does) ----------


async def test_spare_stays_checked_out_for_the_next_own_statement(spare: Database) -> None:
    pid = await spare.fetchval("select pg_backend_pid()")
    # kept out of the pool: the next unit of own work takes it without the pool's hand-offs
    assert spare.pool.get_idle_size() == 0
    assert await spare.fetchval("select pg_backend_pid()") == pid


async def test_lent_code_gets_the_spare_instead_of_waiting_for_the_pool(spare: Database) -> None:
    """The one connection of the pool is the spare: user code must take it, not wait for
    the pool, and hand it back reset."""
    client = Client(spare, S)
    await client.add_job("reset_test")
    with trio.fail_after(10):
        pid = await spare.with_connection(dirty_the_session)
    # released through the pool (and reset), not kept as the spare
    assert spare.pool.get_idle_size() == 1
    with trio.fail_after(10):
        state = await spare.with_connection(session_state)
    assert state["pid"] == pid
    assert state["statement_timeout"] != "12345ms"
    assert state["advisory"] == 0


async def test_a_spare_whose_backend_died_is_replaced(spare: Database, db: Database) -> None:
    client = Client(spare, S)
    await client.add_job("reset_test")
    pid = (await backend(db))["pid"]
    assert await db.fetchval("select pg_terminate_backend($1)", pid)
    # asyncpg notices the lost connection by itself and gives the slot back to the pool
    with trio.fail_after(10):
        while spare.pool.get_idle_size() == 0:  # noqa: ASYNC110 (asyncpg has no event for it)
            await trio.sleep(0.01)
    assert spare._spare  # still parked: the next unit of work must notice

    with trio.fail_after(10):
        job = await client.add_job("reset_test", {"after": "restart"})
    assert job.payload == {"after": "restart"}
    assert (await backend(db))["pid"] != pid


async def test_closing_hands_the_spare_back_first(
    kongtask_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's close waits for every checked-out connection (10 s, then it is torn
    down with a warning): the spare goes back first, so the close is orderly."""
    with caplog.at_level(logging.WARNING, logger="kongtask.pg"):
        async with open_database(kongtask_dsn, max_size=1, keep_spare=True) as database:
            await database.fetchval("select 1")
            assert database._spare
    assert "did not close" not in caplog.text
    assert not database._spare


# --- the crossing (Database.run) ---------------------------------------------------------


async def test_a_unit_cancelled_before_it_starts_raises_cancelled(spare: Database) -> None:
    """The trio side is cancelled before the asyncio task's first step: the task never
    runs the unit, and the caller still gets its Cancelled (not a hang)."""
    ran = False

    async def unit() -> None:
        nonlocal ran
        ran = True

    with trio.CancelScope() as scope:
        scope.cancel()
        await spare.run(unit)
    assert scope.cancelled_caught
    assert not ran
    with trio.fail_after(10):
        assert await spare.fetchval("select 42") == 42


async def test_the_crossing_carries_results_errors_and_cancellations(spare: Database) -> None:
    assert await spare.fetchval("select $1::int + 1", 41) == 42
    with pytest.raises(asyncpg.DivisionByZeroError):
        await spare.fetchval("select 1 / 0")

    with trio.move_on_after(0.3) as scope:
        await spare.fetchval("select pg_sleep(30)")
    assert scope.cancelled_caught

    # asyncio's cancellation is delivered once: a unit may finish its cleanup and return
    async def swallows_the_cancel() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup still runs after the cancel
            return "cleaned up"
        return "not cancelled"

    with trio.move_on_after(0.3):
        assert await spare.run(swallows_the_cancel) == "cleaned up"
    with trio.fail_after(10):
        assert await spare.fetchval("select 42") == 42
