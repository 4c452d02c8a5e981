"""What every connection kongtask opens knows from the start.

asyncpg learns the codec of an array type by a catalog query the first time a statement
on a connection takes one; kongtask declares the built-in arrays its statements use
(``int[]`` task ids, ``bigint[]`` job ids) when the connection is made. The statements a
connection runs are observed with asyncpg's query logger, which also sees asyncpg's own
catalog queries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import trio

from kongtask._pg import Database, open_database

ROUND_TRIP = "select $1::int[] as ints, $2::bigint[] as bigs, $3::int[] as grid"
INTS = [1, None, 2**31 - 1, -(2**31)]
BIGS = [2**63 - 1, -1, 0, None]
GRID = [[1, 2], [3, 4]]


async def round_trip(conn: asyncpg.Connection) -> tuple[list[str], Any]:
    """(the statements ``conn`` sent, the row) of one statement with array parameters."""
    seen: list[str] = []

    def log(record: Any) -> None:
        seen.append(record.query)

    conn.add_query_logger(log)
    try:
        row = await conn.fetchrow(ROUND_TRIP, INTS, BIGS, GRID)
        # once more with empty arrays: the same codecs
        empty = await conn.fetchrow(ROUND_TRIP, [], [], [])
    finally:
        conn.remove_query_logger(log)
    assert empty is not None
    assert (empty["ints"], empty["bigs"], empty["grid"]) == ([], [], [])
    return seen, row


def assert_values(row: Any) -> None:
    assert row is not None
    assert (row["ints"], row["bigs"], row["grid"]) == (INTS, BIGS, GRID)


async def test_plain_asyncpg_asks_the_catalog_for_array_types(kongtask_dsn: str) -> None:
    """The premise: without the declaration, the first such statement costs a catalog
    query (so the tests below would see one)."""
    async with open_database(kongtask_dsn, min_size=0, max_size=1) as db:
        conn = await db.run(asyncpg.connect, kongtask_dsn)
        try:
            seen, row = await db.run(round_trip, conn)
        finally:
            await db.close_connection(conn)
    assert_values(row)
    assert len(seen) > 2
    assert any("pg_type" in query for query in seen)


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
async def test_kongtask_connections_know_the_builtin_arrays(
    kongtask_dsn: str, prepared: bool
) -> None:
    """Pool and dedicated connections (with and without a statement cache, as behind
    pgBouncer) send array parameters with no catalog query and decode them alike."""
    async with open_database(
        kongtask_dsn, min_size=0, max_size=1, prepared_statements=prepared
    ) as db:
        seen, row = await db.with_connection(round_trip)
        assert_values(row)
        assert seen == [ROUND_TRIP, ROUND_TRIP]
        seen, row = await _on_dedicated(db)
        assert_values(row)
        # (asyncpg's logger does not see the statements a dedicated unprepared
        # connection runs in one round trip; it would see a catalog query)
        assert [query for query in seen if query != ROUND_TRIP] == []


async def _on_dedicated(db: Database) -> tuple[list[str], Any]:
    conn = await db.connect()
    try:
        return await db.run(round_trip, conn)
    finally:
        await db.close_connection(conn)


# --- one round trip per statement without a statement cache (pgBouncer) --------------


class ExchangeCounter:
    """A TCP relay to PostgreSQL that counts round trips: the times the client sends
    after the server has answered (the client waited for that answer)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.round_trips = 0
        self._answered = True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope, True)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope, False)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope, asks: bool
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                if asks and self._answered:
                    self.round_trips += 1
                self._answered = not asks
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def counted_dsn(dsn: str) -> AsyncIterator[tuple[str, ExchangeCounter]]:
    """``dsn`` through an :class:`ExchangeCounter` (no SSL: the stream stays readable)."""
    url = urlsplit(dsn)
    assert url.hostname, "the test server is reached over TCP"
    assert url.port, "the test server is reached over TCP"
    counter = ExchangeCounter((url.hostname, url.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.serve)
        netloc = f"{url.username}@127.0.0.1:{counter.port}" if url.username else ""
        yield url._replace(netloc=netloc, query="sslmode=disable").geturl(), counter
        nursery.cancel_scope.cancel()


CLAIMISH = "select $1::text as pool, $2::int[] as task_ids, $3::int as size"


async def round_trips_per_statement(db: Database, counter: ExchangeCounter) -> list[int]:
    """Round trips of each of four runs of one statement on a new dedicated connection."""
    conn = await db.connect()
    try:
        per_run = []
        for i in range(4):
            before = counter.round_trips
            row = await db.run(conn.fetchrow, CLAIMISH, "pool-x", [1, 2, i], i)
            assert row is not None
            assert (row["pool"], row["task_ids"], row["size"]) == ("pool-x", [1, 2, i], i)
            per_run.append(counter.round_trips - before)
        return per_run
    finally:
        await db.close_connection(conn)


async def test_unprepared_dedicated_connections_take_one_round_trip(kongtask_dsn: str) -> None:
    """Without a statement cache asyncpg describes every statement in a round trip of its
    own; kongtask's dedicated connections describe each once, then run it in one."""
    async with counted_dsn(kongtask_dsn) as (dsn, counter):
        async with open_database(dsn, min_size=0, max_size=1, prepared_statements=False) as db:
            assert await round_trips_per_statement(db, counter) == [2, 1, 1, 1]
        # the same with the statement cache: prepared once, then one round trip
        async with open_database(dsn, min_size=0, max_size=1) as db:
            assert await round_trips_per_statement(db, counter) == [2, 1, 1, 1]


async def test_a_statement_described_before_a_schema_change_is_described_again(
    kongtask_dsn: str,
) -> None:
    """A reused description that no longer fits fails that one run (as the server says);
    the next run describes the statement again."""
    async with open_database(kongtask_dsn, min_size=0, max_size=1, prepared_statements=False) as db:
        await db.execute("create table described_t (a int)")
        await db.execute("insert into described_t values (1)")
        conn = await db.connect()
        try:
            query = "select * from described_t where a = $1"
            assert [tuple(r) for r in await db.run(conn.fetch, query, 1)] == [(1,)]
            await db.execute("alter table described_t add column b text default 'x'")
            # (asyncpg sees more columns than described)
            with pytest.raises((asyncpg.PostgresError, asyncpg.ProtocolError)):
                await db.run(conn.fetch, query, 1)
            assert [tuple(r) for r in await db.run(conn.fetch, query, 1)] == [(1, "x")]
        finally:
            await db.close_connection(conn)
