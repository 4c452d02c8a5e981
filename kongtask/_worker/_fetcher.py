"""The fetcher: claims jobs into the local queue, one claim in flight at a time.

It sleeps until something may have changed (a nudge: a NOTIFY, a freed worker, an
unlocked named queue; the poll interval; the next TTL expiry or lost-claim check), then
claims a batch sized by :class:`~._claim_sizing.ClaimSizer`. Between claims it hands back
expired held jobs (through the completer) and, after a claim whose reply was lost, looks
for that claim's jobs (``Fetcher._reconcile_locks``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import asyncpg
import trio

from .._events import EventEmitter
from .._health import IoCounters
from .._job import Job
from .._outage import OutageLog, is_connection_lost
from .._pg import Database
from .._sql import WorkerQueries, claim_jobs, register_tasks
from ._claim_sizing import ClaimSizer
from ._completer import Completer
from ._lifecycle import Lifecycle
from ._local_queue import LocalQueue
from ._timing import WorkerTiming

log = logging.getLogger("kongtask.worker")

#: The claiming connection's session (docs/design/worker.md):
#: - its one statement is planned once, not for each claim (a new plan is made after an
#:   ANALYZE of the jobs table);
#: - its commits do not wait for the WAL flush. A claim lost to a server crash only
#:   unlocks its jobs again (attempts not counted), which the crash does to running jobs
#:   anyway; outcomes are still written with synchronous commits, and a completion's
#:   flush covers the claim before it.
CLAIM_SESSION_SETTINGS: Final = {
    "plan_cache_mode": "force_generic_plan",
    "synchronous_commit": "off",
}

#: What the fetcher is doing (``WorkerStatistics.fetcher``).
CLAIMING: Final = "claiming"
WAITING_FOR_CAPACITY: Final = "waiting for capacity"
WAITING_FOR_JOBS: Final = "waiting for jobs"


class FetchWakeup:
    """The fetcher's wake-ups, and what it waits for.

    Nudges travel over a one-slot memory channel: a nudge is a hint, so a full slot
    already says everything and further ones are dropped.

    Attributes:
      state: CLAIMING, WAITING_FOR_CAPACITY or WAITING_FOR_JOBS.
    """

    __slots__ = ("_recv", "_send", "sizer", "state")

    def __init__(self, sizer: ClaimSizer) -> None:
        self._send, self._recv = trio.open_memory_channel[None](1)
        self.sizer = sizer
        self.state = CLAIMING

    def nudge(self) -> None:
        """Wake the fetcher (something may be ready)."""
        try:  # noqa: SIM105  (a hot path: no context manager per nudge)
            self._send.send_nowait(None)
        except trio.WouldBlock:
            pass  # a nudge is already waiting: the fetcher will look anyway

    def capacity_freed(self, in_flight: int) -> None:
        """A job ended: wake a fetcher that waits for capacity once enough is free."""
        if self.state is WAITING_FOR_CAPACITY and in_flight <= self.sizer.refill_below:
            self.nudge()

    def worker_idle(self) -> None:
        """A worker found nothing held: wake a fetcher that waits for capacity."""
        if self.state is WAITING_FOR_CAPACITY:
            self.nudge()

    def forget(self) -> None:
        """Drop nudges sent before now: the fetcher is about to look at everything."""
        while True:
            try:
                self._recv.receive_nowait()
            except trio.WouldBlock:
                return

    def pending(self) -> bool:
        """Whether a nudge is waiting."""
        return self._recv.statistics().current_buffer_used > 0

    async def wait(self, deadline: float, state: str) -> None:
        """Wait for a nudge until ``deadline``, in ``state``."""
        self.state = state
        try:
            with trio.move_on_at(deadline):
                await self._recv.receive()
        finally:
            self.state = CLAIMING


class TaskRegistry:
    """The pool's task identifiers and their ids in the database.

    graphile-worker's task-id garbage collection may delete task rows: jobs added since
    carry new ids that only a fresh lookup finds (the sweeper refreshes them).
    """

    def __init__(self, db: Database, queries: WorkerQueries, identifiers: Iterable[str]) -> None:
        self._db = db
        self._q = queries
        self.identifiers = sorted(identifiers)
        self.ids: dict[str, int] = {}
        self.names: dict[int, str] = {}

    async def register(self) -> None:
        """Look up (and insert) the ids of the pool's tasks; raises on error."""
        if not self.identifiers:
            return
        ids = await self._db.with_own_connection(register_tasks, self._q, self.identifiers)
        self.ids = ids
        # keep old ids too: a claim in flight may still return them
        self.names = {**self.names, **{v: k for k, v in ids.items()}}


