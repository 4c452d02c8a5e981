"""The dashboard's HTML: the templates, the static files, and the formats pages use."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from .._dashboard_views import SCRIPT, STYLE, TEMPLATES
from .._errors import ConfigError
from ._asgi import Request, Send, send_response
from ._security import csrf_cookie, response_headers


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


class Renderer:
    """Renders the pages of one dashboard (for ``schema``, read-only or not) and serves its
    static files."""

    def __init__(self, *, schema: str, read_only: bool) -> None:
        try:
            # an optional dependency: imported here so that the error can say how to get it
            import jinja2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "the dashboard needs jinja2: pip install 'kongtask[dashboard]'"
            ) from exc
        self.schema = schema
        self.read_only = read_only
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

    def is_static(self, path: str) -> bool:
        return path in self._static

    async def static(self, send: Send, path: str) -> None:
        content_type, body = self._static[path]
        headers = response_headers(content_type, [("cache-control", "max-age=300")])
        await send_response(send, 200, body, headers)

    async def html(
        self, send: Send, request: Request, template: str, title: str, context: dict[str, Any]
    ) -> None:
        page = self._env.get_template(template).render(
            title=title,
            base=request.base,
            schema=self.schema,
            read_only=self.read_only,
            live=context.pop("live", False),
            **context,
        )
        headers = response_headers(
            "text/html; charset=utf-8", [("cache-control", "no-store")], csrf_cookie(request)
        )
        await send_response(send, 200, page.encode(), headers)

    async def error(self, send: Send, request: Request, status: int, text: str) -> None:
        page = self._env.get_template("error").render(
            title=f"Error {status}",
            base=request.base,
            schema=self.schema,
            read_only=self.read_only,
            live=False,
            message=text,
        )
        headers = response_headers("text/html; charset=utf-8", (), csrf_cookie(request))
        await send_response(send, status, page.encode(), headers)
