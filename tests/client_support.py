"""Fixtures and helpers shared by the client and differential tests.

- ``gw_template``: one database migrated by graphile-worker 0.18.0 per session; each test
  gets a clone (``gw_clone_dsn``), which is much faster than running npm's CLI per test.
- ``kongtask_migrated_dsn``: a fresh database migrated by kongtask's own migrations.
- ``capture_notifications``: LISTEN on a dedicated connection; ``flush()`` waits until
  everything sent before it has arrived (a sentinel NOTIFY, so no sleeps).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import trio

from kongtask._pg import Database
from kongtask.testing._postgres import PostgresServer, run_sync_sql

SENTINEL = "kongtask-test-sentinel"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture(scope="session")
def gw_template(kongtask_server: PostgresServer) -> Iterator[str]:
    """A database graphile-worker 0.18.0 migrated, used only as a template."""
    from oracle import oracle_migrate, require_oracle

    require_oracle("0.18.0")
    name = f"gw_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    run_sync_sql(kongtask_server.dsn, f"create database {_quote(name)}")
    try:
        oracle_migrate(kongtask_server.dsn_for(name), version="0.18.0")
        yield name
    finally:
        run_sync_sql(kongtask_server.dsn, f"drop database if exists {_quote(name)} with (force)")


@pytest.fixture
def gw_clone_dsn(kongtask_server: PostgresServer, gw_template: str) -> Iterator[str]:
    """A fresh copy of the graphile-worker-migrated template."""
    name = f"gw_t_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    run_sync_sql(
        kongtask_server.dsn, f"create database {_quote(name)} template {_quote(gw_template)}"
    )
    yield kongtask_server.dsn_for(name)
    run_sync_sql(kongtask_server.dsn, f"drop database if exists {_quote(name)} with (force)")


@pytest.fixture
def kongtask_migrated_dsn(kongtask_dsn: str) -> str:
    """A fresh database migrated by kongtask's own migrations."""
    return kongtask_dsn


@pytest.fixture(params=["graphile-worker", "kongtask"])
def any_dsn(request: pytest.FixtureRequest) -> str:
    """Run the test on a graphile-worker-migrated and on a kongtask-migrated database."""
    name = "gw_clone_dsn" if request.param == "graphile-worker" else "kongtask_migrated_dsn"
    dsn: str = request.getfixturevalue(name)
    return dsn


@dataclass
class Notifications:
    """``jobs:insert`` payloads received so far (sentinels removed)."""

    db: Database
    conn: asyncpg.Connection
    channel: str
    payloads: list[str] = field(default_factory=list)
    _sentinel_seen: trio.Event = field(default_factory=trio.Event)

    def on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload == SENTINEL:
            self._sentinel_seen.set()
        else:
            self.payloads.append(payload)

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
