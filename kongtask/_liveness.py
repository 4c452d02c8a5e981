"""Fast crash recovery: prove a kongtask pool dead and release its jobs at once.

graphile-worker frees a crashed worker's jobs only after four hours
(docs/design/database.md#stale-locks-and-dead-pools),
because it cannot tell a dead pool from one running a long job. kongtask pools can be
told apart, with no schema change:

**Marked pool ids.** A kongtask pool id keeps graphile-worker's format, ``pool-`` (or
``otpool-`` for run-once pools) and 18 lowercase hex digits, but the first 8 of those
digits are the fixed marker ``6b6f6e67`` (``"kong"`` in ASCII) and only the last 10
(40 bits) are random. Node draws all 72 bits at random, so a Node pool id carries the
marker by chance with odds 2**-32 (about 1 in 4.3 billion per Node pool start). Such a
pool would be treated as a kongtask pool that holds no lock: its in-flight jobs could
be released early and run a second time (never lost). Two kongtask pools share an id
with odds about k**2 / 2**41 for k pools with rows at the same time (k = 1000: 5e-7);
then the dead one's rows simply keep the 4-hour rule, because the live one holds the lock.

**The liveness lock.** Each pool holds a session-level advisory lock, in the two-int form
``pg_advisory_lock(1802464871, k2)``, on its LISTEN connection for its whole life. The
first key is the marker as an int4 (``0x6b6f6e67``), the second the last 8 hex digits
of the id as a signed int4. The two-int form lives in its own key space in ``pg_locks``
(``objsubid = 2``; the bigint form has ``objsubid = 1``), so it collides only with an
application that takes two-int advisory locks with the first key 1802464871. Such a lock
can only make a dead pool look alive (its rows then keep the 4-hour rule) or make a new
pool wait for its lock; it never makes a live pool look dead. The lock must live on a
dedicated connection: asyncpg's pool runs ``pg_advisory_unlock_all()`` when a connection
goes back to the pool, and the listener connection is never pooled
(docs/design/stack.md#listen-needs-its-own-connection). When the process dies, the server
ends its sessions and the lock disappears with them.

**Provably dead** = the id has the marker and no session of this database holds or waits
for its liveness lock. Every kongtask sweeper checks every few seconds
(:func:`run_dead_pool_sweeper`, :class:`DeadPoolSweeper`: suspects come from locks that
vanished since the previous check, and from a rare full scan of the tables); a pool seen
dead at two consecutive checks, and still dead in the releasing statement itself, gets
its jobs back (lock columns cleared, ``attempts`` kept, ``run_at := greatest(run_at,
now())``, as the 4-hour sweep does) and its queue rows unlocked. Rows of unmarked pools
(Node's, or kongtask behind pgBouncer) keep the 4-hour rule.

**Why a live pool never looks dead** (the race argument):

1. A pool takes its lock *before* its first claim, so before it holds the lock no row
   carries its id, and the release, which only touches rows whose ``locked_by`` is a
   dead id, has nothing of it to touch. A pool that started but has not locked yet
   may "look dead", harmlessly.
2. The release re-checks ``pg_locks`` inside the updating statement. ``pg_locks`` is read
   live, after the statement's snapshot was taken. If it shows no lock, the pool's lock
   was taken (if ever) after the snapshot, so its claim committed after the snapshot too;
   the rows it claimed do not match ``locked_by = id`` in the snapshot and READ COMMITTED
   does not re-check rows that did not match, so they are not released.
3. A pool that loses its listener connection (network cut, server restart) holds rows
   but no lock until it reconnects. It stops claiming until it holds the lock again, and
   three things keep its in-flight jobs from being released meanwhile: a suspect must be
   seen dead at two checks a few seconds apart; nothing is released during
   ``restart_grace`` seconds after the server (re)started, nor while every live pool's
   lock session is younger than that (a crash restart ends every session without
   restarting the postmaster); and a reconnecting listener that finds its lock still
   held by its own old backend *waits* for it, which counts as alive. A pool cut off for
   longer than that can have its in-flight jobs run twice (at-least-once), never lost:
   its late completion deletes the row by id, and its late failure only touches rows it
   still holds.

**pgBouncer (transaction pooling).** Session state does not survive there, so a pool in
``prepared_statements=False`` mode uses an unmarked id (:func:`new_pool_id` with
``marked=False``), takes no lock, and its rows keep the 4-hour rule. Its sweeper may still
release marked dead pools: that is one self-contained statement.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import trio

from ._liveness_sql import (
    KEEPALIVES,
    LIVE_KEYS,
    LOCK,
    LOCK_CLASS,
    MARKER,
    TRY_LOCK,
    LivenessQueries,
)
from ._pg import Database

log = logging.getLogger("kongtask.liveness")

__all__ = [
    "LOCK_CLASS",
    "MARKER",
    "DeadPoolSweeper",
    "Release",
    "hold_liveness_lock",
    "is_marked_pool_id",
    "liveness_lock_key",
    "new_pool_id",
    "run_dead_pool_sweeper",
]

#: Seconds between two checks for dead pools (each check jittered by ±20 %).
DEFAULT_CHECK_INTERVAL = 2.5
#: Seconds after a server (re)start during which nothing is released: every pool is
#: reconnecting then and none holds its lock yet. Also applies while the oldest session
#: holding a liveness lock is younger than this (after a crash restart, where the
#: postmaster's start time does not change; also for a worker that starts alone).
DEFAULT_RESTART_GRACE = 15.0
#: Seconds between two full scans for dead pools (pools that died unseen by a sweeper).
DEFAULT_FULL_SCAN_INTERVAL = 30.0
#: Seconds a reconnecting pool waits for its own lock (held by its old, not yet reaped
#: backend) before giving up and letting the caller retry the connection.
DEFAULT_LOCK_WAIT = 60.0

_HEX = frozenset("0123456789abcdef")


def new_pool_id(*, once: bool = False, marked: bool = True) -> str:
    """A new pool id in graphile-worker's format (docs/design/database.md#pool-ids).

    Args:
      once: a run-once pool (``otpool-`` prefix), as graphile-worker's ``--once``.
      marked: carry the kongtask marker (fast crash recovery). ``False`` for pools
        that cannot hold a session lock (pgBouncer): then the id is drawn until it does
        *not* carry the marker by chance, so it can never be mistaken for a dead
        kongtask pool.

    Returns:
      ``pool-`` (or ``otpool-``) followed by 18 lowercase hex digits.
    """
    prefix = "otpool-" if once else "pool-"
    if marked:
        return prefix + MARKER + secrets.token_hex(5)
    while True:
        pool_id = prefix + secrets.token_hex(9)
        if not is_marked_pool_id(pool_id):
            return pool_id


def is_marked_pool_id(pool_id: str) -> bool:
    """Whether ``pool_id`` is a kongtask pool id that takes part in fast recovery."""
    for prefix in ("pool-", "otpool-"):
        if pool_id.startswith(prefix):
            digits = pool_id[len(prefix) :]
            return len(digits) == 18 and digits.startswith(MARKER) and set(digits) <= _HEX
    return False


def liveness_lock_key(pool_id: str) -> tuple[int, int]:
    """The two int4 keys of ``pool_id``'s liveness lock, as the SQL computes them.

    Raises:
      ValueError: ``pool_id`` is not a marked kongtask pool id.
    """
    if not is_marked_pool_id(pool_id):
        raise ValueError(f"{pool_id!r} is not a kongtask pool id with the liveness marker")
    low = int(pool_id[-8:], 16)
    return LOCK_CLASS, low - (1 << 32) if low >= 1 << 31 else low


async def hold_liveness_lock(
    conn: asyncpg.Connection,
    pool_id: str,
    *,
    wait: float = DEFAULT_LOCK_WAIT,
) -> None:
    """Take ``pool_id``'s liveness lock on ``conn`` for the rest of the session.

    An asyncio coroutine: call it through :meth:`Database.run` on the pool's dedicated
    LISTEN connection, after connecting and before the pool claims anything (and again
    after every reconnect, before claiming again). Returns once the lock is held; it is
    released when the connection closes, which is the point.

    It also turns on short server-side TCP keepalives for this session (about 25 s to
    notice a client that vanished without closing its socket: a host crash, a network
    partition). Without them the server keeps a half-open session, and its lock, for the
    OS default of two hours: the dead pool would look alive, and a reconnecting one would
    wait for its own ghost.

    If the lock is busy, the usual holder is this very pool's previous connection, whose
    backend the server has not reaped yet (a cut connection). Waiting for it is right:
    while it lives the pool looks alive through it, and the lock passes to this session
    the moment it goes, with no instant in between where nobody holds it.

    Args:
      conn: a dedicated connection (never a pooled one: pool release unlocks all).
      pool_id: a marked pool id (:func:`new_pool_id`).
      wait: seconds to wait for a busy lock.

    Raises:
      ValueError: ``pool_id`` is not marked.
      TimeoutError: the lock stayed busy for ``wait`` seconds; retry on a new connection.
    """
    if not is_marked_pool_id(pool_id):
        raise ValueError(f"{pool_id!r} is not a kongtask pool id with the liveness marker")
    try:
        await conn.execute(KEEPALIVES)
    except asyncpg.PostgresError as exc:  # a platform without these socket options
        log.debug("cannot set TCP keepalives on the liveness connection: %s", exc)
    if await conn.fetchval(TRY_LOCK, pool_id):
        return
    log.warning(
        "liveness lock of pool %s is held by another session (probably this pool's previous "
        "connection, not yet reaped by the server); waiting up to %.0f s",
        pool_id,
        wait,
    )
    # asyncpg cancels the query server-side on timeout, so no lock request stays queued.
    await conn.fetchval(LOCK, pool_id, timeout=wait)


@dataclass(frozen=True, slots=True)
class Release:
    """What one release of dead pools did.

    Attributes:
      pools: the pool ids found dead and released.
      jobs: how many jobs were unlocked.
      queues: how many queue rows were unlocked.
    """

    pools: tuple[str, ...]
    jobs: int
    queues: int


class DeadPoolSweeper:
    """Finds provably dead kongtask pools and releases their rows.

    Two ways to become a suspect, both cheap at steady state:

    - **A lock that vanished.** Every check reads the liveness locks held right now
      (:data:`~kongtask._liveness_sql.LIVE_KEYS`: the lock table only). A key seen at the
      previous check and gone now belongs to a pool that just died (or lost its LISTEN
      connection).
    - **A full scan**, at the first check and then every ``full_scan_interval`` seconds,
      finds pools that died while this sweeper was not watching (before it started, or
      too briefly alive to be seen). It reads both tables, so it is kept rare.

    A suspect is released at the next check if the releasing statement still finds it
    dead: two observations at least one interval apart (see the module docstring for
    why). During the restart grace nothing is released and the suspects are kept.
    """

    def __init__(
        self,
        schema: str,
        *,
        restart_grace: float = DEFAULT_RESTART_GRACE,
        full_scan_interval: float = DEFAULT_FULL_SCAN_INTERVAL,
    ) -> None:
        self.queries: LivenessQueries = LivenessQueries(schema)
        self.restart_grace = restart_grace
        self.full_scan_interval = full_scan_interval
        self._suspect_ids: set[str] = set()
        self._suspect_keys: set[int] = set()
        self._live_keys: set[int] = set()
        self._next_full_scan = -math.inf

    async def check(self, db: Database) -> Release:
        """One check: release the last check's suspects that are still dead; find new ones."""
        ids, keys = sorted(self._suspect_ids), sorted(self._suspect_keys)
        queries = self.queries
        grace = float(self.restart_grace)
        now = trio.current_time()
        full = now >= self._next_full_scan

        async def unit(
            conn: asyncpg.Connection,
        ) -> tuple[asyncpg.Record | None, set[int], list[str]]:
            row = None
            if ids or keys:
                row = await conn.fetchrow(queries.release_dead_pools, ids, grace, keys)
            live = {int(r["key"]) for r in await conn.fetch(LIVE_KEYS)}
            found = [r["id"] for r in await conn.fetch(queries.dead_pools)] if full else []
            return row, live, found

        row, live, found = await db.with_own_connection(unit)
        if full:
            self._next_full_scan = now + self.full_scan_interval
        in_grace = row is not None and bool(row["in_grace"])
        vanished = self._live_keys - live
        self._live_keys = live
        if not in_grace:  # consumed; otherwise kept until the grace is over
            self._suspect_ids, self._suspect_keys = set(), set()
        self._suspect_ids.update(found)
        self._suspect_keys.update(vanished)
        if row is None or not row["pools"]:
            return Release((), 0, 0)
        return Release(tuple(row["pools"]), int(row["jobs"]), int(row["queues"]))


