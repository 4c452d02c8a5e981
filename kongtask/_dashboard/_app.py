"""The facade: :class:`DashboardApp`, the ASGI entry that routes each request to the part
that owns it, and :meth:`DashboardApp.run`, the nursery of the background parts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .._errors import ConfigError
from ._actions import Actions
from ._asgi import (
    Receive,
    Refused,
    Request,
    Scope,
    Send,
    query_of,
    read_form,
    request_headers,
    send_response,
)
from ._live import LiveUpdates
from ._pages import Page, Pages
from ._render import Renderer
from ._security import DashboardAuth, check_csrf, csrf_token, response_headers
from ._snapshots import Snapshots

if TYPE_CHECKING:
    from .._client import Client
    from .._cron import CronItem


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
        self.client = client
        self.auth = auth
        self._render = Renderer(schema=client.schema, read_only=read_only)
        self._pages = Pages(client, crontab)
        self._actions = Actions(self._pages, read_only=read_only)
        self._snapshots = Snapshots(client)
        self._live = LiveUpdates(client)
        self._running = False

    @property
    def read_only(self) -> bool:
        """Whether the app shows no action and refuses every POST."""
        return self._actions.read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        self._actions.read_only = self._render.read_only = value

    @property
    def crontab(self) -> list[CronItem]:
        """The cron items whose next runs the cron page shows."""
        return self._pages.crontab

    @crontab.setter
    def crontab(self, items: Sequence[CronItem]) -> None:
        self._pages.crontab = list(items)

    def statistics(self) -> DashboardStatistics:
        """The background tasks' state and the live pages open now."""
        return DashboardStatistics(
            running=self._running,
            listening=self._live.listening,
            event_streams=self._live.stream_count,
            overview_age=self._snapshots.overview.age(),
            pools_age=self._snapshots.pools.age(),
        )

    @property
    def overview_max_age(self) -> float:
        """Seconds between snapshots of the overview and pools pages (default 2)."""
        return self._snapshots.max_age

    @overview_max_age.setter
    def overview_max_age(self, seconds: float) -> None:
        self._snapshots.max_age = seconds

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
                await nursery.start(self._live.listen)
                self._snapshots.start_refreshing(nursery, self._live.broadcast_refresh)
                task_status.started()
        finally:
            self._running = False

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
        except Refused as exc:
            await self._render.error(send, request, exc.status, str(exc))
        except ConfigError as exc:
            await self._render.error(send, request, 400, str(exc))

    def _request(self, scope: Scope) -> Request:
        headers = request_headers(scope)
        csrf, fresh = csrf_token(headers)
        root = scope.get("root_path", "")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        return Request(
            method=scope["method"],
            path=path,
            query=query_of(scope),
            headers=headers,
            base=root.rstrip("/"),
            csrf=csrf,
            set_csrf=fresh,
        )

    async def _dispatch(self, request: Request, receive: Receive, send: Send) -> None:
        if self.auth is not None and not self.auth.accepts(request.headers.get("authorization")):
            headers = response_headers(
                "text/plain; charset=utf-8",
                [("www-authenticate", 'Basic realm="kongtask", charset="UTF-8"')],
            )
            await send_response(send, 401, b"authentication required\n", headers)
            return
        path = request.path
        if request.method == "POST":
            if path != "/action":
                raise Refused(404, "not found")
            if self.read_only:
                raise Refused(403, "the dashboard is read-only")
            form = await read_form(receive)
            check_csrf(request, form)
            try:
                done = await self._actions.act(request, form)
            finally:  # the counts and locks shown may have changed
                self._snapshots.poke()
            await self._render.html(send, request, *done)
            return
        if request.method not in ("GET", "HEAD"):
            raise Refused(405, "method not allowed")
        if self._render.is_static(path):
            await self._render.static(send, path)
            return
        if path == "/events":
            await self._live.stream(receive, send)
            return
        await self._render.html(send, request, *await self._page(request))

    async def _page(self, request: Request) -> Page:
        path = request.path
        if path == "/":
            return "overview", "Overview", await self._snapshots.overview.read(self._running)
        if path == "/jobs":
            return await self._pages.jobs(request)
        if path.startswith("/jobs/"):
            return await self._pages.job(path[len("/jobs/") :])
        if path == "/pools":
            return "pools", "Pools and locks", await self._snapshots.pools.read(self._running)
        if path == "/cron":
            return await self._pages.cron()
        if path == "/confirm":
            return await self._actions.confirm(request)
        raise Refused(404, "not found")
