"""Serving the dashboard in a test: hypercorn on trio, on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from kongtask._cli_dashboard import open_dashboard, serve_dashboard
from kongtask._dashboard import DashboardApp


@asynccontextmanager
async def serving(dsn: str, **options: Any) -> AsyncIterator[tuple[str, DashboardApp]]:
    """Serve the dashboard on 127.0.0.1; yield its base URL and the app."""
    async with open_dashboard(dsn, **options) as app, trio.open_nursery() as nursery:
        urls = await nursery.start(serve_dashboard, app, "127.0.0.1", 0)
        yield urls[0], app
        nursery.cancel_scope.cancel()
