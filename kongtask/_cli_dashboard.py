"""``kongtask dashboard``: serve the web dashboard with hypercorn on trio."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ._client import open_client
from ._config import resolve_dsn
from ._cron import CronItem, load_crontab_file
from ._errors import ConfigError
from ._settings import AddConnectionOptions

if TYPE_CHECKING:
    from ._dashboard import DashboardApp, DashboardAuth

log = logging.getLogger("kongtask.dashboard")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def open_dashboard(
    dsn: str | None = None,
    *,
    schema: str | None = None,
    read_only: bool = False,
    auth: DashboardAuth | None = None,
    crontab: Sequence[CronItem] = (),
) -> AsyncIterator[DashboardApp]:
    """Connect to the database and yield the dashboard's ASGI app; disconnect on exit.

    The app's background work (:meth:`DashboardApp.run`: the overview's snapshots, the
    shared LISTEN connection) runs until the block exits.

    Mount the app in an ASGI server or framework that runs on trio (hypercorn's trio
    worker, for one). Needs the ``kongtask[dashboard]`` extra. Without ``auth`` the app
    asks for no credentials: serve it on loopback only.

    Example::

        async with kongtask.open_dashboard(dsn, auth=DashboardAuth(token=token)) as app:
            await hypercorn.trio.serve(app, config)
    """
    # The dashboard module loads only when a dashboard opens: every other command of the
    # command line starts without it.
    from ._dashboard import DashboardApp

    async with (
        open_client(dsn, schema=schema, max_connections=4) as client,
        trio.open_nursery() as nursery,
    ):
        app = DashboardApp(client, read_only=read_only, auth=auth, crontab=crontab)
        await nursery.start(app.run)
        yield app
        nursery.cancel_scope.cancel()


async def serve_dashboard(
    app: DashboardApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn until cancelled; ``task_status`` gets the bound URLs.

    Raises:
      ConfigError: a non-loopback ``host`` while the app asks no credentials.
    """
    if app.auth is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the dashboard on {host!r} without authentication: set "
            "KONGTASK_DASHBOARD_TOKEN (or KONGTASK_DASHBOARD_USER and "
            "KONGTASK_DASHBOARD_PASSWORD), or bind to 127.0.0.1"
        )
    try:
        import hypercorn.config
        import hypercorn.trio
    except ImportError as exc:
        raise ConfigError(
            "the dashboard needs hypercorn: pip install 'kongtask[dashboard]'"
        ) from exc
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    serve: Callable[..., Any] = hypercorn.trio.serve
    await serve(app, config, task_status=task_status, mode="asgi")


def add_dashboard_verb(verbs: Any, add_connection_options: AddConnectionOptions) -> None:
    parser = verbs.add_parser(
        "dashboard",
        help="serve the web dashboard (needs the kongtask[dashboard] extra)",
        description=(
            "Serve the web dashboard. It binds to loopback by default; another address "
            "needs KONGTASK_DASHBOARD_TOKEN or KONGTASK_DASHBOARD_USER and "
            "KONGTASK_DASHBOARD_PASSWORD in the environment."
        ),
    )
    add_connection_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks one)")
    parser.add_argument("--read-only", action="store_true", help="show no action; refuse POSTs")
    parser.add_argument("--crontab", help="crontab file whose next runs the cron page shows")
    parser.set_defaults(func=_dashboard_verb)


async def _dashboard_verb(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    from ._dashboard import DashboardAuth  # see open_dashboard

    auth = DashboardAuth.from_env(os.environ if env is None else env)
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port must be from 0 to 65535")
    if auth is None and not is_loopback(args.host):
        raise ConfigError(
            f"refusing to serve the dashboard on {args.host!r} without authentication: set "
            "KONGTASK_DASHBOARD_TOKEN (or KONGTASK_DASHBOARD_USER and "
            "KONGTASK_DASHBOARD_PASSWORD), or bind to 127.0.0.1"
        )
    crontab: list[CronItem] = []
    if args.crontab:
        try:
            crontab = load_crontab_file(args.crontab)
        except FileNotFoundError:
            raise ConfigError(f"crontab file {args.crontab!r} not found") from None
    async with (
        open_dashboard(
            resolve_dsn(args.connection),
            schema=args.schema,
            read_only=args.read_only,
            auth=auth,
            crontab=crontab,
        ) as app,
        trio.open_nursery() as nursery,
    ):
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            urls = await nursery.start(serve_dashboard, app, args.host, args.port)
            for url in urls:
                print(f"kongtask dashboard on {url}", flush=True)
            async for _ in signals:  # SIGINT/SIGTERM: stop serving, exit 0
                nursery.cancel_scope.cancel()
                break
    return 0
