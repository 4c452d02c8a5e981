"""The scheduler: graphile-worker's cron protocol (docs/design/database.md#cron).

Each (identifier, minute) is claimed in ``known_crontabs`` by one statement that also adds
the job, so any number of kongtask and Node processes running the same crontab make
exactly one job per item per minute.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import trio

from .._cron_sql import CronQueries
from .._errors import ConfigError
from .._pg import Database
from .._validate import validate_identifier
from ._items import MINUTE, CronItem, _floor_minute, check_unique_identifiers
from ._js import format_ts

log = logging.getLogger("kongtask.cron")

#: A late timer catches up missed minutes one by one (``backfilled: false``) when it is at
#: most this far behind; further behind (a big forward clock jump, a long suspend) it is
#: treated like a restart: each item catches up only as far as its ``fill`` allows.
#: Without a bound, a clock that leaps a year ahead would add half a million jobs per item.
MAX_CATCH_UP = timedelta(hours=1)
#: Longest single sleep; the wall clock is re-read at least this often, so a clock step
#: during a long wait is noticed.
MAX_SLEEP = 120.0
#: Timers are armed this long after the minute boundary, so a wall clock read on wake-up
#: is already in the new minute.
TIMER_SLACK = 0.001
#: A timer firing earlier than this (by the wall clock) is logged as a clock step back.
EARLY_WARNING = 1.0
BACKOFF_START = 0.2
BACKOFF_FACTOR = 1.5
BACKOFF_MAX = 60.0


def _ceil_minute(t: datetime) -> datetime:
    floor = _floor_minute(t)
    return floor if floor == t else floor + MINUTE


def utc_now() -> datetime:
    """The default wall clock: the current time in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KnownCrontab:
    """A ``known_crontabs`` row."""

    identifier: str
    known_since: datetime
    last_execution: datetime | None


