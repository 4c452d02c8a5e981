"""The web dashboard: an ASGI application over a :class:`~kongtask.Client`.

Pages are rendered on the server (jinja2, autoescape on); the only script is the small
live-update one in :mod:`kongtask._dashboard_views`. Rules the app enforces:

- Authentication, when configured (:class:`DashboardAuth`), on every request: HTTP basic
  auth (a user and password, or any user with the token as password) or
  ``Authorization: Bearer <token>``. The CLI refuses a non-loopback bind without it.
- Every action is a POST that carries the CSRF token of the ``kongtask_csrf`` cookie
  (``SameSite=Strict``) in its form, from a page of the same origin (``Origin`` and
  ``Sec-Fetch-Site`` are checked when the browser sends them). GETs never change anything;
  each action is first shown on a confirmation page.
- Read-only mode refuses every POST and shows no action.
- Every response carries a Content-Security-Policy that allows only the dashboard's own
  script and stylesheet, no framing, and forms posting only to itself.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hmac
import json
import logging
import math
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from ._cron_sql import CronQueries
from ._dashboard_views import SCRIPT, STYLE, TEMPLATES
from ._errors import ConfigError
from ._inspect import JobInfo, QueueCounts
from ._inspect_sql import JOB_STATES
from ._job_actions import JOB_ACTIONS, JobAction, JobFilter, apply_job_action, select_jobs
from ._schema_sql import SchemaSql

if TYPE_CHECKING:
    from ._client import Client
    from ._cron import CronItem

log = logging.getLogger("kongtask.dashboard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSRF_COOKIE: Final = "kongtask_csrf"
#: The largest POST body read.
MAX_BODY_BYTES: Final = 64 * 1024
#: Jobs per page of the listing.
PAGE_SIZE: Final = 50
#: Seconds between the "refresh" events of a live page when nothing is inserted.
REFRESH_SECONDS: Final = 5.0
#: Live-update streams served at once (they share the app's one LISTEN connection).
MAX_EVENT_STREAMS: Final = 256
#: Seconds between the snapshots of the overview and pools pages while someone looks.
OVERVIEW_MAX_AGE: Final = 2.0
#: Seconds without a request for a snapshot page after which its snapshots pause (the
#: next request wakes them and is shown the last snapshot, with the time it was taken).
OVERVIEW_IDLE_SECONDS: Final = 60.0
#: Seconds between checks that the shared LISTEN connection still answers.
LISTEN_KEEPALIVE: Final = 30.0
#: The longest wait, in seconds, before connecting the shared LISTEN connection again.
LISTEN_RECONNECT_MAX: Final = 30.0
#: The most matching jobs a bulk action's confirmation page counts.
CONFIRM_COUNT_LIMIT: Final = 1000
#: The most jobs one bulk action touches.
MAX_BULK: Final = 100_000

ACTION_NAMES: Final = {
    "retry": "Retry now",
    "reschedule": "Reschedule",
    "fail": "Permanently fail",
    "complete": "Complete",
    "remove": "Remove",
    "unlock": "Unlock pool",
}
BULK_ACTIONS: Final = JOB_ACTIONS


@dataclass(frozen=True, slots=True)
class DashboardAuth:
    """Credentials the dashboard asks for.

    Attributes:
      username: with ``password``, accepted as HTTP basic auth.
      password: see ``username``.
      token: accepted as ``Authorization: Bearer <token>`` or as the basic-auth password
        of any user.
    """

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ConfigError("dashboard basic auth needs both a user and a password")
        if self.password == "" or self.token == "":
            raise ConfigError("dashboard passwords and tokens must not be empty")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DashboardAuth | None:
        """Read ``KONGTASK_DASHBOARD_USER``/``_PASSWORD`` and ``KONGTASK_DASHBOARD_TOKEN``."""
        user = env.get("KONGTASK_DASHBOARD_USER") or None
        password = env.get("KONGTASK_DASHBOARD_PASSWORD") or None
        token = env.get("KONGTASK_DASHBOARD_TOKEN") or None
        if user is None and password is None and token is None:
            return None
        return cls(user, password, token)

    def accepts(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries these credentials."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return self.token is not None and _same(value, self.token)
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        ok = False
        if self.token is not None and _same(password, self.token):
            ok = True
        if self.username is not None and self.password is not None:
            # both compared, so timing does not tell which part was wrong
            user_ok = _same(user, self.username)
            ok = (_same(password, self.password) and user_ok) or ok
        return ok


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class _Refused(Exception):
    """An HTTP error response: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    base: str
    csrf: str
    set_csrf: bool


