"""The jobs table's planner statistics (kongtask._worker._statistics), on a real server.

A jobs table filled past what its statistics counted is analyzed once by a pool that
sees a backlog; a small table, a table whose statistics are current, and a role that
does not own the table are left alone. The rate limit is checked on a MockClock.

Rules: real PostgreSQL; the statistics system's row count is read with a poll under a
deadline (a closing connection reports its inserts asynchronously).
"""

from __future__ import annotations

from typing import cast
from urllib.parse import urlsplit, urlunsplit

import trio
import trio.testing
from test_worker import wait_until

import kongtask
from kongtask._pg import Database, open_database
from kongtask._sql import WorkerQueries
from kongtask._worker._statistics import MIN_ROWS, StatisticsKeeper
from kongtask.testing import run_sync_sql

S = "graphile_worker"
J = f"{S}._private_jobs"
Q = WorkerQueries(S)


def _fill_sql(n: int) -> str:
    return f"""select count(*) from {S}.add_jobs(array(
  select json_populate_record(null::{S}.job_spec,
    json_build_object('identifier', 'noop', 'payload', '{{}}'::json))
  from generate_series(1, {int(n)})))"""


COUNTS = f"""select s.n_live_tup, s.analyze_count, c.reltuples
from pg_stat_user_tables s join pg_class c on c.oid = s.relid
where s.schemaname = '{S}' and s.relname = '_private_jobs'"""


async def _counts(db: Database) -> tuple[int, int, float]:
    row = await db.fetchrow(COUNTS)
    assert row is not None
    return int(row["n_live_tup"]), int(row["analyze_count"]), float(row["reltuples"])


async def _fill(dsn: str, db: Database, n: int) -> None:
    """Add ``n`` jobs on a connection of their own, then wait until they are counted."""
    before = (await _counts(db))[0]
    await trio.to_thread.run_sync(run_sync_sql, dsn, _fill_sql(n))

    async def counted() -> bool:
        return (await _counts(db))[0] >= before + n

    await wait_until(counted, limit=30)


async def test_a_table_grown_past_its_statistics_is_analyzed_once(
    kongtask_dsn: str, db: Database
) -> None:
    await _fill(kongtask_dsn, db, MIN_ROWS + 500)
    assert (await _counts(db))[1:] == (0, -1)  # never analyzed: no statistics
    keeper = StatisticsKeeper(db, Q, "pool-test")
    assert await keeper.analyze_if_stale()
    live, analyzed, counted = await _counts(db)
    assert analyzed == 1
    assert counted == live == MIN_ROWS + 500
    # the statistics describe the table now: no second ANALYZE
    assert not await keeper.analyze_if_stale()
    assert (await _counts(db))[1] == 1
    assert (keeper.checks, keeper.analyses) == (2, 1)


async def test_a_small_table_is_not_analyzed(kongtask_dsn: str, db: Database) -> None:
    await _fill(kongtask_dsn, db, MIN_ROWS - 1)
    keeper = StatisticsKeeper(db, Q, "pool-test")
    assert not await keeper.analyze_if_stale()
    assert (await _counts(db))[1] == 0


async def test_a_table_that_kept_its_size_is_not_analyzed_again(
    kongtask_dsn: str, db: Database
) -> None:
    await _fill(kongtask_dsn, db, MIN_ROWS)
    await db.execute(f"analyze {J}")
    # a backlog that grew, but not tenfold, keeps a plan made from these statistics
    await _fill(kongtask_dsn, db, 3 * MIN_ROWS)
    keeper = StatisticsKeeper(db, Q, "pool-test")
    assert not await keeper.analyze_if_stale()
    assert (await _counts(db))[1] == 1


async def test_a_role_that_does_not_own_the_table_does_not_try(
    kongtask_dsn: str, db: Database
) -> None:
    await db.execute("drop role if exists kongtask_stats_reader")
    await db.execute("create role kongtask_stats_reader login")
    await _fill(kongtask_dsn, db, MIN_ROWS + 500)
    url = urlsplit(kongtask_dsn)
    reader_dsn = urlunsplit(url._replace(netloc=f"kongtask_stats_reader@{url.hostname}:{url.port}"))
    try:
        async with open_database(reader_dsn) as reader:
            keeper = StatisticsKeeper(reader, Q, "pool-test")
            assert not await keeper.analyze_if_stale()
            assert (keeper.checks, keeper.analyses) == (1, 0)
        assert (await _counts(db))[1] == 0
    finally:
        await db.execute("drop role kongtask_stats_reader")


async def test_a_pool_draining_a_fresh_backlog_analyzes_the_table(
    kongtask_dsn: str, db: Database
) -> None:
    await _fill(kongtask_dsn, db, MIN_ROWS + 500)

    async def noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        pass

    async def drained_and_analyzed() -> bool:
        left = await db.fetchval(f"select count(*) from {J}")
        return left == 0 and (await _counts(db))[1] == 1

    async with kongtask.open_worker(kongtask_dsn, {"noop": noop}, concurrency=10):
        await wait_until(drained_and_analyzed, limit=60)


class _CountingKeeper(StatisticsKeeper):
    """Counts checks instead of reading the catalog (for the time logic alone)."""

    def __init__(self, interval: float) -> None:
        super().__init__(cast(Database, None), Q, "pool-test", check_interval=interval)
        self.at: list[float] = []

    async def analyze_if_stale(self) -> bool:
        self.at.append(trio.current_time())
        return False


async def test_checks_follow_backlogs_at_most_once_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keeper = _CountingKeeper(interval=10)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(5)
        assert keeper.at == []  # no backlog, no check
        keeper.backlog_seen()
        await trio.sleep(1)
        keeper.backlog_seen()  # within the interval: one more check, when it ends
        keeper.backlog_seen()
        await trio.sleep(30)
        keeper.backlog_seen()  # long after: checked at once
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert [round(t - start, 3) for t in keeper.at] == [5, 15, 36]