class CronBackend(Protocol):
    """Where the scheduler's decisions go: the database, or a recorder in timing tests."""

    async def register(
        self, identifiers: Sequence[str], start: datetime
    ) -> dict[str, KnownCrontab]:
        """Register unseen identifiers; return the rows of those seen before."""
        ...

    async def schedule(self, ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
        """Claim minute ``ts`` for ``items`` and add a job for each claim won."""
        ...


class PgCronBackend:
    """The real backend: the statements of :mod:`kongtask._cron_sql`."""

    def __init__(self, db: Database, schema: str) -> None:
        validate_identifier(schema, what="schema name")
        self._db = db
        self._queries = CronQueries(schema)
        #: How many jobs this backend added (the stress script and tests read it).
        self.jobs_added = 0

    async def register(
        self, identifiers: Sequence[str], start: datetime
    ) -> dict[str, KnownCrontab]:
        rows = await self._db.fetch(self._queries.register, list(identifiers), start)
        return {
            r["identifier"]: KnownCrontab(r["identifier"], r["known_since"], r["last_execution"])
            for r in rows
        }

    async def schedule(self, ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
        args = (
            ts,
            [i.cron_id for i in items],
            [i.task for i in items],
            [i.job_payload(ts, backfilled=backfilled) for i in items],
            [i.queue_name for i in items],
            [i.max_attempts for i in items],
            [i.job_key for i in items],
            [i.priority for i in items],
            [i.effective_job_key_mode for i in items],
        )
        ids = await self._db.run(_schedule_with_retry, self._db.pool, self._queries.schedule, args)
        self.jobs_added += len(ids)


async def _schedule_with_retry(pool: Any, sql: str, args: tuple[Any, ...]) -> list[int]:
    # asyncio side (one crossing). Two schedulers upserting several identifiers can
    # deadlock when a Node process locks them in another order; the victim simply
    # retries, and by then the winner's claims make the retry add nothing twice.
    for attempt in range(5):
        try:
            rows = await pool.fetch(sql, *args)
            return [r["id"] for r in rows]
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            if attempt == 4:
                raise
            log.info("cron: retrying a minute after %s", type(exc).__name__)
    raise AssertionError("unreachable")


class CronScheduler:
    """The scheduling loop (docs/design/database.md#cron) over a :class:`CronBackend`.

    ``wall_clock`` gives UTC time; trio time only measures the sleeps, which are derived
    from it. :func:`run_cron_scheduler` is the public entry point.
    """

    def __init__(
        self,
        items: Sequence[CronItem],
        backend: CronBackend,
        wall_clock: Callable[[], datetime] = utc_now,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.items = list(items)
        check_unique_identifiers(self.items)
        self._backend = backend
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._delay = BACKOFF_START
        #: Set once the first startup and backfill have finished and live scheduling began.
        self.live = trio.Event()
        #: How many times the loop restarted after an error.
        self.restarts = 0

    def _now(self) -> datetime:
        now = self._wall_clock()
        if now.tzinfo is None:
            raise ConfigError("the cron wall clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    async def run(self) -> None:
        """Run forever (until cancelled), restarting with backoff after any error."""
        while True:
            try:
                await self._run_once()
            except Exception as exc:
                # trio.Cancelled is a BaseException and passes through.
                wait = min(BACKOFF_MAX, self._delay * self._rng.uniform(0.75, 1.25))
                self._delay = min(BACKOFF_MAX, self._delay * BACKOFF_FACTOR)
                self.restarts += 1
                log.error("cron failed, restarting in %.2fs: %r", wait, exc, exc_info=exc)
                await trio.sleep(wait)

    async def _run_once(self) -> None:
        ts = await self._startup(self._now())
        self.live.set()
        while True:
            ts = await self._tick(ts)

    async def _startup(self, start: datetime) -> datetime:
        """Register identifiers and backfill; return the first live minute."""
        known = await self._backend.register([i.cron_id for i in self.items], start)
        self._delay = BACKOFF_START
        fills = [i.fill for i in self.items if i.cron_id in known and i.fill > timedelta(0)]
        if fills:
            ts = _ceil_minute(start - max(fills))
            while ts < start:
                due = []
                for item in self.items:
                    row = known.get(item.cron_id)
                    if row is None or item.fill < start - ts:
                        continue
                    # The minute of last_execution itself is done already (the upsert
                    # would refuse it), so start after it; known_since is inclusive.
                    if row.last_execution is not None:
                        fresh = ts > row.last_execution
                    else:
                        fresh = ts >= row.known_since
                    if fresh and item.matches(ts):
                        due.append(item)
                if due:
                    await self._backend.schedule(ts, due, True)
                ts += MINUTE
        return _ceil_minute(start)

    async def _tick(self, ts: datetime) -> datetime:
        """Wait for minute ``ts``, schedule it (and any missed ones); return the next."""
        while True:
            now = self._now()
            if now >= ts:
                break
            delay = (ts - now).total_seconds() + TIMER_SLACK
            await trio.sleep(min(delay, MAX_SLEEP))
            if delay <= MAX_SLEEP:
                after = self._now()
                if after < ts:
                    # NTP slewing makes the wall clock lag trio's clock by milliseconds;
                    # only a real step back deserves a warning. Either way: re-arm.
                    early = (ts - after).total_seconds()
                    log.log(
                        logging.WARNING if early > EARLY_WARNING else logging.DEBUG,
                        "cron timer fired %.3fs early (the wall clock went back); "
                        "re-arming for %s without scheduling",
                        early,
                        format_ts(ts),
                    )
        behind = _floor_minute(now) - ts
        if behind > MAX_CATCH_UP:
            log.warning(
                "cron timer is %s late (the wall clock jumped forward or the process was "
                "suspended); skipping to now and backfilling as after a restart",
                behind,
            )
            return await self._startup(now)
        if behind > timedelta(0):
            log.warning(
                "cron timer is %s late (the wall clock jumped forward or the process was "
                "paused); catching up %d missed minutes",
                behind,
                behind // MINUTE,
            )
        while ts <= now:
            due = [item for item in self.items if item.matches(ts)]
            if due:
                await self._backend.schedule(ts, due, False)
            self._delay = BACKOFF_START
            ts += MINUTE
            now = self._now()
        return ts


async def run_cron_scheduler(
    db: Database,
    schema: str,
    items: Sequence[CronItem],
    *,
    wall_clock: Callable[[], datetime] = utc_now,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Schedule ``items`` forever (until cancelled), sharing the work with other workers.

    Registers the identifiers in ``known_crontabs``, backfills missed minutes up to each
    item's ``fill``, then wakes at every minute boundary and adds the jobs due. Any
    number of kongtask and Node graphile-worker processes may run the same items on the
    same database: each item gets exactly one job per minute. Errors restart the
    scheduler (backfill included) after 200 ms, growing ×1.5 with jitter up to 60 s.

    Args:
      db: the database.
      schema: the graphile-worker schema.
      items: the crontab (identifiers must be unique).
      wall_clock: returns the current time as an aware datetime (tests move it).
      task_status: ``nursery.start`` support; reported started once the items are
        validated (before the first database round trip, so a down database does not
        block the caller).

    Raises:
      CrontabError: two items share an identifier (before reporting started).
    """
    scheduler = CronScheduler(items, PgCronBackend(db, schema), wall_clock)
    task_status.started()
    if not scheduler.items:
        await trio.sleep_forever()
    await scheduler.run()
