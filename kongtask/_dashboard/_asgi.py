"""The HTTP side of ASGI: the request as the dashboard sees it, errors, forms, responses."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The largest POST body read.
MAX_BODY_BYTES: Final = 64 * 1024


class Refused(Exception):
    """An HTTP error response: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    base: str
    csrf: str
    set_csrf: bool


def request_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers[name.decode("latin-1").lower()] = value.decode("latin-1")
    return headers


def query_of(scope: Scope) -> dict[str, str]:
    return {
        k: v
        for k, v in urllib.parse.parse_qsl(
            scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
    }


async def send_response(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Send a whole response: ``headers`` (see :func:`._security.response_headers`) and
    the body's length."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_form(receive: Receive) -> dict[str, str]:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away")
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, "request body too large")
        if not message.get("more_body", False):
            break
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise Refused(400, "the form is not UTF-8") from None
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def cookies(header: str) -> dict[str, str]:
    found = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            found[name] = value
    return found


def optional_int(value: str | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise Refused(400, f"{what} must be an integer, not {value!r}") from None
    if not -(2**63) <= number < 2**63:
        raise Refused(400, f"{what} is out of range")
    return number
