"""Who may use the dashboard and what its responses allow: authentication, the CSRF
token and its checks, and the headers every response carries."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .._errors import ConfigError
from ._asgi import Refused, Request, cookies

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSRF_COOKIE: Final = "kongtask_csrf"


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
            return self.token is not None and same(value, self.token)
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
        if self.token is not None and same(password, self.token):
            ok = True
        if self.username is not None and self.password is not None:
            # both compared, so timing does not tell which part was wrong
            user_ok = same(user, self.username)
            ok = (same(password, self.password) and user_ok) or ok
        return ok


def same(a: str, b: str) -> bool:
    """Compare two secrets in a time that does not tell where they differ."""
    return hmac.compare_digest(a.encode(), b.encode())


def csrf_token(headers: Mapping[str, str]) -> tuple[str, bool]:
    """The request's CSRF token and whether it is new (no usable cookie was sent)."""
    cookie = cookies(headers.get("cookie", "")).get(CSRF_COOKIE, "")
    if len(cookie) < 32:
        return secrets.token_urlsafe(32), True
    return cookie, False


def csrf_cookie(request: Request) -> str | None:
    """The ``Set-Cookie`` value that hands a new token to the browser, if it is new."""
    if not request.set_csrf:
        return None
    return f"{CSRF_COOKIE}={request.csrf}; Path={request.base or '/'}; HttpOnly; SameSite=Strict"


def check_csrf(request: Request, form: Mapping[str, str]) -> None:
    """Refuse a POST from another site or without the token of its cookie."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Refused(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = urllib.parse.urlsplit(origin).netloc
        if host != request.headers.get("host"):
            raise Refused(403, "cross-origin request refused")
    elif origin == "null":
        raise Refused(403, "cross-origin request refused")
    sent = form.get("csrf", "")
    if request.set_csrf or not sent or not same(sent, request.csrf):
        raise Refused(403, "missing or wrong CSRF token: reload the page and try again")


def response_headers(
    content_type: str, extra: Sequence[tuple[str, str]] = (), cookie: str | None = None
) -> list[tuple[bytes, bytes]]:
    """Every response's headers: the content type, the security policy, ``extra``, and
    the cookie (a ``Set-Cookie`` value) if any."""
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
