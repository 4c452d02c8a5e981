"""kongtask's schema equals graphile-worker 0.18.0's, object for object (SCHEMA.md §9.3).

Each test migrates a blank database with kongtask and compares it against one migrated by
the real graphile-worker from npm: ``pg_dump`` output with function bodies masked, plus the
catalog facts a dump cannot show in full (function attributes, RLS, sequences, triggers,
``migrations`` rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from oracle import oracle_migrate, require_oracle
from schema_dump import catalog_snapshot, masked_dump, require_pg_dump, server_version_num

from kongtask._migrate import migrate
from kongtask._pg import open_database

pytestmark = pytest.mark.oracle

SCHEMAS = ["graphile_worker", 'Weird "Schema"']

Snapshot = tuple[str, dict[str, Any]]


async def snapshot(dsn: str, schema: str) -> Snapshot:
    async with open_database(dsn, max_size=1) as db:
        require_pg_dump(await db.with_connection(server_version_num))
        catalog = await db.with_connection(catalog_snapshot, schema)
    return await trio.to_thread.run_sync(masked_dump, dsn, schema), catalog


@pytest.fixture(scope="module")
def oracle_snapshots() -> dict[str, Snapshot]:
    """Snapshots of databases migrated by graphile-worker 0.18.0, built once per schema."""
    return {}


async def blank_db(make_db: Callable[..., str]) -> str:
    # The factory runs its own asyncio loop, which cannot nest inside trio-asyncio.
    return await trio.to_thread.run_sync(lambda: make_db(migrated=False))


async def oracle_snapshot(
    cache: dict[str, Snapshot], make_db: Callable[..., str], schema: str
) -> Snapshot:
    if schema not in cache:
        require_oracle("0.18.0")
        dsn = await blank_db(make_db)
        await trio.to_thread.run_sync(lambda: oracle_migrate(dsn, version="0.18.0", schema=schema))
        cache[schema] = await snapshot(dsn, schema)
    return cache[schema]


def assert_same(kong: Snapshot, oracle: Snapshot) -> None:
    kong_dump, kong_catalog = kong
    oracle_dump, oracle_catalog = oracle
    # Guard against comparing two empty dumps (e.g. a schema pattern that matched nothing).
    for needle in ("CREATE VIEW", "jobs_pkey1", "jobs_id_seq1", "job_spec", "ROW LEVEL SECURITY"):
        assert needle in oracle_dump, needle
    assert len(oracle_catalog["procs"]) == 7
    assert kong_dump.splitlines() == oracle_dump.splitlines()
    for key in oracle_catalog:
        assert kong_catalog[key] == oracle_catalog[key], key


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_fresh_install_equals_graphile_worker_0_18_0(
    schema: str,
    kongtask_database_factory: Callable[..., str],
    oracle_snapshots: dict[str, Snapshot],
) -> None:
    oracle = await oracle_snapshot(oracle_snapshots, kongtask_database_factory, schema)
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
    oracle_snapshots: dict[str, Snapshot],
) -> None:
    oracle = await oracle_snapshot(oracle_snapshots, kongtask_database_factory, "graphile_worker")
    require_oracle("0.17.3")
    dsn = await blank_db(kongtask_database_factory)
    await trio.to_thread.run_sync(lambda: oracle_migrate(dsn, version="0.17.3"))
    async with open_database(dsn, max_size=1) as db:
        assert await db.fetchval("select max(id) from graphile_worker.migrations") == 19
        await migrate(db)
    assert_same(await snapshot(dsn, "graphile_worker"), oracle)
