"""Timestamps a Python datetime cannot hold: jobs read them as documented bounds
(``datetime.min``/``max`` with ``tzinfo=UTC``), and kongtask refuses to create them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio
from _worker_helpers import add_job_row

import kongtask
from kongtask._pg import Database

J = "graphile_worker._private_jobs"
# the earliest instant at +01:00: year 0 in UTC
TOO_EARLY = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
TOO_LATE = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2)))


async def test_a_handler_reads_out_of_range_timestamps(kongtask_dsn: str, db: Database) -> None:
    """The reproduction: a job stored with run_at '0100-01-01 BC' (and created_at
    '-infinity', updated_at 'infinity') runs, and its handler reads every timestamp."""
    job_id = await add_job_row(db, "read")
    await db.execute(
        f"""update {J} set run_at = '0100-01-01 BC', created_at = '-infinity',
            updated_at = 'infinity' where id = $1""",
        job_id,
    )
    seen: list[tuple[datetime, datetime, datetime]] = []
    done = trio.Event()

    async def read(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        seen.append((job.run_at, job.created_at, job.updated_at))
        done.set()

    async with kongtask.open_worker(kongtask_dsn, {"read": read}):
        with trio.fail_after(20):
            await done.wait()
    low, high = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    assert seen == [(low, low, high)]
    assert all(t.tzinfo is UTC for t in seen[0])
    # it succeeded (a failure would have left the row with last_error)
    assert await db.fetchval(f"select count(*) from {J}") == 0


@pytest.mark.parametrize("when", [TOO_EARLY, TOO_LATE], ids=["year-0", "year-10000"])
async def test_the_client_refuses_such_a_job(db: Database, when: datetime) -> None:
    client = kongtask.Client(db, "graphile_worker")
    with pytest.raises(kongtask.ConfigError, match="outside the range"):
        await client.add_job("t", run_at=when)
    with pytest.raises(kongtask.ConfigError, match="outside the range"):
        await client.add_jobs([kongtask.JobSpec("t"), kongtask.JobSpec("t", run_at=when)])
    job = await client.add_job("t")
    with pytest.raises(kongtask.ConfigError, match="outside the range"):
        await client.reschedule_jobs([job.id], run_at=when)
    # nothing but the one valid job reached the database
    assert await db.fetchval(f"select count(*) from {J}") == 1


async def test_the_bounds_themselves_round_trip(db: Database) -> None:
    client = kongtask.Client(db, "graphile_worker")
    high = datetime.max.replace(tzinfo=UTC)
    low = datetime.min.replace(tzinfo=UTC)
    assert (await client.add_job("t", run_at=high)).run_at == high
    assert (await client.add_job("t", run_at=low)).run_at == low
