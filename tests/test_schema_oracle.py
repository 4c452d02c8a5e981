"""kongtask's schema equals graphile-worker 0.18.0's, object for object (SCHEMA.md §9.3).

Each test migrates a blank database with kongtask and compares it against one migrated by
the real graphile-worker from npm: ``pg_dump`` output with function bodies masked, plus the
catalog facts a dump cannot show in full (function attributes, RLS, sequences, triggers,
``migrations`` rows).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from schema_dump import assert_same, blank_db, oracle_snapshot, run_oracle, snapshot

from kongtask._migrate import migrate
from kongtask._pg import open_database

pytestmark = pytest.mark.oracle


@pytest.mark.parametrize("schema", ["graphile_worker", 'Weird "Schema"'])
async def test_fresh_install_equals_graphile_worker_0_18_0(
    schema: str, kongtask_database_factory: Callable[..., str]
) -> None:
    oracle = await oracle_snapshot(kongtask_database_factory, schema)
    dsn = await blank_db(kongtask_database_factory)
    async with open_database(dsn, max_size=1) as db:
        await migrate(db, schema)
    kong = await snapshot(dsn, schema)
    assert_same(kong, oracle)
    migrations = kong[1]["migrations"]
    assert [m[0] for m in migrations] == list(range(1, 21))
    assert [m[0] for m in migrations if m[1]] == [1, 3, 11, 13, 14, 16, 19]


async def test_0_17_3_database_upgraded_by_kongtask_equals_0_18_0(
    kongtask_database_factory: Callable[..., str],
) -> None:
    oracle = await oracle_snapshot(kongtask_database_factory, "graphile_worker")
    dsn = await blank_db(kongtask_database_factory)
    await run_oracle(dsn, "0.17.3")
    async with open_database(dsn, max_size=1) as db:
        assert await db.fetchval("select max(id) from graphile_worker.migrations") == 19
        await migrate(db)
    assert_same(await snapshot(dsn, "graphile_worker"), oracle)