class Fetcher:
    """The claim loop; owns the claiming connection and the lost-claim schedule."""

    def __init__(
        self,
        db: Database,
        queries: WorkerQueries,
        pool_id: str,
        *,
        tasks: TaskRegistry,
        queue: LocalQueue,
        completer: Completer,
        wakeup: FetchWakeup,
        lifecycle: Lifecycle,
        running: Callable[[], int],
        started: Callable[[], int],
        running_ids: Callable[[], Iterable[int]],
        listening: Callable[[], trio.Event | None],
        events: EventEmitter,
        outage: OutageLog,
        io: IoCounters,
        timing: WorkerTiming,
        poll_interval: float,
        batch_size: int,
        forbidden_flags: Callable[[], list[str] | None],
        session_settings: bool,
        once: bool,
        on_backlog: Callable[[], None],
    ) -> None:
        self._db = db
        self._q = queries
        self._pool_id = pool_id
        self._tasks = tasks
        self._queue = queue
        self._completer = completer
        self._wakeup = wakeup
        self._lifecycle = lifecycle
        self._running = running
        self._started = started
        self._running_ids = running_ids
        self._listening = listening
        self._events = events
        self._outage = outage
        self._io = io
        self._timing = timing
        self._poll_interval = poll_interval
        self._sizer = wakeup.sizer
        self._forbidden_flags = forbidden_flags
        self._session_settings = session_settings
        self._once = once
        self._on_backlog = on_backlog
        # trio times at which to look for jobs of a claim whose reply was lost (sorted)
        self.reconcile_due: list[float] = []
        # the claiming connection opened during the pool's start (preopen), until used
        self._preopened: Any = None
        # set when preopen is done (warmed connection or not); None: no preopen started
        self._preopen_done: trio.Event | None = None

    def claim_size(self) -> int:
        """How many jobs to claim now (0 = wait for capacity)."""
        queue = self._queue
        return self._sizer.size(
            trio.current_time(),
            started=self._started(),
            in_flight=len(queue) + self._running(),
            idle_worker_waits=bool(queue.idle_workers) and not queue.held,
        )

    async def run(self) -> None:
        """Claim until cancelled (the pool's shutdown) or, in ``once`` mode, idle."""
        wakeup = self._wakeup
        conn: Any = None
        errors = 0
        try:
            conn = await self._take_warm_connection()
            while True:
                listening = self._listening()
                if listening is not None and not listening.is_set():
                    # claim only while our liveness lock is held (it lives on the LISTEN
                    # connection), or a dead-pool sweeper could release what we claim
                    await listening.wait()
                    continue
                wakeup.forget()
                if self.reconcile_due and self.reconcile_due[0] <= trio.current_time():
                    await self._reconcile_locks()
                self._expire_held()
                size = self.claim_size()
                if size <= 0:
                    deadline = min(self._queue.ttl_deadline(), self._next_reconcile())
                    await wakeup.wait(deadline, WAITING_FOR_CAPACITY)
                    continue
                if conn is not None and conn.is_closed():
                    conn = None  # the server went away meanwhile: no failed claim needed
                try:
                    if conn is None:
                        conn = await self._connect()
                    rows = await self._claim(conn, size)
                except Exception as exc:
                    errors += 1
                    # the claim may have committed and only its reply been lost
                    self.schedule_reconcile()
                    self._events.emit("worker:getJob:error", error=exc)
                    if is_connection_lost(exc):
                        self._outage.failed("claiming jobs", exc)
                    else:
                        log.warning(
                            "pool %s: claiming jobs failed (%s); retrying", self._pool_id, exc
                        )
                    if conn is not None:
                        # whatever broke, a fresh connection is cheap next to a stuck one
                        await self._db.close_connection(conn)
                        conn = None
                    await trio.sleep(self._timing.retry_delay(errors))
                    continue
                errors = 0
                self._outage.ok("claiming jobs")
                if rows:
                    self._hold(rows)
                    # a candidate scan that hit the limit means more may be ready
                    if rows[0]["n_candidates"] >= size:
                        self._on_backlog()
                        continue
                    if len(rows) == size or self._once:
                        continue
                    # the claim saw every job it could take: wait for news
                elif self._once and self._quiet() and not wakeup.pending():
                    # (a nudge means outcomes were written during the claim: a queue
                    # may have been unlocked after its snapshot, so look again)
                    log.info("pool %s: no job is ready; stopping (once)", self._pool_id)
                    self._lifecycle.request_stop()
                    return
                # nothing ready: wait for a NOTIFY, an unlocked queue, the poll or the TTL
                deadline = min(
                    trio.current_time() + self._poll_interval,
                    self._queue.ttl_deadline(),
                    self._next_reconcile(),
                )
                await wakeup.wait(deadline, WAITING_FOR_JOBS)
        finally:
            if conn is not None:
                await self._db.close_connection(conn)

    def _quiet(self) -> bool:
        return not (len(self._queue) or self._running() or self._completer.unwritten)

    def _hold(self, rows: Sequence[asyncpg.Record]) -> None:
        names = self._tasks.names
        jobs = [Job.from_claim(row, names[row["task_id"]]) for row in rows]
        # once stopping, the shutdown returns them: no worker is woken for them
        self._queue.add(jobs, trio.current_time(), wake=not self._lifecycle.stopping)

    def _expire_held(self) -> None:
        """Hand back jobs that waited longer than the TTL (another pool may be idle)."""
        queue = self._queue
        if not queue.held:
            return
        expired = queue.expire(trio.current_time())
        if expired:
            log.info(
                "pool %s: returning %d job(s) unstarted after %.0f s",
                self._pool_id,
                len(expired),
                queue.ttl,
            )
            # the fetcher must not block on the round trip: the completer writes it
            self._completer.send_returns(expired, "ttl")

    async def preopen(self, schema_ready: trio.Event) -> None:
        """Open the claiming connection and warm up the claim on it as soon as
        ``schema_ready`` is set, while the pool's start goes on (task registration,
        LISTEN); the claim loop takes the connection. A failure is left to the loop,
        which connects (and retries) on its own."""
        self._preopen_done = done = trio.Event()
        try:
            try:
                self._preopened = await self._connect()
            except Exception as exc:
                log.debug("pool %s: opening the claiming connection failed: %s", self._pool_id, exc)
                return
            await schema_ready.wait()
            self._preopened = await self._warm(self._preopened)
        finally:
            done.set()

    async def close_preopened(self) -> None:
        """Close the preopened connection if the claim loop never took it."""
        conn, self._preopened = self._preopened, None
        if conn is not None:
            await self._db.close_connection(conn)

    async def _take_warm_connection(self) -> Any:
        """The claiming connection with the claim warmed up on it, or ``None``.

        The preopened one when the start made it (waiting for its warm-up to end),
        else a new one, warmed up here.
        """
        if self._preopen_done is not None:
            await self._preopen_done.wait()
            conn, self._preopened = self._preopened, None
            if conn is not None and not conn.is_closed():
                return conn
            if conn is not None:
                await self._db.close_connection(conn)
        try:
            conn = await self._connect()
        except Exception:
            return None  # the claim loop connects (and retries) on its own
        return await self._warm(conn)

    async def _warm(self, conn: Any) -> Any:
        """Run the claim once with a limit of 0 on ``conn``; ``conn``, or ``None`` if it
        failed (then ``conn`` is closed).

        It claims nothing, so it may run before the liveness lock is held and before the
        tasks are registered (the statement and its generic plan do not depend on the
        task ids); it leaves the statement prepared and the backend's catalog caches
        warm, which takes the first real claim's planning (tens of ms on a busy server)
        off the start-to-first-job path.
        """
        try:
            await self._claim(conn, 0)
        except Exception as exc:
            log.debug("pool %s: warming up the claim failed: %s", self._pool_id, exc)
            await self._db.close_connection(conn)
            return None
        return conn

    async def _connect(self) -> Any:
        # session settings need a session: not behind a transaction-pooling pgBouncer
        if not self._session_settings:
            return await self._db.connect()
        return await self._db.connect(CLAIM_SESSION_SETTINGS)

    async def _claim(self, conn: Any, size: int) -> list[asyncpg.Record]:
        # Shielded: a claim whose reply is lost to a cancellation would leave jobs locked
        # by us that nobody runs. The shutdown hands back whatever this returns.
        start = trio.current_time()
        with trio.CancelScope(shield=True), trio.fail_after(self._timing.statement_timeout):
            rows: list[asyncpg.Record] = await self._db.run(
                claim_jobs,
                conn,
                self._q,
                self._pool_id,
                list(self._tasks.ids.values()),
                size,
                self._forbidden_flags(),
                None,
            )
        io = self._io
        io.last_claim_at = end = trio.current_time()
        io.claims += 1
        io.claim_seconds += end - start
        io.claimed += len(rows)
        return rows

    # -- lost claims -----------------------------------------------------------------

    def schedule_reconcile(self) -> None:
        """Compare the jobs locked by this pool with the ones it knows: before the next
        claim, and again after each of ``timing.reconcile_again_after`` (the lost claim's
        statement may still be running on the server, and commit after the first look)."""
        now = trio.current_time()
        self.reconcile_due = [now, *(now + delay for delay in self._timing.reconcile_again_after)]

    def _next_reconcile(self) -> float:
        return self.reconcile_due[0] if self.reconcile_due else math.inf

    async def _reconcile_locks(self) -> None:
        """Return jobs locked by this pool that it does not know about.

        A claim that committed although its reply was lost (connection cut, timeout)
        leaves such jobs: locked by a live pool, they would wait for the 4-hour sweep.
        Runs in the fetcher between claims, so no claim is in flight; a job that is
        known (held, running, its outcome pending or being written, being returned)
        is never touched, and one that finished meanwhile is no longer ``locked_by``
        us, so the return statement skips it.
        """
        try:
            rows = await self._db.fetch(self._q.locked_by_pool, self._pool_id)
        except Exception as exc:
            lost = self._outage.down and is_connection_lost(exc)
            log.log(
                logging.DEBUG if lost else logging.WARNING,
                "pool %s: checking its locks failed (will retry): %s",
                self._pool_id,
                exc,
            )
            return
        known = self._queue.ids()
        known.update(self._running_ids())
        known.update(self._completer.unwritten)
        unknown = [int(r["id"]) for r in rows if int(r["id"]) not in known]
        now = trio.current_time()
        self.reconcile_due = [due for due in self.reconcile_due if due > now]
        if not unknown:
            return
        log.warning(
            "pool %s: returning %d job(s) locked by a claim whose reply was lost",
            self._pool_id,
            len(unknown),
        )
        if not await self._completer.return_unknown(unknown):
            self.reconcile_due.insert(0, now)
