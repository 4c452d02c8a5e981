"""What a handler gets besides its job: :class:`JobContext` and its cancel scope."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg
import trio

from .._job import Job
from .._logging import job_extra
from .._pg import Database

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True, slots=True)
class PoolServices:
    """What every job's context shares: the pool's id, database and producer methods."""

    pool_id: str
    db: Database
    add_job: Any
    add_jobs: Any


class _JobLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        # the job's fields on every record, as on the worker's own job records
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra['task']}#{extra['job_id']}] {msg}", kwargs


class JobSlot:
    """A worker's cancel scope and the job running in it (the runner's hot path)."""

    __slots__ = ("cancelled_by", "job", "scope")

    scope: trio.CancelScope  # set by the worker loop before each run of jobs

    def __init__(self) -> None:
        self.job: Job | None = None
        #: who cancelled the running job: "job" (its context), "pool" (the shutdown);
        #: ``None`` with the scope cancelled means its deadline (the task's timeout)
        self.cancelled_by: str | None = None

    def cancel(self, by: str) -> None:
        """Cancel the running job's scope, remembering who did it first."""
        if self.cancelled_by is None:
            self.cancelled_by = by
        self.scope.cancel()


class JobCancelScope:
    """``ctx.cancel_scope``: cancels one job's handler, and nothing after it.

    Workers share a :class:`trio.CancelScope` between consecutive jobs (one per job is
    costly); this handle acts on it only while its own job is running, so a context kept
    past its job cannot cancel a later one.
    """

    __slots__ = ("_job", "_slot")

    def __init__(self, slot: JobSlot, job: Job) -> None:
        self._slot = slot
        self._job = job

    def _current(self) -> bool:
        return self._slot.job is self._job

    def cancel(self) -> None:
        """Cancel the handler: it gets :class:`trio.Cancelled` at its next checkpoint and
        the job fails with "Job was cancelled" (and retries). No effect once it has ended."""
        if self._current():
            self._slot.cancel("job")

    @property
    def cancel_called(self) -> bool:
        """Whether the job was cancelled (by :meth:`cancel`, its timeout or the shutdown)."""
        return self._current() and self._slot.scope.cancel_called

    @property
    def deadline(self) -> float:
        """The trio clock time at which the handler is cancelled (``inf``: none); the
        task's ``timeout`` sets it. Settable while the job runs."""
        return self._slot.scope.deadline if self._current() else math.inf

    @deadline.setter
    def deadline(self, value: float) -> None:
        if self._current():
            self._slot.scope.deadline = value


class JobContext:
    """What a handler gets besides the job.

    Attributes:
      job: the job being run.
      logger: a :class:`logging.LoggerAdapter` that prefixes lines with ``[task#id]``.
      cancel_scope: the job's :class:`JobCancelScope`: ``ctx.cancel_scope.cancel()`` stops
        the handler (the job then fails and retries); ``deadline`` is the trio clock time
        of its timeout (``task(timeout=...)``).
      pool_id: the worker pool's id (what ``locked_by`` says).
      add_job, add_jobs: :meth:`kongtask.Client.add_job` and :meth:`~kongtask.Client.add_jobs`
        on the pool's database.
    """

    __slots__ = ("_logger", "_services", "_slot", "add_job", "add_jobs", "job")

    def __init__(self, services: PoolServices, job: Job, slot: JobSlot) -> None:
        self._services = services
        self.add_job = services.add_job
        self.add_jobs = services.add_jobs
        self.job = job
        self._slot = slot
        self._logger: _JobLogger | None = None

    @property
    def cancel_scope(self) -> JobCancelScope:
        return JobCancelScope(self._slot, self.job)

    @property
    def pool_id(self) -> str:
        return self._services.pool_id

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        # built on first use: most handlers never log, and this is the per-job hot path
        if self._logger is None:
            job = self.job
            self._logger = _JobLogger(
                logging.getLogger(f"kongtask.job.{job.task_identifier}"),
                job_extra(self._services.pool_id, job, "job:log"),
            )
        return self._logger

    async def with_connection(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run the **asyncio** coroutine function ``fn(conn, *args)`` on a pooled connection.

        ``fn`` is written for asyncpg as usual (``await conn.fetch(...)``,
        ``async with conn.transaction(): ...``) and runs on the asyncio side in one
        crossing: the connection is acquired and released, and a transaction rolled
        back on error or cancellation, entirely inside asyncio. That is the safe way
        from trio: asyncpg's objects belong to the asyncio loop, so never keep the
        connection or call its methods from trio code directly (docs/design/stack.md).

        Example::

            async def count_users(conn, active):
                return await conn.fetchval("select count(*) from users where active = $1", active)

            n = await ctx.with_connection(count_users, True)

        To add a job that commits with ``fn``'s writes, call the asyncio producer on
        ``conn`` inside ``fn``: ``await kongtask.aio.add_job(conn, "task", payload)``.
        """
        return await self._services.db.with_connection(fn, *args, **kwargs)