async def run_dead_pool_sweeper(
    db: Database,
    schema: str,
    *,
    interval: float = DEFAULT_CHECK_INTERVAL,
    restart_grace: float = DEFAULT_RESTART_GRACE,
    full_scan_interval: float = DEFAULT_FULL_SCAN_INTERVAL,
    on_release: Callable[[Release], None] | None = None,
    on_check: Callable[[BaseException | None], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check for provably dead pools at once, then every ``interval`` s (±20 %), forever.

    A sibling task of the worker's nursery, next to the 4-hour sweep. Database errors
    are logged and the next check comes as usual: the sweeper must never take the pool
    down, and a missed check only delays recovery.

    Args:
      db: the worker's database.
      schema: the worker's schema.
      interval: mean seconds between checks; a dead pool is released 1-2 intervals
        after it died (two observations), once the server has been up ``restart_grace`` s.
      restart_grace: see :data:`DEFAULT_RESTART_GRACE`.
      full_scan_interval: see :class:`DeadPoolSweeper`.
      on_release: called with each non-empty :class:`Release` (events, logs, tests).
      on_check: called after each check with the database error it met, or ``None``
        (the worker's outage log); without it such errors are logged as warnings.
      task_status: started at once.
    """
    sweeper = DeadPoolSweeper(
        schema, restart_grace=restart_grace, full_scan_interval=full_scan_interval
    )
    task_status.started()
    while True:
        try:
            release = await sweeper.check(db)
        except (
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            # a pooled connection whose protocol state broke in a server restart
            asyncpg.InternalClientError,
            TimeoutError,
        ) as exc:
            if on_check is None:
                log.warning("check for dead pools failed (will retry): %s", exc)
            else:
                on_check(exc)
            release = Release((), 0, 0)
        except Exception:  # a bug here must cost recovery time, never the pool
            log.exception("check for dead pools failed (will retry)")
            release = Release((), 0, 0)
        else:
            if on_check is not None:
                on_check(None)
        if release.pools:
            log.warning(
                "released %d job(s) and %d queue(s) of dead pool(s) %s",
                release.jobs,
                release.queues,
                ", ".join(release.pools),
            )
            if on_release is not None:
                try:
                    on_release(release)
                except Exception:  # an observer's bug must not stop recovery
                    log.exception("on_release callback raised")
        # Jitter spreads the checks of many pools so they do not scan in lockstep.
        await trio.sleep(interval * (0.8 + 0.4 * secrets.randbelow(1001) / 1000))
