"""Adding jobs on the caller's own connection, in the caller's own transaction.

One sync and one asyncio entry point each for ``add_job`` and ``add_jobs``; they look at
the connection's type to pick the driver. A driver is imported only once an object of it
is passed in, so ``import kongtask`` needs none of them, and neither trio nor
trio-asyncio is used here.

The producers never commit or roll back: the caller's transaction decides whether the
jobs exist. Every argument is checked (by :mod:`kongtask._enqueue`, as for the trio
client) before anything is sent.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, overload

from ._config import resolve_schema
from ._enqueue import (
    ParamStyle,
    Plan,
    Row,
    Statement,
    add_job_plan,
    add_jobs_plan,
    checked_add_job,
    checked_specs,
    missing_schema,
)
from ._errors import ConfigError
from ._job import Job, JobSpec, JSONValue
from ._tracing import traced_add
from ._validate import JobKeyMode

_DRIVERS = ("psycopg", "psycopg2", "sqlalchemy", "django", "asyncpg")

SyncExecute = Callable[[Statement], Sequence[Row]]
AsyncExecute = Callable[[Statement], Awaitable[Sequence[Row]]]


def _family(conn: object) -> str:
    """The driver package ``conn`` belongs to (by its class or a base class), or ``""``."""
    for cls in type(conn).__mro__:
        top = cls.__module__.partition(".")[0]
        if top in _DRIVERS:
            return top
    return ""


def _tuples(rows: Sequence[Any]) -> Sequence[Row]:
    # A DB-API connection may be set up to return dict-like rows.
    if rows and isinstance(rows[0], Mapping):
        return [tuple(row.values()) for row in rows]
    return rows


@functools.lru_cache(maxsize=64)
def _sqlalchemy_text(sql: str) -> Any:
    from sqlalchemy import text

    return text(sql)


def _named(params: object) -> Mapping[str, Any]:
    assert isinstance(params, Mapping)  # the "named" style binds a mapping
    return params


def _sync_driver(conn: object) -> tuple[ParamStyle, SyncExecute]:
    family = _family(conn)
    if family == "psycopg":
        import psycopg
        from psycopg.rows import tuple_row

        if isinstance(conn, psycopg.Cursor):
            conn = conn.connection
        if isinstance(conn, psycopg.Connection):
            connection: psycopg.Connection[Any] = conn

            def run_psycopg(statement: Statement) -> Sequence[Row]:
                # a cursor of our own: the caller's row factory may return dicts
                with connection.cursor(row_factory=tuple_row) as cur:
                    cur.execute(statement.sql, statement.params)
                    rows: list[Any] = cur.fetchall()
                    return rows

            return "format", run_psycopg
    elif family == "sqlalchemy":
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(conn, scoped_session):  # e.g. Flask-SQLAlchemy's db.session
            conn = conn()
        if isinstance(conn, Connection | Session):
            executor: Connection | Session = conn

            def run_sqlalchemy(statement: Statement) -> Sequence[Row]:
                result = executor.execute(_sqlalchemy_text(statement.sql), _named(statement.params))
                rows: Sequence[Row] = result.all()
                return rows

            return "named", run_sqlalchemy
    elif family == "django":
        django_conn: Any = conn

        def run_django(statement: Statement) -> Sequence[Row]:
            with django_conn.cursor() as cur:
                cur.execute(statement.sql, statement.params)
                return _tuples(cur.fetchall())

        return "format", run_django
    elif family in ("psycopg2", "") and callable(getattr(conn, "cursor", None)):
        return _dbapi_driver(conn, family)
    raise ConfigError(
        f"add_job_sync cannot use a {type(conn).__module__}.{type(conn).__qualname__}: "
        "pass a psycopg Connection or Cursor, a SQLAlchemy Connection or Session, a Django "
        "connection or a DB-API 2.0 connection (asyncio connections go to kongtask.aio)"
    )


def _dbapi_driver(conn: Any, family: str) -> tuple[ParamStyle, SyncExecute]:
    module = sys.modules.get(type(conn).__module__.partition(".")[0])
    style: ParamStyle = getattr(module, "paramstyle", "format")
    if style not in ("format", "pyformat", "qmark", "numeric", "named"):
        raise ConfigError(f"{type(conn).__module__} has an unknown paramstyle {style!r}")
    make_cursor: Callable[[], Any] = conn.cursor
    if family == "psycopg2":
        import psycopg2.extensions

        # a plain cursor: the connection's cursor_factory may return dict rows
        make_cursor = functools.partial(conn.cursor, cursor_factory=psycopg2.extensions.cursor)

    def run_dbapi(statement: Statement) -> Sequence[Row]:
        cur = make_cursor()
        try:
            cur.execute(statement.sql, statement.params)
            return _tuples(cur.fetchall())
        finally:
            cur.close()

    return style, run_dbapi


def _asyncpg_execute(conn: Any) -> AsyncExecute:
    """``conn``: an asyncpg Connection or a pool's connection proxy."""

    async def run_asyncpg(statement: Statement) -> Sequence[Row]:
        rows: list[Any] = await conn.fetch(statement.sql, *statement.params)
        return rows

    return run_asyncpg


