"""A TCP proxy for network-fault tests: reset, stall or refuse connections on demand."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import Counter

import trio

_Entry = tuple[trio.SocketStream, trio.SocketStream, trio.CancelScope]


class TcpProxy:
    """A TCP proxy on 127.0.0.1 that can drop (RST), stall and refuse connections.

    Start it with ``await nursery.start(proxy.serve)``, then connect to
    ``127.0.0.1:proxy.port`` instead of the server's port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._conns: set[_Entry] = set()
        self._flowing = trio.Event()
        self._flowing.set()
        self.refusing = False
        self.counts: Counter[str] = Counter()
        self._swallowed: set[int] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free port (``self.port`` once started) and relay until cancelled.

        Start it with ``await nursery.start(proxy.serve)``.
        """
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @staticmethod
    def _rst(stream: trio.SocketStream) -> None:
        # linger 0: close() sends RST instead of FIN, like a crashed middlebox.
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            self._rst(client)
            await client.aclose()
            return
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            entry = (client, server, scope)
            self._conns.add(entry)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(
                        self._pump, server, client, nursery.cancel_scope, self._port_of(server)
                    )
            finally:
                self._conns.discard(entry)
        with trio.CancelScope(shield=True):
            await client.aclose()
            await server.aclose()

    @staticmethod
    def _port_of(server: trio.SocketStream) -> int | None:
        try:
            port: int = server.socket.getsockname()[1]
        except OSError:
            return None
        return port

    async def _pump(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        scope: trio.CancelScope,
        replies_of: int | None = None,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if replies_of is not None and replies_of in self._swallowed:
                    self.counts["swallowed bytes"] += len(data)
                    continue  # the server sent it; the client never sees it
                await self._flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    def server_ports(
        self,
    ) -> dict[int, tuple[trio.SocketStream, trio.SocketStream, trio.CancelScope]]:
        """Open connections by the proxy's local port towards the server (what the
        server sees as the client's port, e.g. ``pg_stat_activity.client_port``)."""
        ports: dict[int, _Entry] = {}
        for entry in self._conns:
            with contextlib.suppress(OSError):
                ports[entry[1].socket.getsockname()[1]] = entry
        return ports

    def swallow_replies(self, server_port: int) -> None:
        """From now on, discard what the server sends on that connection (the server's
        writes succeed, the client receives nothing): a reply lost in the network."""
        self._swallowed.add(server_port)

    def drop(self, server_port: int) -> bool:
        """Reset the one connection whose server side has local port ``server_port``."""
        entry = self.server_ports().get(server_port)
        if entry is None:
            return False
        client, server, scope = entry
        self._rst(client)
        self._rst(server)
        scope.cancel()
        self.counts["drop"] += 1
        return True

    def drop_all(self) -> int:
        """Reset every open connection at once."""
        n = len(self._conns)
        for client, server, scope in list(self._conns):
            self._rst(client)
            self._rst(server)
            scope.cancel()
        self.counts["drop"] += 1
        return n

    async def stall(self, seconds: float) -> None:
        """Stop forwarding bytes (connections stay open), then resume."""
        self._flowing = trio.Event()
        self.counts["stall"] += 1
        await trio.sleep(seconds)
        self._flowing.set()

    async def refuse(self, seconds: float) -> None:
        """Reset new connections for a while (the server looks down)."""
        self.refusing = True
        self.counts["refuse"] += 1
        await trio.sleep(seconds)
        self.refusing = False
