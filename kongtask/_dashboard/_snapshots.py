"""The overview and pools pages: their reads scan the jobs table, so they are taken in
the background and one snapshot is shared by every viewer."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from .._inspect import QueueCounts
from .._inspect_sql import JOB_STATES
from .._schema_sql import SchemaSql
from ._render import format_age

if TYPE_CHECKING:
    from .._client import Client

log = logging.getLogger("kongtask.dashboard")

#: Seconds between the snapshots of the overview and pools pages while someone looks.
OVERVIEW_MAX_AGE: Final = 2.0
#: Seconds without a request for a snapshot page after which its snapshots pause (the
#: next request wakes them and is shown the last snapshot, with the time it was taken).
OVERVIEW_IDLE_SECONDS: Final = 60.0


@dataclass(frozen=True, slots=True, repr=False)
class DashboardQueries(SchemaSql):
    """The dashboard's own statements (the rest are the client's), for one schema.

    Attributes:
      failures: ``minutes_ago, n``: jobs whose latest failure was that many minutes ago,
        over the last hour.
    """

    failures: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        # A failure sets run_at = greatest(now(), run_at) + exp(least(attempts, 10))
        # seconds, so run_at minus that backoff is when the latest failure happened (exact
        # when the job was due at the time, as claimed jobs are). Completed jobs are
        # deleted: not countable.
        return dict(
            failures=f"""
select floor(extract(epoch from now() - failed_at) / 60)::int as minutes_ago, count(*) as n
from (
  select run_at - exp(least(attempts, 10)) * interval '1 second' as failed_at
  from {s}._private_jobs
  where last_error is not null and locked_at is null and attempts > 0
) f
where failed_at > now() - interval '1 hour' and failed_at <= now()
group by 1
"""
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float  # trio clock
    page: dict[str, Any]


class SharedRead:
    """A page whose reads scan the jobs table, shared by every viewer as one snapshot.

    With the app's background running, :meth:`refresh_forever` takes it again every
    ``max_age`` seconds while the page was requested in the last
    :data:`OVERVIEW_IDLE_SECONDS`, and a request only shows the latest snapshot (waiting
    only for the very first). Without it, a request older than ``max_age`` takes it.
    """

    def __init__(self, name: str, take: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.name = name
        self.take = take
        self.max_age = OVERVIEW_MAX_AGE
        self.snapshot: Snapshot | None = None
        self._first = trio.Event()
        self._viewed_at = -math.inf
        self._wanted = trio.Event()
        self._poked = trio.Event()
        self._lock = trio.Lock()

    def age(self) -> float | None:
        snapshot = self.snapshot
        return None if snapshot is None else trio.current_time() - snapshot.taken_at

    def poke(self) -> None:
        """Take the next snapshot now (after an action changed what it shows)."""
        self._poked.set()
        self._wanted.set()

    async def read(self, background: bool) -> dict[str, Any]:
        self._viewed_at = trio.current_time()
        self._wanted.set()
        if background:
            await self._first.wait()
        async with self._lock:
            snapshot = self.snapshot
            # without the background, or when its first read failed: read here
            if snapshot is None or (
                not background and trio.current_time() - snapshot.taken_at >= self.max_age
            ):
                snapshot = Snapshot(trio.current_time(), await self.take())
                self.snapshot = snapshot
        return {**snapshot.page, "counted_ago": format_age(trio.current_time() - snapshot.taken_at)}

    async def refresh_forever(self, changed: Callable[[], None]) -> None:
        """Take snapshots until cancelled; call ``changed`` after one a viewer was not
        shown (the first after an idle spell or a poke)."""
        while True:
            idle = trio.current_time() - self._viewed_at > OVERVIEW_IDLE_SECONDS
            late = self._poked.is_set()
            if idle and self.snapshot is not None and not late:
                self._wanted = trio.Event()
                await self._wanted.wait()
                late = True
            self._poked = trio.Event()
            try:
                page = await self.take()
            except Exception as exc:
                log.warning("dashboard: reading the %s page failed: %s", self.name, exc)
            else:
                self.snapshot = Snapshot(trio.current_time(), page)
                if late:
                    changed()
            self._first.set()
            with trio.move_on_after(self.max_age):
                await self._poked.wait()


class Snapshots:
    """The overview and pools pages of one client, each a :class:`SharedRead`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.overview = SharedRead("overview", self.overview_now)
        self.pools = SharedRead("pools", self.pools_now)

    @property
    def max_age(self) -> float:
        return self.overview.max_age

    @max_age.setter
    def max_age(self, seconds: float) -> None:
        self.overview.max_age = self.pools.max_age = seconds

    def poke(self) -> None:
        """Take both again now (an action may have changed the counts and locks shown)."""
        self.overview.poke()
        self.pools.poke()

    def start_refreshing(self, nursery: trio.Nursery, changed: Callable[[], None]) -> None:
        for shared in (self.overview, self.pools):
            nursery.start_soon(shared.refresh_forever, changed)

    async def pools_now(self) -> dict[str, Any]:
        return {"live": True, "pools": await self.client.list_pools()}

    async def overview_now(self) -> dict[str, Any]:
        # three statements on three pooled connections at once: the page costs the
        # slowest of them (each counting one scans the jobs table), not their sum
        found: dict[str, Any] = {}

        async def get(name: str, call: Callable[[], Awaitable[Any]]) -> None:
            found[name] = await call()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "counts", self.client.queue_counts)
            nursery.start_soon(get, "oldest", self.client.oldest_ready_age)
            nursery.start_soon(
                get,
                "failures",
                functools.partial(
                    self.client._db.fetch, DashboardQueries(self.client.schema).failures
                ),
            )
        counts: list[QueueCounts] = found["counts"]
        oldest: float | None = found["oldest"]
        rows: list[Any] = found["failures"]
        totals = {state: sum(c.count(state) for c in counts) for state in JOB_STATES}
        per_minute = {int(r["minutes_ago"]): int(r["n"]) for r in rows}
        top = max(per_minute.values(), default=0)
        bars = []
        for minutes_ago, n in per_minute.items():
            if 0 <= minutes_ago < 60 and n:
                bars.append(
                    {
                        "x": (59 - minutes_ago) * 8,
                        "h": max(2, round(58 * n / top)),
                        "label": f"{n} failure(s) {minutes_ago} min ago",
                    }
                )
        return {
            "live": True,
            "states": JOB_STATES,
            "totals": totals,
            "counts": counts,
            "oldest_ready": format_age(oldest),
            "failure_bars": bars,
            "failures_total": sum(per_minute.values()),
        }