def _async_driver(conn: object) -> tuple[ParamStyle, AsyncExecute] | None:
    """The executor for an asyncio connection; ``None`` for an asyncpg pool."""
    family = _family(conn)
    if family == "asyncpg":
        import asyncpg

        if isinstance(conn, asyncpg.Pool):
            return None
        return "dollar", _asyncpg_execute(conn)
    if family == "psycopg":
        import psycopg
        from psycopg.rows import tuple_row

        if isinstance(conn, psycopg.AsyncCursor):
            conn = conn.connection
        if isinstance(conn, psycopg.AsyncConnection):
            connection: psycopg.AsyncConnection[Any] = conn

            async def run_psycopg(statement: Statement) -> Sequence[Row]:
                async with connection.cursor(row_factory=tuple_row) as cur:
                    await cur.execute(statement.sql, statement.params)
                    rows: list[Any] = await cur.fetchall()
                    return rows

            return "format", run_psycopg
    if family == "sqlalchemy":
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

        if isinstance(conn, async_scoped_session):
            conn = conn()
        if isinstance(conn, AsyncConnection | AsyncSession):
            executor: AsyncConnection | AsyncSession = conn

            async def run_sqlalchemy(statement: Statement) -> Sequence[Row]:
                result = await executor.execute(
                    _sqlalchemy_text(statement.sql), _named(statement.params)
                )
                rows: Sequence[Row] = result.all()
                return rows

            return "named", run_sqlalchemy
    raise ConfigError(
        f"kongtask.aio cannot use a {type(conn).__module__}.{type(conn).__qualname__}: pass "
        "an asyncpg Connection or Pool, a psycopg AsyncConnection or AsyncCursor, or a "
        "SQLAlchemy AsyncConnection or AsyncSession (sync connections go to add_job_sync)"
    )


def _drive_sync(plan: Plan, execute: SyncExecute, schema: str) -> list[Job]:
    try:
        statement = next(plan)
        while True:
            statement = plan.send(execute(statement))
    except StopIteration as done:
        jobs: list[Job] = done.value
        return jobs
    except Exception as exc:
        if (error := missing_schema(exc, schema)) is not None:
            raise error from exc
        raise


async def _drive_async(plan: Plan, execute: AsyncExecute, schema: str) -> list[Job]:
    try:
        statement = next(plan)
        while True:
            statement = plan.send(await execute(statement))
    except StopIteration as done:
        jobs: list[Job] = done.value
        return jobs
    except Exception as exc:
        if (error := missing_schema(exc, schema)) is not None:
            raise error from exc
        raise


async def _run_async(
    conn: object, make_plan: Callable[[ParamStyle], Plan], schema: str
) -> list[Job]:
    driver = _async_driver(conn)
    if driver is not None:
        style, execute = driver
        return await _drive_async(make_plan(style), execute, schema)
    # An asyncpg pool: one pooled connection, one transaction of our own (so a retried
    # batch is still all-or-nothing), committed before returning.
    pool: Any = conn
    async with pool.acquire() as pooled, pooled.transaction():
        return await _drive_async(make_plan("dollar"), _asyncpg_execute(pooled), schema)