def format_age(seconds: float | None) -> str:
    """``3h 02m``, ``4m 10s``, ``12.3s``, or ``–`` for ``None``."""
    if seconds is None or math.isnan(seconds):
        return "–"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def format_ts(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True, slots=True, repr=False)
class _DashboardQueries(SchemaSql):
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
class DashboardStatistics:
    """What :meth:`DashboardApp.statistics` reports.

    Attributes:
      running: the background tasks (:meth:`DashboardApp.run`) are running.
      listening: the shared LISTEN connection is up.
      event_streams: live-update streams open now.
      overview_age: seconds since the overview's snapshot was taken (``None``: none yet).
      pools_age: the same for the pools page.
    """

    running: bool
    listening: bool
    event_streams: int
    overview_age: float | None
    pools_age: float | None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    taken_at: float  # trio clock
    page: dict[str, Any]


class _SharedRead:
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
        self.snapshot: _Snapshot | None = None
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
                snapshot = _Snapshot(trio.current_time(), await self.take())
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
                self.snapshot = _Snapshot(trio.current_time(), page)
                if late:
                    changed()
            self._first.set()
            with trio.move_on_after(self.max_age):
                await self._poked.wait()


@dataclass(frozen=True, slots=True)
class _CronRow:
    identifier: str
    pattern: str | None
    known_since: datetime | None
    last_execution: datetime | None
    next_runs: list[datetime]


