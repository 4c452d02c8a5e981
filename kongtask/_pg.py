"""The one door between trio and asyncio (asyncpg).

Every unit of database work is an asyncio coroutine function called once through
:meth:`Database.run`. Its cleanup (transaction rollback, connection release) then runs
on the asyncio side, where a cancellation is delivered once instead of level-triggered
(STACK.md P2), so a cancelled query never leaks a connection or a transaction.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import asyncpg
import trio
import trio_asyncio

log = logging.getLogger("kongtask.pg")

T = TypeVar("T")
P = ParamSpec("P")

Connection = asyncpg.Connection
Record = asyncpg.Record

APPLICATION_NAME = "kongtask"


def _log_asyncio_exception(loop: object, context: Mapping[str, Any]) -> None:
    # trio-asyncio's default handler re-raises into open_loop's nursery and kills the
    # program (STACK.md P3); an asyncio-side hiccup is worth a log line, not a crash.
    log.error("asyncio: %s", context.get("message"), exc_info=context.get("exception"))


class Database:
    """An asyncpg pool inside a trio-asyncio loop.

    Made by :func:`open_database`; use :meth:`run` for a unit of work written as an
    asyncio coroutine, or the ``fetch*``/``execute`` shortcuts for single statements.
    """

    def __init__(
        self,
        loop: Any,
        pool: asyncpg.Pool,
        connect_kwargs: dict[str, Any],
    ) -> None:
        self._loop = loop
        self.pool = pool
        self._connect_kwargs = connect_kwargs

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await the asyncio coroutine function ``fn(*args)`` from trio, crossing once."""
        result: T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
        return result

    async def with_connection(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run asyncio ``fn(conn, *args)`` on a pooled connection.

        The connection is acquired and released on the asyncio side, so a cancellation
        cannot leak it (STACK.md P2).
        """

        async def on_pooled_connection() -> T:
            async with self.pool.acquire() as conn:
                # The proxy forwards every Connection method; callers see a Connection.
                return await fn(cast(asyncpg.Connection, conn), *args, **kwargs)

        return await self.run(on_pooled_connection)

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self.run(self.pool.fetch, query, *args)

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        return await self.run(self.pool.fetchrow, query, *args)

    async def fetchval(self, query: str, *args: object) -> Any:
        return await self.run(self.pool.fetchval, query, *args)

    async def execute(self, query: str, *args: object) -> str:
        return await self.run(self.pool.execute, query, *args)

    async def connect(self) -> asyncpg.Connection:
        """A dedicated connection outside the pool (LISTEN needs one: pool release UNLISTENs)."""
        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(**self._connect_kwargs)

        return await self.run(connect)

    async def close_connection(self, conn: asyncpg.Connection) -> None:
        """Close a dedicated connection, even from a cancelled scope."""
        with trio.CancelScope(shield=True), trio.move_on_after(5) as scope:
            await self.run(conn.close)
        if scope.cancelled_caught:
            conn.terminate()



@asynccontextmanager
async def open_database(
    dsn: str | None,
    *,
    min_size: int = 1,
    max_size: int = 10,
    prepared_statements: bool = True,
    server_settings: Mapping[str, str] | None = None,
) -> AsyncIterator[Database]:
    """Open a trio-asyncio loop and an asyncpg pool on it; close both on exit.

    Args:
      dsn: a libpq connection string or URL; ``None`` lets the ``PG*`` variables decide.
      min_size, max_size: pool bounds.
      prepared_statements: ``False`` for transaction-pooling pgBouncer (no statement cache).
    """
    connect_kwargs: dict[str, Any] = {
        "dsn": dsn,
        "server_settings": {"application_name": APPLICATION_NAME, **(server_settings or {})},
    }
    if not prepared_statements:
        connect_kwargs["statement_cache_size"] = 0
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_log_asyncio_exception)
            pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool, loop=loop)(
                min_size=min(min_size, max_size), max_size=max_size, **connect_kwargs
            )
            try:
                yield Database(loop, pool, connect_kwargs)
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(10) as scope:
                        await trio_asyncio.aio_as_trio(pool.close, loop=loop)()
                    if scope.cancelled_caught:
                        pool.terminate()
    except BaseExceptionGroup as group:
        # open_loop's two internal nurseries wrap everything raised inside them, the
        # caller's own exceptions included, in nested one-member groups. Unwrap those,
        # so `except ConnectionRefusedError` (or a user's KeyError) works as written.
        leaf = _sole_exception(group)
        if leaf is None:
            raise
        raise leaf from None


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested one-member groups, or ``None`` if there are more."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
