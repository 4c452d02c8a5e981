"""The one door between trio and asyncio (asyncpg).

Every unit of database work is an asyncio coroutine function called once through
:meth:`Database.run`. Its cleanup (transaction rollback, connection release) then runs
on the asyncio side, where a cancellation is delivered once instead of level-triggered
(docs/design/stack.md#one-crossing-per-unit-of-work), so a cancelled query never leaks a
connection or a transaction.

Pool connections come in two kinds on release. One that user code had
(:meth:`Database.with_connection`) may carry session state (``SET``, ``LISTEN``,
advisory locks, cursors) and gets asyncpg's full reset query, an extra round trip.
One that only ran kongtask's own statements (:meth:`Database.with_own_connection`, the
``fetch*``/``execute`` shortcuts, ``pool.fetch``) carries none and goes straight back
(the reset is one more round trip per release: docs/design/stack.md#the-pool-reset-query). Either
way asyncpg first rolls back a transaction left open.

A database opened with ``keep_spare=True`` (the client's) goes one step further: the
connection of a unit of its own work that ended cleanly (no error, no open transaction)
stays checked out as the *spare*, and the next unit of work takes it without asking
the pool. asyncpg's release shields itself in an extra asyncio task and its acquire
goes through a queue; under trio-asyncio each of those hand-offs is a trio scheduling
round, about a tenth of a millisecond per ``add_job``. Every way of getting a pooled
connection through :class:`Database` takes the spare first, so it never makes a caller
wait for a connection the pool would otherwise have had free.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast

import asyncpg
import asyncpg.pool
import trio
import trio_asyncio

from ._aio_loop import run_ready_callbacks_together
from ._config import asyncpg_dsn

log = logging.getLogger("kongtask.pg")

T = TypeVar("T")
P = ParamSpec("P")

Connection = asyncpg.Connection
Record = asyncpg.Record
ProxiedConnection = asyncpg.pool.PoolConnectionProxy

APPLICATION_NAME = "kongtask"


#: Arrays of built-in types that kongtask's statements take as parameters (task ids,
#: job ids): (array oid, array name, element oid, element name). asyncpg encodes their
#: elements natively but learns each array type by a catalog query on every new
#: connection (most of a new connection's first claim, docs/performance.md, and a
#: round trip a transaction-pooling pgBouncer cannot spare). These oids are fixed
#: by PostgreSQL itself (the same in every release), so they are declared up front.
BUILTIN_ARRAY_TYPES: Final = ((1007, "_int4", 23, "integer"), (1016, "_int8", 20, "bigint"))


def _declare_builtin_arrays(conn: asyncpg.Connection) -> None:
    """Give ``conn`` the codecs of :data:`BUILTIN_ARRAY_TYPES` without a catalog query.

    The rows are what asyncpg's own type introspection returns for these types. If a
    future asyncpg changes this internal interface, the declaration is skipped and asyncpg
    introspects the types as usual: slower, never wrong.
    """
    rows = [
        {
            "oid": oid,
            "ns": "pg_catalog",
            "name": name,
            "kind": b"b",
            "basetype": None,
            "elemtype": elem_oid,
            "elemdelim": b",",
            "range_subtype": None,
            "attrtypoids": None,
            "attrnames": None,
            "depth": 0,
            "basetype_name": None,
            "elemtype_name": elem_name,
            "range_subtype_name": None,
        }
        for oid, name, elem_oid, elem_name in BUILTIN_ARRAY_TYPES
    ]
    try:
        cast(Any, conn)._protocol.get_settings().register_data_types(rows)
    except Exception as exc:  # pragma: no cover - depends on asyncpg's internals
        log.debug("cannot declare the built-in array codecs: %r", exc)


class KongtaskConnection(asyncpg.Connection):
    """Every connection kongtask opens: knows the built-in array types from the start."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _declare_builtin_arrays(self)


