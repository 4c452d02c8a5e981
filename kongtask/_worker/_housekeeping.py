"""Housekeeping: the sweepers and checks that run beside the data path.

- the stale-lock sweep (graphile-worker's rule: rows locked for more than 4 hours are
  released), which also refreshes the pool's task ids;
- the dead-pool sweep (``kongtask._liveness``): rows of kongtask pools whose liveness lock
  is gone are released within seconds;
- the check for ready jobs of tasks this pool does not support.

Each one nudges the fetcher when it released something. None of them stops the pool: a
failed round is logged and tried again at the next one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import trio

from .. import _liveness
from .._events import EventEmitter
from .._outage import OutageLog, is_connection_lost
from .._pg import Database
from .._sql import WorkerQueries
from ._fetcher import FetchWakeup, TaskRegistry
from ._timing import WorkerTiming, sweep_delays

log = logging.getLogger("kongtask.worker")

#: A ready job of a task this pool does not support is reported once it has waited this
#: many seconds (another pool, Node or kongtask, may support it: such a pool takes ready
#: jobs within seconds, so a job left that long most likely has no worker at all).
UNSUPPORTED_AFTER: Final = 60.0
#: Seconds between two checks for such jobs: at most one warning per pool per interval.
UNSUPPORTED_CHECK_INTERVAL: Final = 300.0
#: The most jobs one check counts (it reads the claim's index; this bounds its work).
UNSUPPORTED_COUNT_LIMIT: Final = 10_000


async def run_stale_sweeps(
    sweep_once: Callable[[], Awaitable[None]], delays: Iterable[float] | None = None
) -> None:
    """Call ``sweep_once`` after each of ``delays`` (default :func:`sweep_delays`)."""
    for delay in sweep_delays() if delays is None else delays:
        await trio.sleep(delay)
        await sweep_once()


async def watch_unsupported_tasks(report: Callable[[], Awaitable[object]]) -> None:
    """Call ``report`` first after 60-120 s, then every 270-330 s (a warning at most
    every few minutes)."""
    await trio.sleep(UNSUPPORTED_AFTER * (1 + random.random()))
    while True:
        await report()
        await trio.sleep(UNSUPPORTED_CHECK_INTERVAL * (0.9 + random.random() / 5))


class Housekeeping:
    """The pool's sweepers; owns nothing but what each round reads."""

    def __init__(
        self,
        db: Database,
        queries: WorkerQueries,
        pool_id: str,
        *,
        schema: str,
        tasks: TaskRegistry,
        wakeup: FetchWakeup,
        events: EventEmitter,
        outage: OutageLog,
        timing: WorkerTiming,
    ) -> None:
        self._db = db
        self._q = queries
        self._pool_id = pool_id
        self._schema = schema
        self._tasks = tasks
        self._wakeup = wakeup
        self._events = events
        self._outage = outage
        self._timing = timing

    def start(self, nursery: trio.Nursery) -> None:
        """Start every sweeper in ``nursery`` (cancelled with it at the shutdown)."""
        nursery.start_soon(run_stale_sweeps, self.sweep_once)
        nursery.start_soon(self._dead_pool_sweeper)
        if self._tasks.identifiers:  # a pool without tasks (cron only) has nothing to compare
            nursery.start_soon(watch_unsupported_tasks, self.report_unsupported_tasks)

    def _db_warning(self, what: str, exc: BaseException) -> None:
        """A warning, unless the outage it belongs to has been reported already."""
        lost = self._outage.down and is_connection_lost(exc)
        level = logging.DEBUG if lost else logging.WARNING
        log.log(level, "pool %s: %s: %s", self._pool_id, what, exc)

    async def sweep_once(self) -> None:
        """Refresh the task ids, then release rows locked for more than 4 hours."""
        if self._tasks.ids:
            # graphile-worker's task-id garbage collection may have deleted our task rows
            # meanwhile; jobs added since carry new ids that only a fresh lookup finds
            try:
                await self._tasks.register()
            except Exception as exc:
                self._db_warning("refreshing task ids failed", exc)
        try:
            row = await self._db.fetchrow(self._q.sweep_stale)
        except Exception as exc:
            self._db_warning("stale-lock sweep failed", exc)
            return
        if row is not None and (row["jobs"] or row["queues"]):
            log.warning(
                "pool %s: released %d job(s) and %d queue(s) locked for more than 4 hours",
                self._pool_id,
                row["jobs"],
                row["queues"],
            )
            self._events.emit("pool:sweep", jobs=row["jobs"], queues=row["queues"])
            self._wakeup.nudge()

    async def _dead_pool_sweeper(self) -> None:
        """Release the rows of provably dead kongtask pools within seconds."""

        def on_release(release: _liveness.Release) -> None:
            self._events.emit(
                "pool:sweep", jobs=release.jobs, queues=release.queues, pools=release.pools
            )
            self._wakeup.nudge()

        def on_check(error: BaseException | None) -> None:
            if error is None:
                self._outage.ok("checking for dead pools")
            elif is_connection_lost(error):
                self._outage.failed("checking for dead pools", error)
            else:
                log.warning(
                    "pool %s: check for dead pools failed (will retry): %s", self._pool_id, error
                )

        await _liveness.run_dead_pool_sweeper(
            self._db,
            self._schema,
            restart_grace=self._timing.dead_pool_restart_grace,
            on_release=on_release,
            on_check=on_check,
        )

    async def report_unsupported_tasks(self) -> dict[str, int]:
        """Warn about ready jobs that waited past ``UNSUPPORTED_AFTER`` for tasks this pool
        does not support; returns ``{task identifier: jobs}`` (empty when none or on error).

        A pool knows only its own tasks: a job another pool supports is reported only when
        it waited that long, e.g. behind a backlog of that pool.
        """
        try:
            rows = await self._db.fetch(
                self._q.unsupported_tasks,
                sorted(self._tasks.names),
                UNSUPPORTED_AFTER,
                UNSUPPORTED_COUNT_LIMIT,
            )
        except Exception as exc:
            log.debug("pool %s: looking for unsupported tasks failed: %s", self._pool_id, exc)
            return {}
        # a task of ours under an id this pool has not looked up yet is not unsupported
        # (the sweeper refreshes the ids)
        supported = set(self._tasks.identifiers)
        found = {
            str(row["identifier"]): int(row["jobs"])
            for row in rows
            if row["identifier"] not in supported
        }
        if found:
            total = sum(found.values())
            log.warning(
                "pool %s: %s%d ready job(s) waited more than %.0f s for task(s) this pool "
                "does not support: %s; is a worker for them running?",
                self._pool_id,
                "at least " if total >= UNSUPPORTED_COUNT_LIMIT else "",
                total,
                UNSUPPORTED_AFTER,
                ", ".join(f"{name} ({count})" for name, count in found.items()),
            )
        return found
