"""One trio + trio-asyncio loop in a background thread, for synchronous test code.

Hypothesis calls its rules synchronously and runs many examples; opening a loop and a
connection per example is slow (docs/design/stack.md#hypothesis-and-async-fixtures). A
:class:`Portal` opens the loop
and its connections once, and :meth:`Portal.run` calls an asyncio coroutine function
on it from the calling thread: one thread hop and one asyncio crossing per call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import trio

from .._pg import Database, open_database

T = TypeVar("T")

NOTIFY_CHANNEL = "jobs:insert"


@dataclass
class Connections:
    """The dedicated connections a harness uses; they live as long as the portal.

    Attributes:
      actor: runs every statement of the machine, and LISTENs on ``jobs:insert`` (its
        own notifications arrive before the statement's result does).
      blocker: holds row locks in an open transaction, to prove SKIP LOCKED.
      notifications: payloads the actor's own statements sent on ``jobs:insert``, in
        arrival order.
    """

    actor: asyncpg.Connection
    blocker: asyncpg.Connection
    notifications: list[str] = field(default_factory=list)


class Portal:
    """A background thread running trio, trio-asyncio and two connections to ``dsn``."""

    def __init__(self, dsn: str, *, lock_timeout_ms: int = 100) -> None:
        self.dsn = dsn
        self._lock_timeout_ms = lock_timeout_ms
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._db: Database | None = None
        self._conns: Connections | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name="kongtask-lifecycle", daemon=True
        )

    def start(self) -> Portal:
        """Start the thread and wait until the connections are open (or raise why not)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start() or ignored after close()
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()

    async def _main(self) -> None:
        async with open_database(self.dsn, min_size=0, max_size=1) as db:
            actor = await db.connect()
            try:
                blocker = await db.connect()
                try:
                    conns = Connections(actor, blocker)
                    await db.run(_prepare, conns, self._lock_timeout_ms)
                    self._db = db
                    self._conns = conns
                    self._stop = trio.Event()
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    await self._stop.wait()
                finally:
                    await db.close_connection(blocker)
            finally:
                await db.close_connection(actor)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Call the asyncio coroutine function ``fn(connections, *args)`` on the loop."""
        if self._db is None or self._conns is None or self._token is None:
            raise RuntimeError("the portal is not running")
        result: T = trio.from_thread.run(
            self._db.run, fn, self._conns, *args, trio_token=self._token
        )
        return result

    def close(self) -> None:
        """Close the connections and stop the thread (idempotent)."""
        if self._token is not None and self._stop is not None:
            stop = self._stop
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._token = None
        self._thread.join(timeout=30)

    def __enter__(self) -> Portal:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _prepare(conns: Connections, lock_timeout_ms: int) -> None:
    # Nothing the machine does may wait for a lock: the only lock holder besides the
    # actor is the blocker, and a statement that waits for it is the bug being hunted.
    await conns.actor.execute(
        f"set lock_timeout = {int(lock_timeout_ms)}; set statement_timeout = 20000"
    )
    await conns.blocker.execute("set statement_timeout = 20000")

    own_pid = conns.actor.get_server_pid()

    def on_notify(conn: object, pid: int, channel: str, payload: object) -> None:
        # The channel is shared by every schema and session of the database: keep only
        # what the actor's own statements sent.
        if pid == own_pid:
            conns.notifications.append(str(payload))

    await conns.actor.add_listener(NOTIFY_CHANNEL, on_notify)
