"""Live pages: one LISTEN connection per dashboard, its ``jobs:insert`` notifications
fanned out to every open event stream (server-sent events)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from ._asgi import Receive, Refused, Send
from ._security import response_headers

if TYPE_CHECKING:
    from .._client import Client

log = logging.getLogger("kongtask.dashboard")

#: Seconds between the "refresh" events of a live page when nothing is inserted.
REFRESH_SECONDS: Final = 5.0
#: Live-update streams served at once (they share the app's one LISTEN connection).
MAX_EVENT_STREAMS: Final = 256
#: Seconds between checks that the shared LISTEN connection still answers.
LISTEN_KEEPALIVE: Final = 30.0
#: The longest wait, in seconds, before connecting the shared LISTEN connection again.
LISTEN_RECONNECT_MAX: Final = 30.0


class LiveUpdates:
    """The shared LISTEN connection (:meth:`listen`) and the event streams it feeds
    (:meth:`stream`)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.listening = False
        # one bounded (size 1) channel per live page: a burst of inserts while a page is
        # slow to read coalesces into the one pending event instead of piling up
        self._streams: set[trio.MemorySendChannel[bytes]] = set()

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def broadcast(self, reason: bytes) -> None:
        for stream in list(self._streams):
            # a full channel already holds an event that makes the page refresh
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                stream.send_nowait(reason)

    def broadcast_refresh(self) -> None:
        self.broadcast(b"refresh")

    def _on_insert(self, *_: object) -> None:
        # asyncpg calls this on the trio thread inside its asyncio loop: it must not raise
        try:
            self.broadcast(b"insert")
        except Exception:  # pragma: no cover - broadcast suppresses what it expects
            log.exception("dashboard: fanning out an insert failed")

    async def listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the LISTEN connection until cancelled, connecting again after a loss.

        ``task_status.started()`` comes once the first attempt is over, failed or not.
        """
        db = self._client._db
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
                self.listening = True
                self.broadcast(b"refresh")  # inserts may have been missed meanwhile
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
                self.listening = False
                if conn is not None:
                    await db.close_connection(conn)
            await trio.sleep(min(LISTEN_RECONNECT_MAX, 0.5 * 2**attempt))
            attempt += 1

    async def stream(self, receive: Receive, send: Send) -> None:
        """Serve one live page's event stream until the browser goes away."""
        if len(self._streams) >= MAX_EVENT_STREAMS:
            raise Refused(503, "too many live pages open; reload later")
        changes_send, changes = trio.open_memory_channel[bytes](1)
        self._streams.add(changes_send)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": response_headers(
                        "text/event-stream", [("cache-control", "no-store")]
                    ),
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