class DashboardApp:
    """The dashboard as an ASGI 3 application (HTTP and lifespan scopes).

    Mount it in any ASGI server or framework running on trio; it uses ``client`` (which
    must stay open while the app serves) for every query. Build one with
    :func:`kongtask.open_dashboard`, or directly::

        async with kongtask.open_client(dsn) as client, trio.open_nursery() as nursery:
            app = DashboardApp(client, auth=DashboardAuth(token="s3cret"))
            await nursery.start(app.run)

    :meth:`run` holds the app's background work: the snapshots of the overview and pools
    pages, taken again every 2 s while someone looks at them (so no request waits on a
    scan of the jobs table), and one LISTEN connection whose ``jobs:insert``
    notifications are fanned out to every live page. :func:`kongtask.open_dashboard` and
    the ASGI lifespan startup start it; without it those pages read the database on the
    request and live pages only get the periodic refresh.

    Args:
      client: an open client.
      read_only: show no action and refuse every POST.
      auth: credentials asked on every request; ``None`` asks none (loopback only).
      crontab: cron items whose next runs the cron page shows.
    """

    def __init__(
        self,
        client: Client,
        *,
        read_only: bool = False,
        auth: DashboardAuth | None = None,
        crontab: Sequence[CronItem] = (),
    ) -> None:
        try:
            import jinja2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "the dashboard needs jinja2: pip install 'kongtask[dashboard]'"
            ) from exc
        self.client = client
        self.read_only = read_only
        self.auth = auth
        self.crontab = list(crontab)
        self._env = jinja2.Environment(
            loader=jinja2.DictLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._env.globals.update(ts=format_ts, age=format_age)
        self._static = {
            "/static/dashboard.css": ("text/css; charset=utf-8", STYLE.encode()),
            "/static/dashboard.js": ("text/javascript; charset=utf-8", SCRIPT.encode()),
        }
        self._overview = _SharedRead("overview", self._overview_now)
        self._pools = _SharedRead("pools", self._pools_now)
        self._running = False
        self._listening = False
        # one bounded (size 1) channel per live page: a burst of inserts while a page is
        # slow to read coalesces into the one pending event instead of piling up
        self._streams: set[trio.MemorySendChannel[bytes]] = set()

    def statistics(self) -> DashboardStatistics:
        """The background tasks' state and the live pages open now."""
        return DashboardStatistics(
            running=self._running,
            listening=self._listening,
            event_streams=len(self._streams),
            overview_age=self._overview.age(),
            pools_age=self._pools.age(),
        )

    @property
    def overview_max_age(self) -> float:
        """Seconds between snapshots of the overview and pools pages (default 2)."""
        return self._overview.max_age

    @overview_max_age.setter
    def overview_max_age(self, seconds: float) -> None:
        self._overview.max_age = self._pools.max_age = seconds

    # -- background ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the overview and pools snapshots and hold the shared LISTEN until cancelled.

        ``task_status.started()`` comes once the first LISTEN attempt is over (a failed
        one is retried in the background, as are later losses of the connection).

        Raises:
          RuntimeError: it is already running.
        """
        if self._running:
            raise RuntimeError("this dashboard's background tasks are already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._listen)
                for shared in (self._overview, self._pools):
                    nursery.start_soon(shared.refresh_forever, self._broadcast_refresh)
                task_status.started()
        finally:
            self._running = False
            self._listening = False

    def _broadcast(self, reason: bytes) -> None:
        for stream in list(self._streams):
            # a full channel already holds an event that makes the page refresh
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                stream.send_nowait(reason)

    def _broadcast_refresh(self) -> None:
        self._broadcast(b"refresh")

    def _on_insert(self, *_: object) -> None:
        # asyncpg calls this on the trio thread inside its asyncio loop: it must not raise
        try:
            self._broadcast(b"insert")
        except Exception:  # pragma: no cover - _broadcast suppresses what it expects
            log.exception("dashboard: fanning out an insert failed")

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        db = self.client._db
        attempt = 0
        started = False
        while True:
            conn: Any = None
            try:
                conn = await db.connect()
                lost = trio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await db.run(conn.add_listener, "jobs:insert", self._on_insert)
                attempt = 0
                self._listening = True
                self._broadcast(b"refresh")  # inserts may have been missed meanwhile
                if not started:
                    started = True
                    task_status.started()
                while not lost.is_set():
                    with trio.move_on_after(LISTEN_KEEPALIVE):
                        await lost.wait()
                    if not lost.is_set():
                        with trio.fail_after(10):
                            await db.run(conn.execute, "select 1")
                raise ConnectionError("the LISTEN connection was closed")
            except Exception as exc:
                log.warning("dashboard: LISTEN connection failed: %s", exc)
                if not started:
                    started = True
                    task_status.started()
            finally:
                self._listening = False
                if conn is not None:
                    await db.close_connection(conn)
            await trio.sleep(min(LISTEN_RECONNECT_MAX, 0.5 * 2**attempt))
            attempt += 1

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = self._request(scope)
        try:
            await self._dispatch(request, receive, send)
        except _Refused as exc:
            await self._respond_error(send, request, exc.status, str(exc))
        except ConfigError as exc:
            await self._respond_error(send, request, 400, str(exc))

    def _request(self, scope: Scope) -> _Request:
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", []):
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        query = {
            k: v
            for k, v in urllib.parse.parse_qsl(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            )
        }
        cookie = _cookies(headers.get("cookie", "")).get(CSRF_COOKIE, "")
        fresh = len(cookie) < 32
        root = scope.get("root_path", "")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        return _Request(
            method=scope["method"],
            path=path,
            query=query,
            headers=headers,
            base=root.rstrip("/"),
            csrf=secrets.token_urlsafe(32) if fresh else cookie,
            set_csrf=fresh,
        )

    async def _dispatch(self, request: _Request, receive: Receive, send: Send) -> None:
        if self.auth is not None and not self.auth.accepts(request.headers.get("authorization")):
            await _send(
                send,
                401,
                b"authentication required\n",
                "text/plain; charset=utf-8",
                [("www-authenticate", 'Basic realm="kongtask", charset="UTF-8"')],
            )
            return
        path = request.path
        if request.method == "POST":
            if path != "/action":
                raise _Refused(404, "not found")
            if self.read_only:
                raise _Refused(403, "the dashboard is read-only")
            form = await _read_form(receive)
            self._check_csrf(request, form)
            try:
                done = await self._act(request, form)
            finally:  # the counts and locks shown may have changed
                self._overview.poke()
                self._pools.poke()
            await self._html(send, request, *done)
            return
        if request.method not in ("GET", "HEAD"):
            raise _Refused(405, "method not allowed")
        if path in self._static:
            content_type, body = self._static[path]
            await _send(send, 200, body, content_type, [("cache-control", "max-age=300")])
            return
        if path == "/events":
            await self._events(receive, send)
            return
        if path == "/":
            page = ("overview", "Overview", await self._overview.read(self._running))
        elif path == "/jobs":
            page = await self._jobs(request)
        elif path.startswith("/jobs/"):
            page = await self._job(path[len("/jobs/") :])
        elif path == "/pools":
            page = ("pools", "Pools and locks", await self._pools.read(self._running))
        elif path == "/cron":
            page = await self._cron()
        elif path == "/confirm":
            page = await self._confirm(request)
        else:
            raise _Refused(404, "not found")
        await self._html(send, request, *page)

    # -- pages -----------------------------------------------------------------

    async def _pools_now(self) -> dict[str, Any]:
        return {"live": True, "pools": await self.client.list_pools()}

    async def _overview_now(self) -> dict[str, Any]:
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
                    self.client._db.fetch, _DashboardQueries(self.client.schema).failures
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

    def _filters(self, query: Mapping[str, str]) -> dict[str, str | None]:
        filters: dict[str, str | None] = {}
        for name in ("task", "queue", "key", "state"):
            value = query.get(name, "")
            filters[name] = value or None
        return filters

    async def _jobs(self, request: _Request) -> tuple[str, str, dict[str, Any]]:
        filters = self._filters(request.query)
        after = _optional_int(request.query.get("after"), "after")
        error = None
        jobs: list[JobInfo] = []
        try:
            jobs = await self._list(filters, after=after, limit=PAGE_SIZE + 1)
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

    async def _list(
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

    async def _one(self, job_id: int) -> JobInfo | None:
        found = await self.client.list_jobs(ids=[job_id], limit=1)
        return found[0] if found else None

    async def _job(self, raw_id: str) -> tuple[str, str, dict[str, Any]]:
        job_id = _optional_int(raw_id, "job id")
        if job_id is None:
            raise _Refused(404, "not found")
        info = await self._one(job_id)
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

    async def _cron(self) -> tuple[str, str, dict[str, Any]]:
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

    # -- actions ---------------------------------------------------------------

    def _target(self, source: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        """Describe what an action applies to, and the hidden fields that name it."""
        if "id" in source:
            job_id = _optional_int(source["id"], "id")
            return f"job {job_id}", {"id": str(job_id)}
        if "pool" in source:
            return f"pool {source['pool']}", {"pool": source["pool"]}
        filters = {k: v for k, v in self._filters(source).items() if v}
        max_id = _optional_int(source.get("max_id"), "max_id")
        if max_id is None:
            raise _Refused(400, "a bulk action needs max_id (open it from the jobs page)")
        described = ", ".join(f"{k} = {v}" for k, v in filters.items()) or "no filter"
        return (
            f"every job matching {described} with id up to {max_id}",
            {**filters, "max_id": str(max_id)},
        )

    async def _confirm(self, request: _Request) -> tuple[str, str, dict[str, Any]]:
        if self.read_only:
            raise _Refused(403, "the dashboard is read-only")
        action = request.query.get("action", "")
        if action not in ACTION_NAMES:
            raise _Refused(400, f"unknown action {action!r}")
        target, fields = self._target(request.query)
        if (action == "unlock") != ("pool" in fields):
            raise _Refused(400, "unlock applies to a pool, the other actions to jobs")
        count = ""
        if "max_id" in fields:
            # a page, not the whole set: the page stays fast however many jobs match
            found = await self._list(
                self._filters(fields),
                max_id=_optional_int(fields["max_id"], "max_id"),
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

    def _check_csrf(self, request: _Request, form: Mapping[str, str]) -> None:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise _Refused(403, "cross-site request refused")
        origin = request.headers.get("origin")
        if origin is not None and origin != "null":
            host = urllib.parse.urlsplit(origin).netloc
            if host != request.headers.get("host"):
                raise _Refused(403, "cross-origin request refused")
        elif origin == "null":
            raise _Refused(403, "cross-origin request refused")
        sent = form.get("csrf", "")
        if request.set_csrf or not sent or not _same(sent, request.csrf):
            raise _Refused(403, "missing or wrong CSRF token: reload the page and try again")

    async def _act(
        self, request: _Request, form: Mapping[str, str]
    ) -> tuple[str, str, dict[str, Any]]:
        action = form.get("action", "")
        if action not in ACTION_NAMES:
            raise _Refused(400, f"unknown action {action!r}")
        target, fields = self._target(form)
        client = self.client
        back = f"{request.base}/jobs/{fields['id']}" if "id" in fields else f"{request.base}/"
        if action == "unlock":
            if "pool" not in fields:
                raise _Refused(400, "unlock applies to a pool")
            await client.force_unlock_workers([fields["pool"]])
            back = f"{request.base}/pools"
            message = f"Unlocked the jobs and queues of {target}."
            log.warning("dashboard: %s", message)
            return "done", "Done", {"message": message, "back": back}
        if "pool" in fields:
            raise _Refused(400, "unlock applies to a pool, the other actions to jobs")
        if "id" in fields:
            info = await self._one(int(fields["id"]))
            infos = [info] if info is not None else []
            if action == "remove" and info is not None and info.job.key is None:
                raise _Refused(400, "this job has no key (complete it to delete it)")
        else:
            filters = self._filters(fields)
            where = JobFilter(
                tasks=filters["task"],
                queues=filters["queue"],
                states=filters["state"],
                key=filters["key"],
                max_id=_optional_int(fields["max_id"], "max_id"),
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

    # -- live updates ------------------------------------------------------------

    async def _events(self, receive: Receive, send: Send) -> None:
        if len(self._streams) >= MAX_EVENT_STREAMS:
            raise _Refused(503, "too many live pages open; reload later")
        changes_send, changes = trio.open_memory_channel[bytes](1)
        self._streams.add(changes_send)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": _headers("text/event-stream", [("cache-control", "no-store")], None),
                }
            )
            async with trio.open_nursery() as nursery:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_disconnect)
                await send(
                    {"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True}
                )
                while True:
                    reason = b"refresh"
                    with trio.move_on_after(REFRESH_SECONDS):
                        reason = await changes.receive()
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"event: change\ndata: " + reason + b"\n\n",
                            "more_body": True,
                        }
                    )
        finally:
            self._streams.discard(changes_send)
            changes_send.close()
            changes.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Run :meth:`run` from the server's startup to its shutdown (unless it runs already,
        as under :func:`kongtask.open_dashboard`)."""
        while (await receive())["type"] != "lifespan.startup":
            pass
        async with trio.open_nursery() as nursery:
            if not self._running:
                await nursery.start(self.run)
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            nursery.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    # -- responses -----------------------------------------------------------------

    async def _html(
        self, send: Send, request: _Request, template: str, title: str, context: dict[str, Any]
    ) -> None:
        page = self._env.get_template(template).render(
            title=title,
            base=request.base,
            schema=self.client.schema,
            read_only=self.read_only,
            live=context.pop("live", False),
            **context,
        )
        extra = [("cache-control", "no-store")]
        await _send(
            send, 200, page.encode(), "text/html; charset=utf-8", extra, self._cookie(request)
        )

    def _cookie(self, request: _Request) -> str | None:
        if not request.set_csrf:
            return None
        return (
            f"{CSRF_COOKIE}={request.csrf}; Path={request.base or '/'}; HttpOnly; SameSite=Strict"
        )

    async def _respond_error(self, send: Send, request: _Request, status: int, text: str) -> None:
        page = self._env.get_template("error").render(
            title=f"Error {status}",
            base=request.base,
            schema=self.client.schema,
            read_only=self.read_only,
            live=False,
            message=text,
        )
        await _send(
            send, status, page.encode(), "text/html; charset=utf-8", [], self._cookie(request)
        )


def _headers(
    content_type: str, extra: Sequence[tuple[str, str]], cookie: str | None
) -> list[tuple[bytes, bytes]]:
    headers = [
        ("content-type", content_type),
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("x-frame-options", "DENY"),
        *extra,
    ]
    if cookie is not None:
        headers.append(("set-cookie", cookie))
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: Sequence[tuple[str, str]] = (),
    cookie: str | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *_headers(content_type, extra, cookie),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_form(receive: Receive) -> dict[str, str]:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(400, "the client went away")
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise _Refused(413, "request body too large")
        if not message.get("more_body", False):
            break
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise _Refused(400, "the form is not UTF-8") from None
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def _cookies(header: str) -> dict[str, str]:
    found = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            found[name] = value
    return found


def _optional_int(value: str | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise _Refused(400, f"{what} must be an integer, not {value!r}") from None
    if not -(2**63) <= number < 2**63:
        raise _Refused(400, f"{what} is out of range")
    return number


def _parse_run_at(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Refused(400, f"run at must be a date and time, not {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed
