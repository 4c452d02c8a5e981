"""What every connection kongtask opens knows from the start.

asyncpg learns the codec of an array type by a catalog query the first time a statement
on a connection takes one; kongtask declares the built-in arrays its statements use
(``int[]`` task ids, ``bigint[]`` job ids) when the connection is made. The statements a
connection runs are observed with asyncpg's query logger, which also sees asyncpg's own
catalog queries.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

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
        assert seen == [ROUND_TRIP, ROUND_TRIP]


async def _on_dedicated(db: Database) -> tuple[list[str], Any]:
    conn = await db.connect()
    try:
        return await db.run(round_trip, conn)
    finally:
        await db.close_connection(conn)
