"""Adding jobs from asyncio code, on the caller's connection and in its transaction.

``await kongtask.aio.add_job(conn, "task", payload, **options)`` and
``await kongtask.aio.add_jobs(conn, specs)`` take an asyncpg ``Connection`` or ``Pool``, a
psycopg 3 ``AsyncConnection``/``AsyncCursor`` or a SQLAlchemy 2
``AsyncConnection``/``AsyncSession``. They need neither trio nor trio-asyncio; see
``docs/producers.md``. The sync twins are :func:`kongtask.add_job_sync` and
:func:`kongtask.add_jobs_sync`.
"""

from __future__ import annotations

from ._producers import add_job as add_job, add_jobs as add_jobs

__all__ = ["add_job", "add_jobs"]
