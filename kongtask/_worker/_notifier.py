"""The notifier: the LISTEN connection, which also carries the pool's liveness lock.

``jobs:insert`` notifications nudge the fetcher; a breaking ``worker:migrate`` one asks
the pool to stop (exit code 57). A pool with a liveness lock (not behind a
transaction-pooling pgBouncer) holds it on this connection, so the fetcher claims only
while :attr:`Notifier.listening` is set.

The notification callbacks are the one place where asyncio calls into the pool: asyncpg
runs them on the trio thread from inside the asyncio loop, so they must never raise and
never await; they only set state and nudge (docs/design/stack.md).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from .._events import EventEmitter
from .._health import IoCounters
from .._liveness import hold_liveness_lock
from .._migrate import runtime_breaking_message
from .._outage import OutageLog, is_connection_lost
from .._pg import Database
from ._fetcher import FetchWakeup
from ._lifecycle import Lifecycle
from ._timing import WorkerTiming, listen_reconnect_delay, parse_insert_count

log = logging.getLogger("kongtask.worker")

#: Exit code of a pool stopped by a breaking migration (graphile-worker's convention).
BREAKING_MIGRATION_EXIT: int = 57


class Notifier:
    """Owns the LISTEN connection and the ``listening`` state.

    Attributes:
      listening: set while the LISTEN connection (and the liveness lock on it) is up;
        replaced by a new, unset event when the connection is lost.
    """

    def __init__(
        self,
        db: Database,
        pool_id: str,
        *,
        liveness_lock: bool,
        wakeup: FetchWakeup,
        lifecycle: Lifecycle,
        events: EventEmitter,
        outage: OutageLog,
        io: IoCounters,
        timing: WorkerTiming,
    ) -> None:
        self._db = db
        self._pool_id = pool_id
        self._liveness_lock = liveness_lock
        self._wakeup = wakeup
        self._lifecycle = lifecycle
        self._events = events
        self._outage = outage
        self._io = io
        self._timing = timing
        self.listening = trio.Event()
        #: the highest migration the pool's schema had at the start (0: not read)
        self.schema_revision = 0
        # the LISTEN connection opened during the pool's start (preopen), until used
        self._preopened: Any = None

    def _on_jobs_insert(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            # The fetcher claims up to its free capacity, so the count only says whether
            # to wake it: a claim never takes more than are ready, and limiting it to
            # the count would cost a second round trip whenever more were waiting.
            if parse_insert_count(payload) > 0:
                self._wakeup.nudge()
        except Exception:
            log.exception("jobs:insert handler failed")

    def _on_migrate(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload) if payload else {}
            if isinstance(data, dict) and data.get("breaking") is True:
                number = int(data.get("migrationNumber", 0))
                # The channel is the database's, not the schema's: a migration this
                # pool's schema already had at the start was another schema's.
                if number <= self.schema_revision:
                    log.info(
                        "pool %s: ignoring a breaking migration notice for revision %d: "
                        "this pool's schema was already at revision %d (another schema "
                        "in this database was migrated)",
                        self._pool_id,
                        number,
                        self.schema_revision,
                    )
                    return
                log.warning(runtime_breaking_message(number))
                self._lifecycle.request_stop(exit_code=BREAKING_MIGRATION_EXIT)
        except Exception:
            log.exception("worker:migrate handler failed")

    async def preopen(self, schema_ready: trio.Event) -> None:
        """Open the LISTEN connection (take the liveness lock on it, LISTEN for
        ``jobs:insert``) now: the pool's start overlaps it with the schema check. LISTEN
        for ``worker:migrate`` waits for ``schema_ready`` (set once the start's own
        migrations are done and :attr:`schema_revision` is known), so that they never
        reach this pool's listener. A failure is left to :meth:`run`, which retries."""
        try:
            self._preopened = await self._connect()
            await schema_ready.wait()
            await self._db.run(self._preopened.add_listener, "worker:migrate", self._on_migrate)
        except Exception as exc:
            log.debug("pool %s: opening the LISTEN connection failed: %s", self._pool_id, exc)

    async def close_preopened(self) -> None:
        """Close the preopened connection if :meth:`run` never took it."""
        conn, self._preopened = self._preopened, None
        if conn is not None:
            await self._db.close_connection(conn)

    async def _connect(self) -> Any:
        """A connection listening for ``jobs:insert``, holding this pool's liveness lock
        if it has one."""
        conn: Any = await self._db.connect()
        try:
            if self._liveness_lock:
                await self._db.run(hold_liveness_lock, conn, self._pool_id)
            # A nudge before the fetcher runs is harmless: its first claim looks anyway.
            await self._db.run(conn.add_listener, "jobs:insert", self._on_jobs_insert)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._db.close_connection(conn)
            raise
        return conn

    async def _take_connection(self) -> Any:
        conn, self._preopened = self._preopened, None
        if conn is not None and conn.is_closed():
            await self._db.close_connection(conn)
            conn = None
        return conn if conn is not None else await self._connect()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the LISTEN connection up; started once the first attempt is done."""
        attempt = 0
        started = False
        while True:
            conn: Any = None
            try:
                conn = await self._take_connection()
                lost = trio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                # (_connect listens for jobs:insert already; a preopened connection for
                # worker:migrate too, and asyncpg then adds no second LISTEN)
                await self._db.run(conn.add_listener, "worker:migrate", self._on_migrate)
                attempt = 0
                self.listening.set()
                self._outage.ok("LISTEN connection")
                self._events.emit("pool:listen:success")
                self._wakeup.nudge()  # notifications may have been missed meanwhile
                if not started:
                    started = True
                    task_status.started()
                while not lost.is_set():
                    with trio.move_on_after(self._timing.listen_keepalive):
                        await lost.wait()
                    if not lost.is_set():
                        with trio.fail_after(10):
                            await self._db.run(conn.execute, "select 1")
                raise ConnectionError("the LISTEN connection was closed")
            except Exception as exc:
                self._io.listen_errors += 1
                if self.listening.is_set():
                    self.listening = trio.Event()  # the liveness lock went with it
                self._events.emit("pool:listen:error", error=exc)
                if is_connection_lost(exc):
                    self._outage.failed("LISTEN connection", exc)
                else:
                    log.warning("pool %s: LISTEN connection failed: %s", self._pool_id, exc)
                if not started:
                    started = True
                    task_status.started()
            finally:
                if conn is not None:
                    await self._db.close_connection(conn)
            delay = listen_reconnect_delay(attempt)
            if self._liveness_lock:
                # While the LISTEN connection is down this pool holds rows but not its
                # liveness lock: come back quickly, so that dead-pool sweepers (two checks
                # a few seconds apart, kongtask._liveness) rarely catch it in between.
                delay = min(delay, self._timing.liveness_reconnect_cap)
            await trio.sleep(delay)
            attempt += 1
