"""The completer: the one path by which the pool writes what happened to its jobs.

Every write about a claimed job goes through here: outcomes (success, failure) and every
kind of hand-back of jobs that will not run here (the local-queue TTL, a recheck that
found a row changed, the shutdown, a named queue whose job vanished, the jobs of a claim
whose reply was lost). Workers and the fetcher never wait for the database: they send
their writes over a memory channel, and the completer writes every outcome gathered since
its last round trip in one statement, retrying transient errors without dropping a job
(graphile-worker issue #636). Closing the channel's send side tells it the pool is
stopping; it writes what it has, then ends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import asyncpg
import trio

from .._events import EventEmitter
from .._health import IoCounters
from .._held import claim_snapshot
from .._job import Job
from .._outage import OutageLog, is_connection_lost
from .._pg import Database
from .._sql import Outcome, WorkerQueries, complete_and_fail, return_jobs, return_unknown
from ._lifecycle import Lifecycle
from ._timing import WorkerTiming

log = logging.getLogger("kongtask.worker")

# SQLSTATEs worth retrying (#636): serialization failure, deadlock, admin shutdown,
# crash shutdown, cannot connect now; class 08 is connection exceptions.
_TRANSIENT_SQLSTATES: Final = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is worth retrying as is (#636)."""
    state = _sqlstate(exc)
    if state is not None and (state in _TRANSIENT_SQLSTATES or state.startswith("08")):
        return True
    return isinstance(
        exc, OSError | ConnectionError | TimeoutError | asyncpg.InterfaceError | trio.TooSlowError
    )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A finished job: ``error`` is ``None`` on success."""

    job: Job
    error: str | None = None
    payload: str | None = None  # a batch job's failed elements (JSON), replacing its payload


@dataclass(frozen=True, slots=True)
class _Returns:
    """Claimed jobs to hand back unstarted, and why ("ttl", "changed", "vanished")."""

    jobs: list[Job]
    reason: str


_Write: TypeAlias = _Outcome | _Returns


class Completer:
    """Owns the writes channel, the batch being written and the write counters.

    Attributes:
      unwritten: ids of jobs whose outcome or hand-back is not written yet (in the
        channel, in the batch, or in flight): what the lost-claim check must not touch.
      completed, failed, returned: jobs written as such since the pool started.
      done: set when the completer has ended (everything written, or given up).
    """

    def __init__(
        self,
        db: Database,
        queries: WorkerQueries,
        pool_id: str,
        *,
        lifecycle: Lifecycle,
        events: EventEmitter,
        outage: OutageLog,
        io: IoCounters,
        timing: WorkerTiming,
        wake_fetcher: Callable[[], None],
        once: bool,
    ) -> None:
        self._db = db
        self._q = queries
        self._pool_id = pool_id
        self._lifecycle = lifecycle
        self._events = events
        self._outage = outage
        self._io = io
        self._timing = timing
        self._wake_fetcher = wake_fetcher
        self._once = once
        # Its buffer is not bounded: every message is about a job already claimed (so
        # their number is bounded by the claims), and a worker must never block on the
        # database.
        self._send, self._recv = trio.open_memory_channel[_Write](math.inf)
        self.unwritten: set[int] = set()
        # the batch: successes; (job, message, payload) failures; hand-backs
        self._ok: list[Job] = []
        self._fail: list[tuple[Job, str, str | None]] = []
        self._returns: list[tuple[list[Job], str]] = []
        self.completed = 0
        self.failed = 0
        self.returned = 0
        self.done = trio.Event()

    # -- what the other parts call (never blocking) -------------------------------

    def send_outcome(self, job: Job, error: str | None = None, payload: str | None = None) -> None:
        """Queue a finished job's outcome (``error`` ``None``: success)."""
        self.unwritten.add(job.id)
        self._send.send_nowait(_Outcome(job, error, payload))

    def send_returns(self, jobs: list[Job], reason: str) -> None:
        """Queue claimed, unstarted jobs to be handed back."""
        self.unwritten.update(job.id for job in jobs)
        self._send.send_nowait(_Returns(jobs, reason))

    def close(self) -> None:
        """Nobody sends any more: the completer writes what it has, then ends."""
        self._send.close()

    # -- hand-backs ----------------------------------------------------------------

    async def hand_back(self, jobs: list[Job], reason: str) -> None:
        """Return claimed, unstarted jobs now (one statement), shielded: a hand-back
        cancelled after it committed must not be forgotten."""
        if not jobs:
            return
        snapshot = claim_snapshot(jobs)
        ids = snapshot[0]
        with trio.CancelScope(shield=True), trio.move_on_after(self._timing.statement_timeout):
            try:
                returned = await self._db.with_own_connection(
                    return_jobs, self._q, self._pool_id, snapshot
                )
            except Exception as exc:
                log.error("pool %s: returning %d job(s) failed: %s", self._pool_id, len(ids), exc)
                return
            finally:
                # returned, or left for the lost-claim check and the final release
                self.unwritten.difference_update(ids)
            self._count_returned(returned, reason)
            if any(job.queue_name is not None for job in jobs):
                self._wake_fetcher()

    async def return_unknown(self, ids: list[int]) -> bool:
        """Return jobs locked by this pool that it does not know (a claim whose reply was
        lost); ``False`` when the statement failed (the caller retries)."""
        with trio.CancelScope(shield=True), trio.move_on_after(self._timing.statement_timeout):
            try:
                returned = await self._db.with_own_connection(
                    return_unknown, self._q, self._pool_id, ids
                )
            except Exception as exc:
                log.warning("pool %s: returning them failed (will retry): %s", self._pool_id, exc)
                return False
            self._count_returned(returned, "lost claim")
        return True

    def _count_returned(self, returned: list[int], reason: str) -> None:
        self.returned += len(returned)
        if returned or reason == "lost claim":
            self._events.emit("job:returned", job_ids=tuple(returned), reason=reason)

    # -- the loop ----------------------------------------------------------------------

    def _take(self, write: _Write) -> None:
        """Add a received write to the batch."""
        if isinstance(write, _Returns):
            self._returns.append((write.jobs, write.reason))
        elif write.error is None:
            self._ok.append(write.job)
        else:
            self._fail.append((write.job, write.error, write.payload))

    def _take_writes(self) -> None:
        """Move every write waiting in the channel into the batch (one statement for all)."""
        while True:
            try:
                self._take(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def run(self) -> None:
        """Write until the channel is closed and everything in it is written."""
        conn: Any = None
        errors = 0
        try:
            while True:
                if not (self._ok or self._fail or self._returns):
                    try:
                        self._take(await self._recv.receive())
                    except trio.EndOfChannel:
                        return  # the pool is stopping and everything is written
                self._take_writes()
                if self._returns:
                    batches, self._returns = self._returns, []
                    for jobs, reason in batches:
                        await self.hand_back(jobs, reason)
                if not self._ok and not self._fail:
                    continue
                if conn is not None and conn.is_closed():
                    conn = None  # the server went away meanwhile
                try:
                    if conn is None:
                        conn = await self._db.connect()
                    await self._flush_once(conn)
                    errors = 0
                    self._outage.ok("writing outcomes")
                except Exception as exc:
                    errors += 1
                    if conn is not None:
                        await self._db.close_connection(conn)
                        conn = None
                    self._on_error(exc, errors)
                    await trio.sleep(self._timing.retry_delay(errors))
        finally:
            if conn is not None:
                await self._db.close_connection(conn)
            self.done.set()

    def _on_error(self, exc: Exception, errors: int) -> None:
        self._events.emit("worker:completeJob:error", error=exc)
        transient = is_transient(exc)
        if is_connection_lost(exc):
            self._outage.failed("writing outcomes", exc)
        else:
            log.warning(
                "pool %s: writing %d outcome(s) failed (%s%s); retrying",
                self._pool_id,
                len(self._ok) + len(self._fail),
                exc,
                "" if transient else ", not a known transient error",
            )
        if not transient and errors == self._timing.give_up_after and not self._lifecycle.stopping:
            # retries are exhausted: stop taking new work (the outcomes are kept and
            # retried until the shutdown's flush deadline)
            log.error(
                "pool %s: outcomes still cannot be written after %d attempts; shutting down",
                self._pool_id,
                errors,
            )
            self._lifecycle.request_stop(exit_code=1)

    async def _flush_once(self, conn: Any = None) -> None:
        """Write the outcomes gathered so far in one statement; on error keep them all."""
        ok, fail = self._ok, self._fail
        if not ok and not fail:
            return
        self._ok, self._fail = [], []
        start = trio.current_time()
        try:
            # shielded: a statement cancelled after it committed must not be forgotten
            # (it would be retried harmlessly, but the shutdown needs the answer)
            with trio.CancelScope(shield=True), trio.fail_after(self._timing.statement_timeout):
                args = (
                    self._q,
                    self._pool_id,
                    [j.id for j in ok],
                    [j.id for j, _, _ in fail],
                    [m for _, m, _ in fail],
                    [p for _, _, p in fail],
                )
                if conn is None:
                    written = await self._db.with_own_connection(complete_and_fail, *args)
                else:
                    written = await self._db.run(complete_and_fail, conn, *args)
        except BaseException:
            # keep every outcome (the statement is all-or-nothing and idempotent)
            self._ok = ok + self._ok
            self._fail = fail + self._fail
            raise
        self._io.flushes += 1
        self._io.flush_seconds += trio.current_time() - start
        self.unwritten.difference_update(j.id for j in ok)
        self.unwritten.difference_update(j.id for j, _, _ in fail)
        self._release_vanished_queues(ok, fail, written)
        self.completed += len(ok)
        self.failed += len(fail)
        if (
            self._once
            or any(j.queue_name is not None for j in ok)
            or any(j.queue_name is not None for j, _, _ in fail)
        ):
            # a named queue was unlocked: its next job is ready (and `once` re-checks)
            self._wake_fetcher()

    def _release_vanished_queues(
        self, ok: list[Job], fail: list[tuple[Job, str, str | None]], written: list[Outcome]
    ) -> None:
        """Named-queue jobs whose row was gone (deleted by an operator while they ran)
        still hold their queue row: the hand-back statement unlocks it."""
        if len(written) == len(ok) + len(fail):
            return
        done = {outcome[1] for outcome in written}
        vanished = [j for j in ok if j.queue_name is not None and j.id not in done]
        vanished += [j for j, _, _ in fail if j.queue_name is not None and j.id not in done]
        if vanished:
            self._returns.append((vanished, "vanished"))

    # -- the end -----------------------------------------------------------------------

    async def final_release(self) -> None:
        """Write what is left, then unlock every row still locked by this pool.

        Rows whose outcome could not be written stay locked: their handlers ran, and
        handing them back would run them again at once while the database still refuses
        the outcome. They are released by ``kongtask unlock``, by a live kongtask pool's
        dead-pool sweep (seconds after this pool's liveness lock is gone), or after 4 hours.
        """
        self._take_writes()  # hand-backs left in the batch: the release below unlocks them
        if self._ok or self._fail:
            try:
                await self._flush_once()
            except Exception as exc:
                log.error(
                    "pool %s: could not write the outcome of %d job(s) (%s); they "
                    "stay locked until `kongtask unlock %s`, another kongtask "
                    "pool's dead-pool sweep or the 4-hour sweep",
                    self._pool_id,
                    len(self._ok) + len(self._fail),
                    exc,
                    self._pool_id,
                )
                return
        row = await self._db.fetchrow(self._q.release_pool, self._pool_id)
        if row is not None and (row["jobs"] or row["queues"]):
            log.warning(
                "pool %s: released %d job(s) and %d queue(s) still locked at shutdown",
                self._pool_id,
                row["jobs"],
                row["queues"],
            )