def _add_job_args(
    identifier: str | JobSpec,
    payload: JSONValue,
    queue_name: str | None,
    run_at: datetime | None,
    max_attempts: int | None,
    job_key: str | None,
    job_key_mode: object,
    priority: int | None,
    flags: Iterable[str] | None,
) -> tuple[object, ...]:
    if isinstance(identifier, JobSpec):
        given = (payload, queue_name, run_at, max_attempts, job_key, priority, flags)
        if any(value is not None for value in given):
            raise ConfigError(
                "add_job: give either a JobSpec or an identifier with options, not both"
            )
        spec = identifier
        return checked_add_job(
            spec.identifier,
            spec.payload,
            spec.queue_name,
            spec.run_at,
            spec.max_attempts,
            spec.job_key,
            job_key_mode,
            spec.priority,
            spec.flags,
        )
    return checked_add_job(
        identifier,
        payload,
        queue_name,
        run_at,
        max_attempts,
        job_key,
        job_key_mode,
        priority,
        flags,
    )


@contextmanager
def _traced_add_job(
    identifier: str | JobSpec,
    payload: JSONValue,
    queue_name: str | None,
    tracing: bool,
    propagate_trace_context: bool,
) -> Iterator[tuple[str | JobSpec, JSONValue, Any]]:
    """The producer span of one ``add_job`` when asked for: yields the identifier and
    payload to add (the payload carrying the trace context when propagating) and the
    span (``None`` without one)."""
    if not (tracing or propagate_trace_context):
        yield identifier, payload, None
        return
    spec = identifier if isinstance(identifier, JobSpec) else None
    task, queue = (identifier, queue_name) if spec is None else (spec.identifier, spec.queue_name)
    given = payload if spec is None else spec.payload
    fields: dict[str, Any] = {} if given is None else {"payload": given}
    with traced_add(
        tracing, propagate_trace_context, "add_job", str(task), queue, [fields]
    ) as span:
        if spec is None:
            yield identifier, fields.get("payload"), span
        else:
            yield dataclasses.replace(spec, payload=fields.get("payload")), payload, span


# --- the public functions ---------------------------------------------------------------


