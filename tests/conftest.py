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
