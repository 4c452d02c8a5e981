"""Planner statistics for the jobs table, refreshed when a backlog outgrows them.

The claim's plan depends on the jobs table's column statistics. A table that was never
analyzed with jobs in it (a new database, or one last analyzed while nearly empty)
leaves the planner with default selectivities: it believes almost no job lacks a queue,
so it reads and sorts every ready job on each claim instead of walking the claim's index
and stopping at the limit. A drain of such a table costs O(backlog) per claim until
autovacuum's next visit, which is up to a minute away (docs/performance.md, "A fresh
table's statistics").

So when a claim hits its limit (a backlog), the pool asks, at most once per
:data:`CHECK_INTERVAL`, whether the table holds far more rows than its statistics
describe (:data:`GROWTH_FACTOR` times, and at least :data:`MIN_ROWS`), and if so
analyzes it and its queue table. The check is one catalog read; the ``ANALYZE`` skips a
table another session is vacuuming or analyzing instead of waiting, and is only tried
by a role that owns the table (for anyone else it would be a no-op with a warning).
Nothing here can stop the pool: a failure is logged and the next backlog tries again.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .._outage import is_connection_lost
from .._pg import Database
from .._sql import JOBS_STATISTICS_STALE, WorkerQueries

log = logging.getLogger("kongtask.worker")

#: Seconds between two checks of one pool (a check is a catalog read; each pool checks
#: only while its claims hit their limit). The row count a check reads can lag a bulk
#: insert by up to ten seconds, so a backlog that was not counted yet is looked at again
#: soon.
CHECK_INTERVAL: Final = 10.0
#: Fewer live rows than this never trigger an ANALYZE: sorting them costs little.
MIN_ROWS: Final = 5_000
#: The statistics are stale when the table holds this many times the rows they counted.
#: A table that keeps its size (a steady backlog) is never analyzed again by the pool.
GROWTH_FACTOR: Final = 10


class StatisticsKeeper:
    """Owns the "a backlog was seen" flag and the check it triggers."""

    def __init__(
        self,
        db: Database,
        queries: WorkerQueries,
        pool_id: str,
        *,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self._db = db
        self._q = queries
        self._pool_id = pool_id
        self._check_interval = check_interval
        self._backlog = trio.Event()
        self.checks = 0
        self.analyses = 0

    def backlog_seen(self) -> None:
        """A claim hit its limit (called by the fetcher; cheap, never blocks)."""
        self._backlog.set()

    async def run(self) -> None:
        """Check after each backlog, at most once per ``check_interval``, until cancelled."""
        while True:
            await self._backlog.wait()
            # a backlog seen from now on (during the check or the pause) is checked next
            self._backlog = trio.Event()
            await self.analyze_if_stale()
            await trio.sleep(self._check_interval)

    async def analyze_if_stale(self) -> bool:
        """Analyze the jobs and queue tables if the jobs table's statistics are stale;
        whether an ``ANALYZE`` ran."""
        self.checks += 1
        try:
            row = await self._db.fetchrow(
                JOBS_STATISTICS_STALE, MIN_ROWS, GROWTH_FACTOR, self._q.schema
            )
            if row is None:  # not the owner (or the table is gone)
                return False
            if not row["stale"]:
                return False
            await self._db.execute(self._q.analyze_job_tables)
        except Exception as exc:
            # an outage is reported by the claim loop already
            level = logging.DEBUG if is_connection_lost(exc) else logging.WARNING
            log.log(level, "pool %s: analyzing the jobs table failed: %s", self._pool_id, exc)
            return False
        self.analyses += 1
        log.info(
            "pool %s: analyzed the jobs table (about %d rows; its statistics counted %s)",
            self._pool_id,
            row["live_rows"],
            "none" if row["counted_rows"] < 0 else int(row["counted_rows"]),
        )
        return True