@overload
def add_job_sync(
    conn: object,
    identifier: JobSpec,
    /,
    *,
    schema: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> Job: ...


@overload
def add_job_sync(
    conn: object,
    identifier: str,
    payload: JSONValue = None,
    *,
    schema: str | None = None,
    queue_name: str | None = None,
    run_at: datetime | None = None,
    max_attempts: int | None = None,
    job_key: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    priority: int | None = None,
    flags: Iterable[str] | None = None,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> Job: ...


def add_job_sync(
    conn: object,
    identifier: str | JobSpec,
    payload: JSONValue = None,
    *,
    schema: str | None = None,
    queue_name: str | None = None,
    run_at: datetime | None = None,
    max_attempts: int | None = None,
    job_key: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    priority: int | None = None,
    flags: Iterable[str] | None = None,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> Job:
    """Add one job on ``conn``, a sync connection, in its current transaction.

    ``conn`` is a psycopg 3 ``Connection`` or ``Cursor``, a SQLAlchemy 2 ``Connection`` or
    ``Session``, a Django connection (``django.db.connection``) or any DB-API 2.0
    connection (psycopg2, ...). The job exists once the caller commits, and workers are
    woken then. Nothing is committed or rolled back here.

    ``identifier`` is a task name followed by the options of
    :meth:`kongtask.Client.add_job`, or a :class:`kongtask.JobSpec` (what
    :meth:`kongtask.TaskDef.spec` makes) alone. ``schema``: default
    ``$GRAPHILE_WORKER_SCHEMA``, then ``graphile_worker``. ``tracing`` and
    ``propagate_trace_context``: as :func:`kongtask.open_client`'s (an OpenTelemetry
    producer span; the trace context stored in object payloads), for this call.

    Raises:
      ConfigError: an argument is invalid or ``conn`` is not a supported connection
        (nothing was sent; the transaction is as it was).
      KongtaskError: the schema is not installed, or graphile-worker #580 kept dropping
        the job. The driver's exception is the cause; as after any failed statement,
        PostgreSQL has aborted the caller's transaction (see ``docs/producers.md``).
    """
    with _traced_add_job(identifier, payload, queue_name, tracing, propagate_trace_context) as (
        identifier,
        payload,
        span,
    ):
        args = _add_job_args(
            identifier,
            payload,
            queue_name,
            run_at,
            max_attempts,
            job_key,
            job_key_mode,
            priority,
            flags,
        )
        schema_name = resolve_schema(schema)
        style, execute = _sync_driver(conn)
        job = _drive_sync(add_job_plan(schema_name, style, args), execute, schema_name)[0]
        if span is not None:
            span.set_attribute("messaging.message.id", str(job.id))
    return job


def add_jobs_sync(
    conn: object,
    specs: Iterable[JobSpec],
    *,
    schema: str | None = None,
    job_key_preserve_run_at: bool = False,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> list[Job]:
    """Add a batch of jobs in one statement on ``conn`` (see :func:`~kongtask.add_job_sync`).

    As :meth:`kongtask.Client.add_jobs`: all-or-nothing; the jobs come back in the order
    of ``specs`` on a schema kongtask installed (in graphile-worker's function's order on
    one it installed); an empty batch sends nothing.
    """
    checked = checked_specs(specs, job_key_preserve_run_at)
    schema_name = resolve_schema(schema)
    style, execute = _sync_driver(conn)
    with traced_add(tracing, propagate_trace_context, "add_jobs", None, None, checked):
        return _drive_sync(
            add_jobs_plan(schema_name, style, checked, job_key_preserve_run_at),
            execute,
            schema_name,
        )


@overload
async def add_job(
    conn: object,
    identifier: JobSpec,
    /,
    *,
    schema: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> Job: ...


@overload
async def add_job(
    conn: object,
    identifier: str,
    payload: JSONValue = None,
    *,
    schema: str | None = None,
    queue_name: str | None = None,
    run_at: datetime | None = None,
    max_attempts: int | None = None,
    job_key: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    priority: int | None = None,
    flags: Iterable[str] | None = None,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> Job: ...


async def add_job(
    conn: object,
    identifier: str | JobSpec,
    payload: JSONValue = None,
    *,
    schema: str | None = None,
    queue_name: str | None = None,
    run_at: datetime | None = None,
    max_attempts: int | None = None,
    job_key: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    priority: int | None = None,
    flags: Iterable[str] | None = None,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> Job:
    """Add one job on ``conn``, an asyncio connection, in its current transaction.

    ``conn`` is an asyncpg ``Connection`` (also the one ``JobContext.with_connection``
    and ``Client.with_connection`` lend) or ``Pool``, a psycopg 3 ``AsyncConnection`` or
    ``AsyncCursor``, or a SQLAlchemy 2 ``AsyncConnection`` or ``AsyncSession``. With a
    pool the job is added and committed on one of its connections; otherwise nothing is
    committed or rolled back here. Arguments, errors: as :func:`~kongtask.add_job_sync`.
    """
    with _traced_add_job(identifier, payload, queue_name, tracing, propagate_trace_context) as (
        identifier,
        payload,
        span,
    ):
        args = _add_job_args(
            identifier,
            payload,
            queue_name,
            run_at,
            max_attempts,
            job_key,
            job_key_mode,
            priority,
            flags,
        )
        schema_name = resolve_schema(schema)
        jobs = await _run_async(
            conn, functools.partial(add_job_plan, schema_name, args=args), schema_name
        )
        if span is not None:
            span.set_attribute("messaging.message.id", str(jobs[0].id))
    return jobs[0]


async def add_jobs(
    conn: object,
    specs: Iterable[JobSpec],
    *,
    schema: str | None = None,
    job_key_preserve_run_at: bool = False,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> list[Job]:
    """Add a batch of jobs in one statement on an asyncio ``conn`` (see :func:`add_job`
    and :func:`~kongtask.add_jobs_sync`)."""
    checked = checked_specs(specs, job_key_preserve_run_at)
    schema_name = resolve_schema(schema)
    with traced_add(tracing, propagate_trace_context, "add_jobs", None, None, checked):
        return await _run_async(
            conn,
            functools.partial(
                add_jobs_plan,
                schema_name,
                specs=checked,
                preserve_run_at=job_key_preserve_run_at,
            ),
            schema_name,
        )
