"""The actions: each first shown on a confirmation page (a GET), then posted."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, cast

from .._job_actions import JobAction, JobFilter, apply_job_action, select_jobs
from ._asgi import Refused, Request, optional_int
from ._pages import ACTION_NAMES, Page, Pages, job_filters

log = logging.getLogger("kongtask.dashboard")

#: The most matching jobs a bulk action's confirmation page counts.
CONFIRM_COUNT_LIMIT: Final = 1000
#: The most jobs one bulk action touches.
MAX_BULK: Final = 100_000


def _target(source: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """Describe what an action applies to, and the hidden fields that name it."""
    if "id" in source:
        job_id = optional_int(source["id"], "id")
        return f"job {job_id}", {"id": str(job_id)}
    if "pool" in source:
        return f"pool {source['pool']}", {"pool": source["pool"]}
    filters = {k: v for k, v in job_filters(source).items() if v}
    max_id = optional_int(source.get("max_id"), "max_id")
    if max_id is None:
        raise Refused(400, "a bulk action needs max_id (open it from the jobs page)")
    described = ", ".join(f"{k} = {v}" for k, v in filters.items()) or "no filter"
    return (
        f"every job matching {described} with id up to {max_id}",
        {**filters, "max_id": str(max_id)},
    )


def _parse_run_at(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Refused(400, f"run at must be a date and time, not {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


class Actions:
    """The confirmation pages and the actions of a dashboard that is not read-only."""

    def __init__(self, pages: Pages, *, read_only: bool) -> None:
        self.pages = pages
        self.client = pages.client
        self.read_only = read_only

    async def confirm(self, request: Request) -> Page:
        if self.read_only:
            raise Refused(403, "the dashboard is read-only")
        action = request.query.get("action", "")
        if action not in ACTION_NAMES:
            raise Refused(400, f"unknown action {action!r}")
        target, fields = _target(request.query)
        if (action == "unlock") != ("pool" in fields):
            raise Refused(400, "unlock applies to a pool, the other actions to jobs")
        count = ""
        if "max_id" in fields:
            # a page, not the whole set: the page stays fast however many jobs match
            found = await self.pages.list(
                job_filters(fields),
                max_id=optional_int(fields["max_id"], "max_id"),
                limit=CONFIRM_COUNT_LIMIT + 1,
            )
            if action == "remove":
                found = [info for info in found if info.job.key is not None]
            if len(found) > CONFIRM_COUNT_LIMIT:
                count = f" (more than {CONFIRM_COUNT_LIMIT:,} job(s) now)"
            else:
                count = f" ({len(found)} job(s) now)"
            if action == "remove":
                count += ", jobs without a key are left alone"
        back = f"{request.base}/jobs/{fields['id']}" if "id" in fields else f"{request.base}/"
        return (
            "confirm",
            f"Confirm: {ACTION_NAMES[action]}",
            {
                "question": f"{ACTION_NAMES[action]}: {target}{count}?",
                "action": action,
                "fields": sorted(fields.items()),
                "csrf": request.csrf,
                "action_names": ACTION_NAMES,
                "default_run_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M"),
                "back": back,
            },
        )

    async def act(self, request: Request, form: Mapping[str, str]) -> Page:
        """Apply the posted action (its CSRF token already checked)."""
        action = form.get("action", "")
        if action not in ACTION_NAMES:
            raise Refused(400, f"unknown action {action!r}")
        target, fields = _target(form)
        client = self.client
        back = f"{request.base}/jobs/{fields['id']}" if "id" in fields else f"{request.base}/"
        if action == "unlock":
            if "pool" not in fields:
                raise Refused(400, "unlock applies to a pool")
            await client.force_unlock_workers([fields["pool"]])
            back = f"{request.base}/pools"
            message = f"Unlocked the jobs and queues of {target}."
            log.warning("dashboard: %s", message)
            return "done", "Done", {"message": message, "back": back}
        if "pool" in fields:
            raise Refused(400, "unlock applies to a pool, the other actions to jobs")
        if "id" in fields:
            info = await self.pages.one(int(fields["id"]))
            infos = [info] if info is not None else []
            if action == "remove" and info is not None and info.job.key is None:
                raise Refused(400, "this job has no key (complete it to delete it)")
        else:
            filters = job_filters(fields)
            where = JobFilter(
                tasks=filters["task"],
                queues=filters["queue"],
                states=filters["state"],
                key=filters["key"],
                max_id=optional_int(fields["max_id"], "max_id"),
            )
            infos = await select_jobs(client, where=where, limit=MAX_BULK)
        job_action = cast(JobAction, action)
        run_at = _parse_run_at(form.get("run_at", "")) if action == "reschedule" else None
        reason = (form.get("message") or None) if action == "fail" else None
        changed = len(
            await apply_job_action(client, job_action, infos, run_at=run_at, message=reason)
        )
        ids = [info.job.id for info in infos]
        message = f"{ACTION_NAMES[action]}: {changed} of {len(ids)} job(s) changed ({target})."
        if changed < len(ids):
            message += " Jobs that are running (locked) are left alone"
            message += ", as are jobs without a key." if action == "remove" else "."
        log.info("dashboard: %s", message)
        return "done", "Done", {"message": message, "back": back}
