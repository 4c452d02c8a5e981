"""Shared fixtures. Test rules for this suite:

- Every test talks to a real PostgreSQL (the ``kongtask`` pytest plugin provides it).
- No sleeps to wait for a result: wait on an event or poll with an absolute ``fail_after``.
- Time logic that does not wait on the database uses ``autojump_clock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kongtask._pg import Database, open_database


@pytest.fixture
async def db(kongtask_dsn: str) -> AsyncIterator[Database]:
    """An open :class:`Database` on a fresh migrated database."""
    async with open_database(kongtask_dsn) as database:
        yield database


@pytest.fixture
def gw_dsn(kongtask_database_factory: object) -> str:
    """A fresh database migrated by the real graphile-worker 0.18.0 (npm)."""
    from oracle import oracle_migrate, require_oracle

    require_oracle("0.18.0")
    dsn: str = kongtask_database_factory(migrated=False)  # type: ignore[operator]
    oracle_migrate(dsn, version="0.18.0")
    return dsn


@pytest.fixture
async def gw_db(gw_dsn: str) -> AsyncIterator[Database]:
    """An open :class:`Database` on a database migrated by graphile-worker 0.18.0."""
    async with open_database(gw_dsn) as database:
        yield database
