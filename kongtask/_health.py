"""The pool's HTTP endpoints (``/healthz``, ``/readyz``, ``/metrics``) and their rules.

The server is a small HTTP/1.1 responder on :func:`trio.serve_tcp`, started in the pool's
own nursery (``open_worker(..., metrics_port=...)``), so it lives and stops with the pool.
Every response closes its connection; requests are limited in size and time, so a slow or
hostile client cannot hold a task for long.

- ``/healthz``: 200 while the pool has not stopped (it is served from the pool's nursery,
  so an answer means the nursery is alive).
- ``/readyz``: 200 when the pool can take jobs: not shutting down, its LISTEN connection
  is up (for kongtask pools with a marked id this includes holding the liveness lock),
  and a claim succeeded within two poll intervals (a pool whose workers are all busy does
  not claim, so that condition is waived while it waits for capacity). Else 503 with the
  reasons.
- ``/metrics``: Prometheus text (``kongtask._metrics``), when ``prometheus_client`` is
  installed (``pip install 'kongtask[metrics]'``); else 501.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from ._worker import Worker

log = logging.getLogger("kongtask.health")

#: The largest request head read (request line and headers).
MAX_REQUEST_BYTES: Final = 8192
#: Seconds a client gets to send its request head.
REQUEST_TIMEOUT: Final = 5.0


@dataclass(slots=True)
class IoCounters:
    """What the pool's fetcher and completer record per statement, for readiness and metrics.

    Attributes:
      claims: claim statements that succeeded.
      claim_seconds: their total duration.
      claimed: jobs they returned.
      last_claim_at: trio time of the last successful claim (``-inf`` before the first).
      flushes: outcome-writing statements that succeeded.
      flush_seconds: their total duration.
      listen_errors: times the LISTEN connection failed or was lost.
    """

    claims: int = 0
    claim_seconds: float = 0.0
    claimed: int = 0
    last_claim_at: float = -math.inf
    flushes: int = 0
    flush_seconds: float = 0.0
    listen_errors: int = 0


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the pool can take jobs now, and if not, why (``/readyz``)."""

    ready: bool
    reasons: tuple[str, ...]


def readiness(worker: Worker) -> Readiness:
    """Apply the ``/readyz`` rule of the module docstring to ``worker``."""
    reasons = []
    if worker.stopping:
        reasons.append("the pool is shutting down")
    stats = worker.statistics()
    if not stats.listening:
        reasons.append("the LISTEN connection is down (liveness lock not held)")
    io = worker._io
    age = trio.current_time() - io.last_claim_at
    if age > 2 * worker._poll_interval and stats.fetcher != "waiting for capacity":
        reasons.append(
            "no claim has succeeded yet"
            if io.last_claim_at == -math.inf
            else f"no claim has succeeded for {age:.1f} s"
        )
    return Readiness(not reasons, tuple(reasons))


MetricsRenderer = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    reason: str
    body: bytes
    content_type: str = "application/json"


def _json(status: int, reason: str, doc: object) -> _Response:
    return _Response(status, reason, json.dumps(doc).encode() + b"\n")


async def _respond_to(
    worker: Worker, metrics: MetricsRenderer | None, method: str, path: str
) -> _Response:
    path = path.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _json(405, "Method Not Allowed", {"error": "only GET and HEAD"})
    if path == "/healthz":
        if worker.statistics().state == "stopped":
            return _json(503, "Service Unavailable", {"status": "stopped"})
        return _json(200, "OK", {"status": "ok", "pool_id": worker.pool_id})
    if path == "/readyz":
        state = readiness(worker)
        doc = {"status": "ready" if state.ready else "unready", "reasons": list(state.reasons)}
        if state.ready:
            return _json(200, "OK", doc)
        return _json(503, "Service Unavailable", doc)
    if path == "/metrics":
        if metrics is None:
            return _json(
                501, "Not Implemented", {"error": "install kongtask[metrics] for /metrics"}
            )
        body = await metrics()
        return _Response(200, "OK", body, "text/plain; version=0.0.4; charset=utf-8")
    return _json(404, "Not Found", {"error": "try /healthz, /readyz or /metrics"})


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    data = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > MAX_REQUEST_BYTES:
                return None
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        return data
    return None


async def _handle(
    worker: Worker, metrics: MetricsRenderer | None, stream: trio.SocketStream
) -> None:
    try:
        head = await _read_head(stream)
        request_line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0] if head else b""
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            response = _json(400, "Bad Request", {"error": "malformed request"})
            method = "GET"
        else:
            method, path = parts[0], parts[1]
            response = await _respond_to(worker, metrics, method, path)
        head_out = (
            f"HTTP/1.1 {response.status} {response.reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head_out + (b"" if method == "HEAD" else response.body))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away
    except Exception:
        # a broken request must never take the pool down
        log.exception("pool %s: answering an HTTP request failed", worker.pool_id)
    finally:
        await stream.aclose()


async def serve_http(
    worker: Worker,
    host: str,
    port: int,
    metrics: MetricsRenderer | None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints on ``host:port`` until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound = listeners[0].socket.getsockname()[1]
    log.info("pool %s: serving /healthz, /readyz, /metrics on port %d", worker.pool_id, bound)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(worker, metrics, stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
