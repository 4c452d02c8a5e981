"""Helpers shared by the worker tests (not a test module).

The fixtures (``worker_dsn``, ``tdb``, the ``gw_*`` ones) live in conftest.py.
"""

from __future__ import annotations

from kongtask._pg import Database
from kongtask._sql import WorkerQueries

#: A job's fields, in the order of :class:`kongtask.Job`'s constructor (written out, not
#: read from the class, so that a test notices a change).
JOB_FIELDS: tuple[str, ...] = (
    "id",
    "task_identifier",
    "payload",
    "queue_name",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "key",
    "flags",
    "last_error",
    "created_at",
    "updated_at",
    "locked_at",
    "locked_by",
    "revision",
)


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
