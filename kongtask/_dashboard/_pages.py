"""The pages read on each request: the jobs listing, one job, the cron page."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from .._cron_sql import CronQueries
from .._errors import ConfigError
from .._inspect import JobInfo
from .._inspect_sql import JOB_STATES
from .._job_actions import JOB_ACTIONS
from ._asgi import Refused, Request, optional_int

if TYPE_CHECKING:
    from .._client import Client
    from .._cron import CronItem

#: Jobs per page of the listing.
PAGE_SIZE: Final = 50

#: The actions the pages offer, with their labels (see :mod:`._actions`).
ACTION_NAMES: Final = {
    "retry": "Retry now",
    "reschedule": "Reschedule",
    "fail": "Permanently fail",
    "complete": "Complete",
    "remove": "Remove",
    "unlock": "Unlock pool",
}
BULK_ACTIONS: Final = JOB_ACTIONS

#: A page: its template, its title and what the template is given.
Page = tuple[str, str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _CronRow:
    identifier: str
    pattern: str | None
    known_since: datetime | None
    last_execution: datetime | None
    next_runs: list[datetime]


def job_filters(query: Mapping[str, str]) -> dict[str, str | None]:
    """The listing's filters found in a query or form (empty ones as ``None``)."""
    filters: dict[str, str | None] = {}
    for name in ("task", "queue", "key", "state"):
        value = query.get(name, "")
        filters[name] = value or None
    return filters


class Pages:
    """The pages of one client that are read on each request, and the reads of jobs the
    actions share."""

    def __init__(self, client: Client, crontab: Sequence[CronItem]) -> None:
        self.client = client
        self.crontab = list(crontab)

    async def list(
        self,
        filters: Mapping[str, str | None],
        *,
        after: int | None = None,
        max_id: int | None = None,
        limit: int,
    ) -> list[JobInfo]:
        return await self.client.list_jobs(
            tasks=filters["task"],
            queues=filters["queue"],
            key=filters["key"],
            states=filters["state"],
            after_id=after,
            max_id=max_id,
            limit=limit,
            descending=True,
        )

    async def one(self, job_id: int) -> JobInfo | None:
        found = await self.client.list_jobs(ids=[job_id], limit=1)
        return found[0] if found else None

    async def jobs(self, request: Request) -> Page:
        filters = job_filters(request.query)
        after = optional_int(request.query.get("after"), "after")
        error = None
        jobs: list[JobInfo] = []
        try:
            jobs = await self.list(filters, after=after, limit=PAGE_SIZE + 1)
        except ConfigError as exc:
            error = str(exc)
        next_after = jobs[PAGE_SIZE - 1].job.id if len(jobs) > PAGE_SIZE else None
        jobs = jobs[:PAGE_SIZE]
        bulk_max_id = jobs[0].job.id if jobs and after is None else None
        filter_query = urllib.parse.urlencode({k: v for k, v in filters.items() if v})
        return (
            "jobs",
            "Jobs",
            {
                "live": after is None,
                "states": JOB_STATES,
                "filters": filters,
                "jobs": jobs,
                "error": error,
                "after": after,
                "next_after": next_after,
                "filter_query": filter_query,
                "bulk_max_id": bulk_max_id,
                "bulk_actions": BULK_ACTIONS if bulk_max_id is not None else (),
                "action_names": ACTION_NAMES,
            },
        )

    async def job(self, raw_id: str) -> Page:
        job_id = optional_int(raw_id, "job id")
        if job_id is None:
            raise Refused(404, "not found")
        info = await self.one(job_id)
        actions: list[str] = []
        payload = ""
        if info is not None:
            payload = json.dumps(info.job.payload, indent=2, ensure_ascii=False)
            if info.state != "running":
                actions = ["retry", "reschedule", "fail", "complete"]
            if info.job.key is not None:
                actions.append("remove")
        return (
            "job",
            f"Job {job_id}",
            {
                "job_id": job_id,
                "info": info,
                "payload": payload,
                "actions": actions,
                "action_names": ACTION_NAMES,
            },
        )

    async def cron(self) -> Page:
        rows = await self.client._db.fetch(CronQueries(self.client.schema).known_crontabs)
        known = {r["identifier"]: r for r in rows}
        now = datetime.now(UTC)
        items = []
        for item in self.crontab:
            identifier = item.cron_id
            row = known.pop(identifier, None)
            items.append(
                _CronRow(
                    identifier,
                    item.match if isinstance(item.match, str) else "(a function)",
                    row["known_since"] if row else None,
                    row["last_execution"] if row else None,
                    item.next_runs(now, 3),
                )
            )
        for identifier, row in sorted(known.items()):
            items.append(_CronRow(identifier, None, row["known_since"], row["last_execution"], []))
        return "cron", "Cron", {"items": items}
