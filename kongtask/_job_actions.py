"""The repairs an operator applies to jobs, shared by ``kongtask jobs`` and the dashboard.

Both select jobs the same way (ids, or every job a listing filter matches, page by page
in id order) and apply an action through the :class:`~kongtask.Client` admin methods,
which leave running (locked) jobs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal

from ._errors import ConfigError
from ._inspect import MAX_PAGE_SIZE, JobInfo

if TYPE_CHECKING:
    from ._client import Client
    from ._inspect_sql import JobState
    from ._job import Job

JobAction = Literal["retry", "reschedule", "fail", "complete", "remove"]
JOB_ACTIONS: Final[tuple[JobAction, ...]] = ("retry", "reschedule", "fail", "complete", "remove")


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a bulk action selects (``None``: any); the listing's filters."""

    tasks: str | Sequence[str] | None = None
    queues: str | Sequence[str] | None = None
    states: str | Sequence[JobState] | None = None
    key: str | None = None
    min_id: int | None = None
    max_id: int | None = None

    def is_empty(self) -> bool:
        return all(
            value is None
            for value in (
                self.tasks,
                self.queues,
                self.states,
                self.key,
                self.min_id,
                self.max_id,
            )
        )


async def select_jobs(
    client: Client,
    *,
    ids: Sequence[int] = (),
    where: JobFilter | None = None,
    limit: int | None = None,
) -> list[JobInfo]:
    """The jobs with these ``ids`` that exist, or every job ``where`` matches (in id order,
    at most ``limit``), read page by page."""
    selected: list[JobInfo] = []
    if ids:
        wanted = sorted(set(ids))
        for low in range(0, len(wanted), MAX_PAGE_SIZE):
            chunk = wanted[low : low + MAX_PAGE_SIZE]
            selected += await client.list_jobs(ids=chunk, limit=MAX_PAGE_SIZE)
        return selected[:limit] if limit is not None else selected
    where = where or JobFilter()
    after: int | None = None
    while limit is None or len(selected) < limit:
        page_size = MAX_PAGE_SIZE if limit is None else min(MAX_PAGE_SIZE, limit - len(selected))
        page = await client.list_jobs(
            tasks=where.tasks,
            queues=where.queues,
            states=where.states,
            key=where.key,
            min_id=where.min_id,
            max_id=where.max_id,
            after_id=after,
            limit=page_size,
        )
        selected += page
        if len(page) < page_size:
            break
        after = page[-1].job.id
    return selected


async def apply_job_action(
    client: Client,
    action: JobAction,
    infos: Sequence[JobInfo],
    *,
    run_at: datetime | None = None,
    priority: int | None = None,
    attempts: int | None = None,
    max_attempts: int | None = None,
    message: str | None = None,
) -> list[Job]:
    """Apply ``action`` to the selected jobs; return the jobs it changed.

    - ``retry``: due now, with the attempt count reset (revives permanently failed jobs).
    - ``reschedule``: the given ``run_at``, ``priority``, ``attempts``, ``max_attempts``.
    - ``fail``: permanently failed, ``message`` stored as the last error.
    - ``complete``: deleted as if they had succeeded.
    - ``remove``: ``remove_job`` by key; jobs without a key are skipped.
    """
    ids = [info.job.id for info in infos]
    if not ids:
        return []
    if action == "retry":
        return await client.reschedule_jobs(ids, run_at=datetime.now(UTC), attempts=0)
    if action == "reschedule":
        if all(v is None for v in (run_at, priority, attempts, max_attempts)):
            raise ConfigError("reschedule needs a run_at, priority, attempts or max_attempts")
        return await client.reschedule_jobs(
            ids, run_at=run_at, priority=priority, attempts=attempts, max_attempts=max_attempts
        )
    if action == "fail":
        return await client.permanently_fail_jobs(ids, message)
    if action == "complete":
        return await client.complete_jobs(ids)
    if action == "remove":
        removed = []
        for info in infos:
            if info.job.key is not None:
                job = await client.remove_job(info.job.key)
                if job is not None:
                    removed.append(job)
        return removed
    raise ConfigError(f"unknown job action {action!r}")
