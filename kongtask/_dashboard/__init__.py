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

The parts, one module each:

- ``_app``: :class:`DashboardApp`, the facade: the ASGI entry, routing, the lifespan and
  the background nursery.
- ``_asgi``: the request as parsed, HTTP errors, reading a form, sending a response.
- ``_security``: :class:`DashboardAuth`, the CSRF token and checks, the security headers.
- ``_render``: the templates, the static files and the HTML responses.
- ``_snapshots``: the overview and pools pages, read in the background and shared by
  every viewer, and the dashboard's own statements.
- ``_live``: the one shared LISTEN connection fanned out to the live pages' event streams.
- ``_pages``: the jobs listing, a job, the cron page.
- ``_actions``: the confirmation pages and the actions they post.
"""

from ._app import DashboardApp as DashboardApp, DashboardStatistics as DashboardStatistics
from ._security import CSP as CSP, DashboardAuth as DashboardAuth

__all__ = ["CSP", "DashboardApp", "DashboardAuth", "DashboardStatistics"]
