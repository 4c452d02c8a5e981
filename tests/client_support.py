"""Fixtures and helpers shared by the client and differential tests.

- ``capture_notifications``: LISTEN on a dedicated connection; ``flush()`` waits until
  everything sent before it has arrived (a sentinel NOTIFY, so no sleeps).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import trio

from kongtask._pg import Database

SENTINEL = "kongtask-test-sentinel"


@dataclass
class Notifications:
    """``jobs:insert`` payloads received so far (sentinels removed)."""

    db: Database
    conn: asyncpg.Connection
    channel: str
    payloads: list[str] = field(default_factory=list)
    _sentinel_seen: trio.Event = field(default_factory=trio.Event)

    def on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if payload == SENTINEL:
            self._sentinel_seen.set()
        else:
            self.payloads.append(str(payload))

    async def flush(self, db: Database | None = None) -> list[str]:
        """Wait for everything notified before this call; return all payloads so far."""
        self._sentinel_seen = trio.Event()
        await (db or self.db).execute("select pg_notify($1, $2)", self.channel, SENTINEL)
        with trio.fail_after(10):
            await self._sentinel_seen.wait()
        return list(self.payloads)


@asynccontextmanager
async def capture_notifications(
    db: Database, channel: str = "jobs:insert"
) -> AsyncIterator[Notifications]:
    conn = await db.connect()
    notes = Notifications(db, conn, channel)
    try:
        await db.run(conn.add_listener, channel, notes.on_notify)
        yield notes
    finally:
        await db.close_connection(conn)


def counts(payloads: list[str]) -> list[Any]:
    """The ``count`` of each ``jobs:insert`` payload (``None`` for an empty payload)."""
    import json

    return [json.loads(p)["count"] if p else None for p in payloads]


async def wait_until_blocked_on_lock(db: Database) -> None:
    """Wait until some backend of ``db``'s database waits for a lock (no fixed sleep)."""
    # Nothing signals "now blocked" to another connection, so poll the catalog.
    with trio.fail_after(10):
        while not await db.fetchval(  # noqa: ASYNC110
            "select exists(select 1 from pg_stat_activity "
            "where datname = current_database() and wait_event_type = 'Lock')"
        ):
            await trio.sleep(0.01)