class PooledConnection(KongtaskConnection):
    """A pool connection that knows whether user code has had it since its last reset."""

    __slots__ = ("_kongtask_lent",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kongtask_lent = False

    def kongtask_lend(self) -> None:
        """Mark the connection as lent to user code: its release runs the full reset."""
        self._kongtask_lent = True


#: The most statement descriptions one unprepared connection keeps. kongtask's own
#: statements are a few dozen; a full set is emptied, never grown.
DESCRIBED_LIMIT: Final = 64


class _Described:
    """One-round-trip statements for a connection without asyncpg's statement cache.

    Without the cache (a transaction-pooling pgBouncer, where a prepared statement may
    be gone by the next transaction) asyncpg runs each statement in two round trips:
    parse and describe it, then parse it again, bind and execute. ``Connection.prepare``
    on such a connection returns an *unnamed* statement that asyncpg parses again at
    every execution, in the same round trip as the bind. Keeping that object per query
    text keeps its description (parameter and column types) on the client: every later
    run is one round trip, and the server still parses every time, so it does not
    matter which server connection pgBouncer hands out.
    """

    __slots__ = ("_statements",)

    def __init__(self) -> None:
        self._statements: dict[str, Any] = {}

    async def run(
        self, conn: asyncpg.Connection, method: str, query: str, args: tuple[object, ...], **kw: Any
    ) -> Any:
        statements = self._statements
        statement = statements.get(query)
        if statement is None:
            if len(statements) >= DESCRIBED_LIMIT:
                statements.clear()
            statement = await conn.prepare(query)
            statements[query] = statement
        try:
            return await getattr(statement, method)(*args, **kw)
        except BaseException:
            # described again next time: a schema change may have made it stale
            statements.pop(query, None)
            raise


class UnpreparedConnection(KongtaskConnection):
    """A dedicated connection behind a transaction-pooling pgBouncer (no statement
    cache): ``fetch``, ``fetchrow`` and ``fetchval`` take one round trip
    (:class:`_Described`). Dedicated connections run kongtask's own statements only
    (asyncio side; the signatures are asyncpg's)."""

    __slots__ = ("_kongtask_described",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kongtask_described = _Described()

    async def fetch(
        self,
        query: str,
        *args: object,
        timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's signature)
        record_class: Any = None,
    ) -> list[Any]:
        if record_class is not None:
            plain: list[Any] = await super().fetch(
                query, *args, timeout=timeout, record_class=record_class
            )
            return plain
        rows: list[Any] = await self._kongtask_described.run(
            self, "fetch", query, args, timeout=timeout
        )
        return rows

    async def fetchrow(
        self,
        query: str,
        *args: object,
        timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's signature)
        record_class: Any = None,
    ) -> Any:
        if record_class is not None:
            return await super().fetchrow(query, *args, timeout=timeout, record_class=record_class)
        return await self._kongtask_described.run(self, "fetchrow", query, args, timeout=timeout)

    async def fetchval(
        self,
        query: str,
        *args: object,
        column: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's signature)
    ) -> Any:
        return await self._kongtask_described.run(
            self, "fetchval", query, args, column=column, timeout=timeout
        )


async def _reset_pooled(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: the full reset only for connections user code had.

    asyncpg has already rolled back an open transaction and dropped listener callbacks
    (``Connection._reset``) before calling this; the rollback below only guards against
    a future asyncpg calling the hook first.
    """
    pooled = cast(PooledConnection, conn)
    lent, pooled._kongtask_lent = pooled._kongtask_lent, False
    if lent:
        await conn.reset()
    elif conn.is_in_transaction():
        await conn.execute("rollback")


# The single statements of the shortcuts below, as units of work (asyncio side).


async def _fetch(conn: asyncpg.Connection, query: str, *args: object) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(query, *args)
    return rows


async def _fetchrow(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(query, *args)
    return row


async def _fetchval(conn: asyncpg.Connection, query: str, *args: object) -> Any:
    return await conn.fetchval(query, *args)


async def _execute(conn: asyncpg.Connection, query: str, *args: object) -> str:
    status: str = await conn.execute(query, *args)
    return status


def _log_asyncio_exception(loop: object, context: Mapping[str, Any]) -> None:
    # trio-asyncio's default handler re-raises into open_loop's nursery and kills the
    # program; an asyncio-side hiccup is worth a log line, not a crash.
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
        *,
        keep_spare: bool = False,
        prepared_statements: bool = True,
    ) -> None:
        self._loop = loop
        self.pool = pool
        self._connect_kwargs = connect_kwargs
        self._connection_class: type[KongtaskConnection] = (
            KongtaskConnection if prepared_statements else UnpreparedConnection
        )
        self._keep_spare = keep_spare
        # At most one connection, checked out from the pool and idle (asyncio side only).
        self._spare: list[ProxiedConnection] = []

    async def _take(self) -> ProxiedConnection:
        """(asyncio side) The spare connection if there is a usable one, else the pool's."""
        while self._spare:
            spare = self._spare.pop()
            try:
                if not spare.is_closed():
                    return spare
            except asyncpg.InterfaceError:
                # Lost while idle: asyncpg already gave its slot back to the pool.
                continue
            await self.pool.release(spare)  # the pool replaces a closed connection
        conn: ProxiedConnection = await self.pool.acquire()
        return conn

    async def _give_back(self, conn: ProxiedConnection) -> None:
        """(asyncio side) Keep a clean connection of kongtask's own work as the spare."""
        if (
            self._keep_spare
            and not self._spare
            and not conn.is_closed()
            and not conn.is_in_transaction()
        ):
            self._spare.append(conn)
        else:
            await self.pool.release(conn)

    async def _release_spare(self) -> None:
        """(asyncio side) Hand the spare back to the pool (before the pool closes)."""
        self._keep_spare = False
        while self._spare:
            await self.pool.release(self._spare.pop())

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
        """Run asyncio ``fn(conn, *args)`` on a pooled connection lent to any code.

        The connection is acquired and released on the asyncio side, so a cancellation
        cannot leak it (docs/design/stack.md#one-crossing-per-unit-of-work). On release it
        gets asyncpg's full reset (advisory unlock all, ``CLOSE ALL``, ``UNLISTEN *``,
        ``RESET ALL``), so session state set by ``fn`` never reaches the next borrower.
        Temporary tables survive it, as with asyncpg's default pool.
        """

        async def on_lent_connection() -> T:
            conn = await self._take()
            try:
                # Marked before fn runs: even a failed or cancelled fn gets the reset.
                cast(PooledConnection, conn).kongtask_lend()
                # The proxy forwards every Connection method; callers see a Connection.
                return await fn(cast(asyncpg.Connection, conn), *args, **kwargs)
            finally:
                await self.pool.release(conn)  # never kept as the spare

        return await self.run(on_lent_connection)

    async def with_own_connection(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Like :meth:`with_connection`, for kongtask's own statements only.

        ``fn`` must leave no session state behind (no ``SET``, ``LISTEN``, session
        advisory lock, cursor or SQL-level ``PREPARE``); transactions are fine (an open
        one is rolled back). The connection then goes back to the pool without the
        reset query, one round trip fewer.
        """

        async def on_own_connection() -> T:
            conn = await self._take()
            try:
                result = await fn(cast(asyncpg.Connection, conn), *args, **kwargs)
            except BaseException:
                await self.pool.release(conn)
                raise
            await self._give_back(conn)
            return result

        return await self.run(on_own_connection)

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self.with_own_connection(_fetch, query, *args)

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        return await self.with_own_connection(_fetchrow, query, *args)

    async def fetchval(self, query: str, *args: object) -> Any:
        return await self.with_own_connection(_fetchval, query, *args)

    async def execute(self, query: str, *args: object) -> str:
        return await self.with_own_connection(_execute, query, *args)

    async def connect(self, settings: Mapping[str, str] | None = None) -> asyncpg.Connection:
        """A dedicated connection outside the pool (LISTEN needs one: pool release UNLISTENs).

        ``settings``: server settings for this session only, on top of the pool's.
        """
        kwargs = self._connect_kwargs
        if settings:
            kwargs = {**kwargs, "server_settings": {**kwargs["server_settings"], **settings}}

        async def connect() -> asyncpg.Connection:
            conn: asyncpg.Connection = await asyncpg.connect(
                connection_class=self._connection_class, **kwargs
            )
            return conn

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
    keep_spare: bool = False,
) -> AsyncIterator[Database]:
    """Open a trio-asyncio loop and an asyncpg pool on it; close both on exit.

    Args:
      dsn: a libpq connection string or URL; ``None`` lets the ``PG*`` variables decide.
      min_size, max_size: pool bounds.
      prepared_statements: ``False`` for transaction-pooling pgBouncer (no statement cache).
      keep_spare: keep the last clean connection of kongtask's own work checked out for
        the next one (see the module's docstring). Only for a database whose pool is
        used through :class:`Database` alone: code that acquires from ``pool`` directly
        does not see the spare.
    """
    connect_kwargs: dict[str, Any] = {
        "dsn": asyncpg_dsn(dsn),
        "server_settings": {"application_name": APPLICATION_NAME, **(server_settings or {})},
    }
    if not prepared_statements:
        connect_kwargs["statement_cache_size"] = 0
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_log_asyncio_exception)
            run_ready_callbacks_together(loop)
            pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool, loop=loop)(
                min_size=min(min_size, max_size),
                max_size=max_size,
                connection_class=PooledConnection,
                reset=_reset_pooled,
                **connect_kwargs,
            )
            db = Database(
                loop,
                pool,
                connect_kwargs,
                keep_spare=keep_spare,
                prepared_statements=prepared_statements,
            )
            try:
                yield db
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(10) as scope:
                        await trio_asyncio.aio_as_trio(db._release_spare, loop=loop)()
                        await trio_asyncio.aio_as_trio(pool.close, loop=loop)()
                    if scope.cancelled_caught:
                        log.warning(
                            "the connection pool did not close within 10 s "
                            "(a connection still in use); closing its sockets"
                        )
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
