"""Upgrading databases left by older graphile-worker releases.

For each old release: migrate a blank database with it, seed jobs and crontab rows, then
upgrade it with kongtask. The result must dump exactly like a fresh graphile-worker 0.18.0
database, and its data must equal the same seed upgraded by graphile-worker 0.18.0 itself.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from schema_dump import (
    OracleDatabases,
    ScratchDatabases,
    assert_same,
    jobs_snapshot,
    run_oracle,
    snapshot,
)

from kongtask._errors import MigrationError
from kongtask._migrate import LOCKED_JOBS_MESSAGE, migrate, migrate_connection
from kongtask._pg import Database, open_database

pytestmark = pytest.mark.oracle

# (npm version, highest migration it installs, name of the jobs table at that state)
OLD_VERSIONS = [
    ("0.13.0", 10, "jobs", "known_crontabs"),
    ("0.15.1", 14, "jobs", "known_crontabs"),
    ("0.16.6", 18, "_private_jobs", "_private_known_crontabs"),
    ("0.17.3", 19, "_private_jobs", "_private_known_crontabs"),
]

SEED = """
select graphile_worker.add_job('plain', '{{"n":1}}', run_at => '2030-01-01Z');
select graphile_worker.add_job('queued', '{{"n":2}}', 'q', '2030-01-02Z', priority => 3);
select graphile_worker.add_job('queued', '{{"n":3}}', 'q', '2030-01-03Z');
select graphile_worker.add_job('keyed', '{{"v":1}}', job_key => 'k1', run_at => '2030-01-04Z');
select graphile_worker.add_job('keyed', '{{"v":2}}', job_key => 'k1', run_at => '2030-01-05Z');
select graphile_worker.add_job('batch', '[1,2]', job_key => 'b', run_at => '2030-01-06Z');
select graphile_worker.add_job('batch', '[3]', job_key => 'b', run_at => '2030-01-06Z');
select graphile_worker.add_job(
  'flagged', '{{}}', run_at => '2030-01-07Z', flags => array['x', 'y'], max_attempts => 5
);
select graphile_worker.add_job(
  'failed', '{{}}', run_at => '2030-01-08Z', job_key => 'dead', max_attempts => 3
);
update graphile_worker.{jobs} set attempts = max_attempts, last_error = 'boom'
  where key = 'dead';
select graphile_worker.add_job('stale', '{{}}', 'q2', '2030-01-09Z', job_key => 'stale');
update graphile_worker.{jobs}
  set locked_at = now() - interval '5 hours', locked_by = 'worker-stale', attempts = 1
  where key = 'stale';
insert into graphile_worker.{crontabs} (identifier, known_since, last_execution) values
  ('cron-a', '2026-01-01Z', '2026-01-02Z'),
  ('cron-b', '2026-01-01Z', null);
"""


async def seed(dsn: str, jobs: str, crontabs: str) -> None:
    async with open_database(dsn, max_size=1) as db:
        await db.execute(SEED.format(jobs=jobs, crontabs=crontabs))


async def data(db: Database) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    jobs = await db.with_connection(jobs_snapshot, "graphile_worker")
    crons = await db.fetch(
        "select identifier, known_since, last_execution"
        " from graphile_worker._private_known_crontabs order by identifier"
    )
    return jobs, [tuple(r) for r in crons]


@pytest.mark.parametrize(("version", "state", "jobs", "crontabs"), OLD_VERSIONS)
async def test_upgrade_from_old_graphile_worker(
    version: str,
    state: int,
    jobs: str,
    crontabs: str,
    scratch: ScratchDatabases,
    oracle_dbs: OracleDatabases,
) -> None:
    """Three databases: kongtask's own migrations 1..N (``inter``), and the old release's
    state N, seeded, then upgraded by kongtask (``kong``) or by graphile-worker 0.18.0 (``gw``).
    """
    oracle = await oracle_dbs.snapshot()
    kong_dsn = await scratch.create()
    inter_dsn = await scratch.create()

    async def kong_up_to_state() -> None:
        async with open_database(inter_dsn, max_size=1) as db:
            await db.with_connection(migrate_connection, "graphile_worker", up_to=state)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_oracle, kong_dsn, version)
        nursery.start_soon(kong_up_to_state)
    gw_dsn = await scratch.create(template=kong_dsn)  # cheaper than starting Node again

    # 1. kongtask's migrations 1..N leave what the old release left (function bodies aside).
    if state < 16:
        # Releases before 0.16 have no `breaking` column; migrators since 0.16 (kongtask
        # included) add and back-fill it first, so do that to the old release's state here.
        async with open_database(gw_dsn, max_size=1) as db:
            await db.execute(
                "alter table graphile_worker.migrations"
                " add column breaking boolean not null default false;"
                " update graphile_worker.migrations set breaking = true"
                " where id in (1, 3, 11, 13, 14)"
            )
    old_dump, old_catalog = await snapshot(gw_dsn, "graphile_worker")
    inter_dump, inter_catalog = await snapshot(inter_dsn, "graphile_worker")
    assert f"graphile_worker.{jobs} " in old_dump
    assert inter_dump.splitlines() == old_dump.splitlines()
    assert inter_catalog == old_catalog

    # 2. The same seed, upgraded by kongtask and by graphile-worker 0.18.0.
    await seed(kong_dsn, jobs, crontabs)
    await seed(gw_dsn, jobs, crontabs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_oracle, gw_dsn, "0.18.0")
        async with open_database(kong_dsn, max_size=1) as db:
            assert await db.fetchval("select max(id) from graphile_worker.migrations") == state
            await migrate(db)
            kong_data = await data(db)
    assert_same(await snapshot(kong_dsn, "graphile_worker"), oracle)

    async with open_database(gw_dsn, max_size=1) as db:
        gw_data = await data(db)
    assert len(kong_data[0]) == 8
    assert kong_data == gw_data


async def test_locked_legacy_job_blocks_migration_11(scratch: ScratchDatabases) -> None:
    dsn = await scratch.create()
    await run_oracle(dsn, "0.13.0")
    async with open_database(dsn, max_size=1) as db:
        await db.execute(
            "select graphile_worker.add_job('t', '{}');"
            " update graphile_worker.jobs set locked_at = now(), locked_by = 'worker-0123456789'"
        )
        with pytest.raises(MigrationError) as info:
            await migrate(db)
        assert str(info.value) == LOCKED_JOBS_MESSAGE
        # Rolled back: still at 10 (with the `breaking` column adopted), legacy table intact.
        assert await db.fetchval("select max(id) from graphile_worker.migrations") == 10
        assert await db.fetchval("select count(*) from graphile_worker.jobs") == 1
        breaking = await db.fetch(
            "select id from graphile_worker.migrations where breaking order by id"
        )
        assert [r[0] for r in breaking] == [1, 3]
