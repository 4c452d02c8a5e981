"""Helpers shared by the worker tests (not a test module).

``worker_dsn``: a fresh database with the graphile-worker 0.18 schema, migrated by kongtask
(the tests that need graphile-worker's own migration use the ``gw_*`` fixtures).
"""

from __future__ import annotations

import pytest

from kongtask._pg import Database
from kongtask._sql import WorkerQueries


@pytest.fixture
def worker_dsn(kongtask_dsn: str) -> str:
    """A fresh database migrated by kongtask (the graphile-worker 0.18 schema)."""
    return kongtask_dsn


async def add_job_row(db: Database, task: str, payload: str = "{}", **kw: object) -> int:
    """Add a job through ``graphile_worker.add_job``; ``kw``: queue, run_at, max_attempts,
    key, priority, flags. Returns its id."""
    row = await db.fetchrow(
        WorkerQueries("graphile_worker").add_job,
        task,
        payload,
        kw.get("queue"),
        kw.get("run_at"),
        kw.get("max_attempts"),
        kw.get("key"),
        kw.get("priority"),
        kw.get("flags"),
        None,
    )
    assert row is not None
    return int(row["id"])
