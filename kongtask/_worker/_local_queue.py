"""The local queue: claimed jobs not started yet, and the idle workers waiting for them.

It is a deque, not a memory channel: unstarted jobs must be taken back (the TTL, a
recheck, the shutdown), and handing a job to a worker without a channel hop keeps the
per-job path short. The fetcher appends at the back; workers pop from the front; idle
workers park on a :class:`trio.lowlevel.ParkingLot`. A job held here is locked by the pool
in the database, so everything that leaves without running goes back through the
completer (``Completer.send_returns``/``hand_back``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence

import trio

from .._held import claim_snapshot, needs_recheck
from .._job import Job
from .._pg import Database
from .._sql import WorkerQueries, recheck
from ._completer import Completer
from ._lifecycle import Lifecycle
from ._timing import WorkerTiming

log = logging.getLogger("kongtask.worker")


class LocalQueue:
    """Held jobs with their claim times (trio clock), oldest first.

    Attributes:
      held: the ``(job, claimed_at)`` entries; the runner pops from the front.
      idle_workers: workers parked, waiting for a job.
      ttl: seconds a job may be held before it is handed back unstarted.
    """

    __slots__ = ("_parked", "held", "idle_workers", "ttl")

    def __init__(self, ttl: float) -> None:
        self.held: deque[tuple[Job, float]] = deque()
        self._parked = trio.lowlevel.ParkingLot()
        self.idle_workers = 0
        self.ttl = ttl

    def __len__(self) -> int:
        return len(self.held)

    def add(self, jobs: Sequence[Job], now: float, *, wake: bool = True) -> None:
        """Hold ``jobs`` claimed at ``now`` and wake as many idle workers."""
        held = self.held
        for job in jobs:
            held.append((job, now))
        if wake:
            self._parked.unpark(count=min(len(jobs), len(self._parked)))

    async def wait(self) -> None:
        """Park an idle worker until jobs arrive (or :meth:`wake_all`)."""
        self.idle_workers += 1
        try:
            await self._parked.park()
        finally:
            self.idle_workers -= 1

    def wake_all(self) -> None:
        """Wake every parked worker (the pool is stopping)."""
        self._parked.unpark_all()

    def ttl_deadline(self) -> float:
        """When the oldest held job expires (``inf``: none held)."""
        held = self.held
        return held[0][1] + self.ttl if held else math.inf

    def expire(self, now: float) -> list[Job]:
        """Remove and return the jobs held longer than the TTL (another pool may be idle)."""
        held = self.held
        limit = now - self.ttl
        expired: list[Job] = []
        while held and held[0][1] <= limit:
            expired.append(held.popleft()[0])
        return expired

    def take_all(self) -> list[Job]:
        """Remove and return every held job."""
        jobs = [job for job, _ in self.held]
        self.held.clear()
        return jobs

    def ids(self) -> set[int]:
        """The ids of the held jobs."""
        return {job.id for job, _ in self.held}


class HeldRecheck:
    """Looks at held jobs' rows again before they start (``kongtask._held``).

    It owns the memory of the last recheck: the claim time of the newest job it covered
    and when its answer came. One recheck runs at a time; other workers wait for it.
    """

    def __init__(
        self,
        db: Database,
        queries: WorkerQueries,
        pool_id: str,
        queue: LocalQueue,
        completer: Completer,
        lifecycle: Lifecycle,
        timing: WorkerTiming,
    ) -> None:
        self._db = db
        self._q = queries
        self._pool_id = pool_id
        self._queue = queue
        self._completer = completer
        self._lifecycle = lifecycle
        self._timing = timing
        self.after = timing.recheck_after
        self.covered_up_to = -math.inf
        self.checked_at = -math.inf
        self._errors = 0
        self._lock = trio.Lock()

    def due(self, now: float, claimed_at: float) -> bool:
        """Whether a job claimed at ``claimed_at`` must be looked at before it starts."""
        return needs_recheck(now, claimed_at, self.covered_up_to, self.checked_at, self.after)

    async def run(self) -> None:
        """Look at every held job's row again (one statement); drop and hand back those
        changed since their claim."""
        async with self._lock:
            held = self._queue.held
            now = trio.current_time()
            if self._lifecycle.stopping or not held:
                return
            if not self.due(now, held[0][1]):
                return  # the recheck this worker waited for covered it
            entries = list(held)
            snapshot = claim_snapshot(job for job, _ in entries)
            try:
                with trio.fail_after(self._timing.statement_timeout):
                    valid = await self._db.with_own_connection(
                        recheck, self._q, self._pool_id, snapshot
                    )
            except Exception as exc:
                # an unchecked job must not start: try again later (the TTL still
                # hands them back, and the shutdown too)
                self._errors += 1
                log.warning("pool %s: rechecking held jobs failed: %s", self._pool_id, exc)
                with trio.move_on_after(self._timing.retry_delay(self._errors)):
                    await self._lifecycle.stop_requested.wait()
                return
            self._errors = 0
            self.covered_up_to = entries[-1][1]
            # counted from the answer, so that a recheck slower than the threshold still
            # lets the jobs it covered start (the window grows by its round trip)
            self.checked_at = trio.current_time()
            changed = {i for i in snapshot[0] if i not in valid}
            if not changed:
                return
            # the fetcher may have added jobs and the TTL taken some meanwhile: keep
            # whatever is held now except the changed ones, in order (same deque)
            kept = [entry for entry in held if entry[0].id not in changed]
            dropped = [job for job, _ in held if job.id in changed]
            held.clear()
            held.extend(kept)
            if dropped:
                log.info(
                    "pool %s: not starting %d held job(s) changed since their claim "
                    "(removed, replaced or administered)",
                    self._pool_id,
                    len(dropped),
                )
                self._completer.send_returns(dropped, "changed")
