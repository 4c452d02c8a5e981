"""Adding jobs and administering them without running a worker.

Every public method checks its arguments completely before anything is sent, so a bad
value never leaves half a batch behind, then does its database work as one asyncio
unit of work (one crossing through :meth:`Database.run`).
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any, Concatenate, Final, Literal, ParamSpec, TypeVar

import asyncpg

from ._client_sql import ClientQueries
from ._config import resolve_dsn, resolve_schema
from ._enqueue import (
    ADD_ATTEMPTS as ADD_ATTEMPTS,
    add_job_gave_up,
    add_jobs_gave_up,
    checked_add_job,
    checked_specs,
    dropped_by_580,
    dumps_specs,
    encode_specs,
)
from ._errors import ConfigError, schema_not_installed
from ._inspect import (
    JobInfo,
    PoolInfo,
    QueueCounts,
    job_infos_from_rows,
    list_jobs_statement,
    pools_from_rows,
    queue_counts_from_rows,
)
from ._inspect_sql import InspectQueries, JobState
from ._job import Job, JobSpec, JSONValue
from ._migrate import migrate as migrate_db
from ._pg import Database, open_database
from ._tracing import ProducerTracer
from ._validate import (
    JobKeyMode,
    check_aware,
    check_ids,
    check_max_attempts,
    check_smallint,
    check_text,
)

T = TypeVar("T")
P = ParamSpec("P")

CleanupTask = Literal["DELETE_PERMAFAILED_JOBS", "GC_TASK_IDENTIFIERS", "GC_JOB_QUEUES"]

#: Cleanup tasks in the order they run, whatever order they were asked for in.
CLEANUP_TASKS: Final = ("DELETE_PERMAFAILED_JOBS", "GC_TASK_IDENTIFIERS", "GC_JOB_QUEUES")

# What PostgreSQL answers when the schema, one of its tables or one of its functions
# (an older graphile-worker schema) is missing.
_MISSING_SCHEMA: Final = (
    asyncpg.InvalidSchemaNameError,
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedFunctionError,
)

# Names never change for an id and identity values are never reused, so the id -> name
# maps can be cached for the life of the client; the bound only caps memory for
# databases with very many queue names.
_NAME_CACHE_LIMIT: Final = 10_000


class Client:
    """Adds jobs and runs admin operations on one schema. Made by :func:`open_client`.

    All methods are safe to call concurrently from several trio tasks; each one uses a
    pooled connection for its own statements.
    """

    def __init__(self, db: Database, schema: str) -> None:
        self._db = db
        self._schema = schema
        self._queries: ClientQueries = ClientQueries(schema)
        self._inspect: InspectQueries = InspectQueries(schema)
        self._tracing: ProducerTracer | None = None
        self._task_names: dict[int, str] = {}
        self._queue_names: dict[int, str] = {}

    @property
    def schema(self) -> str:
        """The schema this client works in."""
        return self._schema

    async def add_job(
        self,
        identifier: str,
        payload: JSONValue = None,
        *,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        job_key_mode: JobKeyMode | None = None,
        priority: int | None = None,
        flags: Iterable[str] | None = None,
    ) -> Job:
        """Add one job through ``<schema>.add_job`` and return the stored row.

        Args:
          identifier: the task name (at most 128 characters).
          payload: any JSON-serialisable value; ``None`` stores ``{}``. NaN and infinities
            are rejected because JSON cannot hold them.
          queue_name: a named queue; its jobs run one at a time.
          run_at: when the job may run first. Must be timezone-aware: a naive datetime
            is ambiguous (the server's and the client's time zones may differ), so it is
            rejected instead of guessed. ``None`` means now.
          max_attempts: 1 to 32767 (default 25).
          job_key: 1 to 512 characters; an existing job with the same key is replaced,
            updated or kept depending on ``job_key_mode`` (see ``docs/client.md``).
          job_key_mode: ``"replace"`` (default), ``"preserve_run_at"`` or ``"unsafe_dedupe"``.
          priority: -32768 to 32767 (default 0); lower runs first.
          flags: flag names (not a single string).

        Returns:
          The inserted or updated job. With ``unsafe_dedupe`` this can be an existing
          job of another task, returned as it is.

        Raises:
          ConfigError: an argument is invalid (nothing was sent).
          KongtaskError: the database kept dropping the job (graphile-worker #580).
        """
        # the producer span (when tracing) may add its trace context to the payload
        fields: dict[str, Any] = {} if payload is None else {"payload": payload}
        with self._traced("add_job", identifier, queue_name, [fields]) as span:
            args = checked_add_job(
                identifier,
                fields.get("payload"),
                queue_name,
                run_at,
                max_attempts,
                job_key,
                job_key_mode,
                priority,
                flags,
            )
            with _needs_schema(self._schema):
                rows, names = await self._db.with_own_connection(
                    _add_job_unit, self._queries, args, self._task_names, self._queue_names
                )
            if span is not None:
                span.set_attribute("messaging.message.id", str(rows[0]["id"]))
        self._remember(names)
        return self._job(rows[0])

    async def add_jobs(
        self, specs: Iterable[JobSpec], *, job_key_preserve_run_at: bool = False
    ) -> list[Job]:
        """Add many jobs in one statement through ``<schema>.add_jobs``.

        The batch is atomic: every job is added, or none (a failing constraint rolls
        back the whole statement). An empty batch returns ``[]`` without a round trip,
        so listeners get no spurious wake-up.

        Args:
          specs: the jobs. Two specs must not share a ``job_key`` (PostgreSQL would
            reject the batch with "cannot affect row a second time"; this is checked
            here first, with a clearer message).
          job_key_preserve_run_at: keep the ``run_at`` of a replaced job that has not
            been attempted yet (the ``preserve_run_at`` mode of :meth:`add_job`).
            ``unsafe_dedupe`` is not available in bulk.

        Returns:
          The inserted or updated jobs, in the order of ``specs`` on a schema installed
          by kongtask (graphile-worker's function body inserts and returns a batch in
          its query plan's order, e.g. backwards for one queue; docs/migrations.md).

        Raises:
          ConfigError: a spec is invalid or keys repeat (nothing was sent).
          KongtaskError: the database kept dropping keyed jobs (graphile-worker #580).
        """
        checked = checked_specs(specs, job_key_preserve_run_at)
        if not checked:
            return []
        with self._traced("add_jobs", None, None, checked):
            encoded = encode_specs(checked)
            with _needs_schema(self._schema):
                rows, names = await self._db.with_own_connection(
                    _add_jobs_unit,
                    self._queries,
                    checked,
                    encoded,
                    job_key_preserve_run_at,
                    self._task_names,
                    self._queue_names,
                )
        self._remember(names)
        return [self._job(row) for row in rows]

    async def with_connection(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run the **asyncio** coroutine function ``fn(conn, *args)`` on a pooled connection.

        The way for trio code to add jobs in the same transaction as its own writes:
        ``fn`` opens the transaction, writes, and adds the jobs with
        :func:`kongtask.aio.add_job` on ``conn`` (pass ``schema=client.schema`` for a
        schema other than the default). As :meth:`kongtask.JobContext.with_connection`,
        the connection is acquired, used and released on the asyncio side, and gets a
        full reset afterwards.

        Example::

            async def place_order(conn, number):
                async with conn.transaction():
                    await conn.execute("insert into orders values ($1)", number)
                    await kongtask.aio.add_job(conn, "confirm_order", {"order": number})

            await client.with_connection(place_order, 7)
        """
        return await self._db.with_connection(fn, *args, **kwargs)

    async def complete_jobs(self, ids: Iterable[int]) -> list[Job]:
        """Delete the given jobs as if they had succeeded (``<schema>.complete_jobs``).

        Permanently failed jobs are deleted too. Jobs locked by a worker less than 4 hours
        ago are left alone, except those a kongtask pool holds (claimed, perhaps not
        started): they are deleted as well and the pool does not start them; one that
        had started finishes, and its outcome is dropped (docs/reliability.md).

        Args:
          ids: the job ids; an empty collection returns ``[]`` without a round trip.

        Returns:
          The deleted jobs.

        Raises:
          ConfigError: an id is not an integer in the bigint range.
        """
        job_ids = check_ids(ids)
        if not job_ids:
            return []
        return await self._admin(
            self._queries.complete_jobs, job_ids, held=self._queries.complete_held
        )

    async def permanently_fail_jobs(
        self, ids: Iterable[int], message: str | None = None
    ) -> list[Job]:
        """Mark jobs as permanently failed (``attempts := max_attempts``).

        Locked jobs are skipped, except those a kongtask pool holds (claimed, perhaps
        not started): the pool does not start them, and one that had started is not
        retried (docs/reliability.md).

        Args:
          ids: the job ids.
          message: stored as ``last_error``; ``None`` stores "Manually marked as failed".

        Returns:
          The updated jobs.
        """
        job_ids = check_ids(ids)
        if message is not None:
            check_text(message, "message")
        if not job_ids:
            return []
        return await self._admin(
            self._queries.permanently_fail_jobs,
            job_ids,
            message,
            held=self._queries.permanently_fail_held,
        )

    async def reschedule_jobs(
        self,
        ids: Iterable[int],
        *,
        run_at: datetime | None = None,
        priority: int | None = None,
        attempts: int | None = None,
        max_attempts: int | None = None,
    ) -> list[Job]:
        """Change when and how jobs run (``<schema>.reschedule_jobs``).

        ``None`` keeps a column as it is; any number, ``0`` included, replaces it
        (graphile-worker's JavaScript helper cannot set 0).
        Setting ``attempts`` below ``max_attempts`` revives a permanently failed job.
        Locked jobs are skipped, except those a kongtask pool holds (claimed, perhaps
        not started): the pool does not start them, and without ``attempts`` they get
        back the attempt their claim counted (docs/reliability.md).

        Args:
          ids: the job ids.
          run_at: the new earliest run time (timezone-aware).
          priority: -32768 to 32767.
          attempts: -32768 to 32767.
          max_attempts: 1 to 32767.

        Returns:
          The updated jobs.

        Raises:
          ConfigError: an argument is out of range or of the wrong type (nothing was sent).
        """
        job_ids = check_ids(ids)
        if run_at is not None:
            check_aware(run_at, "run_at")
        check_smallint(priority, "priority")
        check_smallint(attempts, "attempts")
        check_max_attempts(max_attempts, "max_attempts")
        if not job_ids:
            return []
        return await self._admin(
            self._queries.reschedule_jobs,
            job_ids,
            run_at,
            priority,
            attempts,
            max_attempts,
            held=self._queries.reschedule_held,
        )

    async def remove_job(self, key: str) -> Job | None:
        """Remove the job with ``key`` (``<schema>.remove_job``).

        An unlocked job is deleted. A locked (running) job keeps running once more but
        loses its key and is never retried; a kongtask pool that holds it unstarted
        does not start it.

        Args:
          key: the job key.

        Returns:
          The deleted or retired job, or ``None`` when no job has this key.
        """
        check_text(key, "key")
        jobs = await self._admin(self._queries.remove_job, key)
        return jobs[0] if jobs else None

    async def force_unlock_workers(self, pool_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Release every job and queue locked by the given worker pools.

        Use it for pools known to be dead (their jobs would otherwise wait 4 hours for
        the stale-lock sweep). The ids are pool ids (``pool-…``/``otpool-…``), which is
        what ``locked_by`` holds since graphile-worker 0.17. The interrupted attempt
        still counts.

        Args:
          pool_ids: the pool ids; an empty collection does nothing.

        Returns:
          ``pool id -> (jobs, queues)``: how many rows each id held and released, in
          the order given (an id that held nothing maps to ``(0, 0)``).
        """
        if isinstance(pool_ids, str):
            raise ConfigError("pool_ids must be a collection of pool ids, not a single string")
        ids = list(dict.fromkeys(pool_ids))
        for pool_id in ids:
            check_text(pool_id, "pool id")
        if not ids:
            return {}
        with _needs_schema(self._schema):
            rows = await self._db.fetch(self._queries.force_unlock_workers, ids)
        return {r["pool_id"]: (int(r["jobs"]), int(r["queues"])) for r in rows}

    async def cleanup(
        self,
        tasks: Iterable[CleanupTask] = ("GC_JOB_QUEUES",),
        *,
        keep_task_identifiers: Iterable[str] = (),
    ) -> dict[CleanupTask, int]:
        """Delete rows nothing needs any more.

        The selected tasks run in this order, whatever order they are given in:

        - ``DELETE_PERMAFAILED_JOBS``: unlocked jobs with ``attempts >= max_attempts``;
        - ``GC_TASK_IDENTIFIERS``: task names no job uses, except ``keep_task_identifiers``.
          Workers cache task ids, so run it only while no worker runs (or keep their
          task names);
        - ``GC_JOB_QUEUES``: unlocked queue names no job uses.

        Args:
          tasks: the cleanup tasks to run.
          keep_task_identifiers: task names ``GC_TASK_IDENTIFIERS`` must not delete.

        Returns:
          How many rows each selected task deleted, in the order they ran.

        Raises:
          ConfigError: an unknown task name (the message lists the allowed ones).
        """
        if isinstance(tasks, str):
            raise ConfigError("tasks must be a collection of task names, not a single string")
        wanted = list(tasks)
        unknown = [t for t in wanted if t not in CLEANUP_TASKS]
        if unknown:
            raise ConfigError(
                f"unknown cleanup task {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(CLEANUP_TASKS)}"
            )
        if isinstance(keep_task_identifiers, str):
            raise ConfigError("keep_task_identifiers must be a collection, not a single string")
        keep = list(keep_task_identifiers)
        for name in keep:
            check_text(name, "kept task identifier")
        selected = [t for t in CLEANUP_TASKS if t in wanted]
        with _needs_schema(self._schema):
            return await self._db.with_own_connection(_cleanup_unit, self._queries, selected, keep)

    async def queue_counts(self) -> list[QueueCounts]:
        """Count the jobs of every (task, queue) pair by derived state.

        One statement, one scan of the jobs table (about a tenth of a second per million
        jobs; docs/operations.md). Pairs without jobs are left out.

        Returns:
          One :class:`QueueCounts` per (task, queue) pair, by task then queue.
        """
        with _needs_schema(self._schema):
            rows = await self._db.fetch(self._inspect.counts)
        return queue_counts_from_rows(rows)

    async def oldest_ready_age(self) -> float | None:
        """Seconds since the oldest ready job became due (the server's clock), or ``None``.

        A growing value means the workers do not keep up. The statement reads only
        the claimable rows, through the index the workers use.
        """
        with _needs_schema(self._schema):
            age: float | None = await self._db.fetchval(self._inspect.oldest_ready)
        return age

    async def list_jobs(
        self,
        *,
        ids: Iterable[int] | None = None,
        tasks: str | Iterable[str] | None = None,
        queues: str | Iterable[str] | None = None,
        states: str | Iterable[JobState] | None = None,
        key: str | None = None,
        min_id: int | None = None,
        max_id: int | None = None,
        after_id: int | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> list[JobInfo]:
        """List jobs with their derived state, one page at a time, ordered by id.

        Filters left as ``None`` do not filter. Pass the last id of a page as
        ``after_id`` to get the next one (keyset pagination: rows added or removed
        meanwhile never make a page skip or repeat a row).

        Args:
          ids: job ids.
          tasks: task identifier(s).
          queues: queue name(s).
          states: derived state(s): ``ready``, ``waiting_on_queue``, ``scheduled``,
            ``retrying``, ``running``, ``permanently_failed``.
          key: the job key.
          min_id: the smallest id to list.
          max_id: the largest id to list.
          after_id: list only ids after this one (below it when ``descending``).
          limit: the page size, 1 to 10,000.
          descending: newest first.

        Raises:
          ConfigError: an unknown state or an invalid argument (nothing was sent).
        """
        query, args = list_jobs_statement(
            self._inspect,
            ids=ids,
            tasks=tasks,
            queues=queues,
            states=states,
            key=key,
            min_id=min_id,
            max_id=max_id,
            after_id=after_id,
            limit=limit,
            descending=descending,
        )
        with _needs_schema(self._schema):
            rows = await self._db.fetch(query, *args)
        return job_infos_from_rows(rows)

    async def list_pools(self) -> list[PoolInfo]:
        """The worker pools that hold a liveness lock or lock a job or queue.

        kongtask pools are known from their liveness locks (so also while idle) and can
        be told dead from alive; other pools (Node graphile-worker, or kongtask with
        ``prepared_statements=False``) only from the rows they lock, with unknown
        liveness.
        """
        with _needs_schema(self._schema):
            rows = await self._db.fetch(self._inspect.pools)
        return pools_from_rows(rows)

    async def _admin(self, query: str, *args: object, held: str | None = None) -> list[Job]:
        with _needs_schema(self._schema):
            if held is None:
                rows = await self._db.fetch(query, *args)
            else:
                rows = await self._db.with_own_connection(_admin_unit, query, held, args)
        return [
            Job.from_claim(row, row["task_identifier"])
            for row in rows
            if row["id"] is not None  # remove_job's "no such key" is a row of NULLs
        ]

    @contextmanager
    def _traced(
        self, operation: str, task: str | None, queue: str | None, specs: list[dict[str, Any]]
    ) -> Iterator[Any]:
        """A producer span around an add when tracing is on (``None`` otherwise); injects
        the trace context into the specs' payloads when propagation is on."""
        tracer = self._tracing
        if tracer is None:
            yield None
            return
        with tracer.span(operation, task, queue, len(specs)) as span:
            for fields in specs:
                tracer.inject(fields)
            yield span

    def _remember(self, names: Sequence[asyncpg.Record]) -> None:
        if len(self._task_names) + len(self._queue_names) + len(names) > _NAME_CACHE_LIMIT:
            self._task_names.clear()
            self._queue_names.clear()
        for is_queue, id_, name in names:
            (self._queue_names if is_queue else self._task_names)[id_] = name

    def _job(self, row: asyncpg.Record) -> Job:
        queue_id = row["job_queue_id"]
        return Job.from_claim(
            {
                **row,
                "queue_name": None if queue_id is None else self._queue_names.get(queue_id),
            },
            # Only a concurrent GC_TASK_IDENTIFIERS (documented as unsafe while jobs
            # are added) can make the lookup miss; show the id rather than fail an add
            # that has already committed.
            self._task_names.get(row["task_id"], f"<task id {row['task_id']}>"),
        )


@contextmanager
def _needs_schema(schema: str) -> Iterator[None]:
    """Say "run kongtask migrate" instead of PostgreSQL's "schema … does not exist"."""
    try:
        yield
    except _MISSING_SCHEMA as exc:
        raise schema_not_installed(schema, maybe_old=True) from exc


@asynccontextmanager
async def open_client(
    dsn: str | None = None,
    *,
    schema: str | None = None,
    max_connections: int = 4,
    prepared_statements: bool = True,
    tracing: bool = False,
    propagate_trace_context: bool = False,
) -> AsyncIterator[Client]:
    """Connect to the database and yield a :class:`Client`; disconnect on exit.

    Args:
      dsn: a libpq connection string or URL; default ``$DATABASE_URL``, then libpq's
        ``PG*`` variables.
      schema: default ``$GRAPHILE_WORKER_SCHEMA``, then ``graphile_worker``.
      max_connections: the size of the connection pool.
      prepared_statements: ``False`` behind a transaction-pooling pgBouncer.
      tracing: an OpenTelemetry producer span per ``add_job``/``add_jobs`` (needs the
        ``kongtask[tracing]`` extra; docs/operations.md).
      propagate_trace_context: also store the trace context in each object payload under
        the reserved key ``_kongtask_trace``, so traced pools continue the trace
        (implies ``tracing``).

    Example::

        async with kongtask.open_client(dsn) as client:
            job = await client.add_job("send_email", {"to": "a@example.com"})
    """
    schema_name = resolve_schema(schema)
    if max_connections < 1:
        raise ConfigError("max_connections must be at least 1")
    tracer = None
    if tracing or propagate_trace_context:
        tracer = ProducerTracer(propagate_context=bool(propagate_trace_context))
    async with open_database(
        resolve_dsn(dsn),
        min_size=1,
        max_size=max_connections,
        prepared_statements=prepared_statements,
        keep_spare=True,
    ) as db:
        client = Client(db, schema_name)
        client._tracing = tracer
        yield client


async def migrate(dsn: str | None = None, *, schema: str | None = None) -> None:
    """Install or upgrade graphile-worker's schema (migrations 1..20): ``kongtask migrate``.

    Safe to run from many processes at once, Node graphile-worker's included; running it
    again changes nothing. :func:`open_worker` does it by itself unless told not to.

    Args:
      dsn: a libpq connection string or URL; default ``$DATABASE_URL``, then libpq's
        ``PG*`` variables.
      schema: default ``$GRAPHILE_WORKER_SCHEMA``, then ``graphile_worker``.

    Raises:
      ConfigError: the schema name is unusable.
      SchemaTooNewError: the database holds a breaking migration newer than kongtask
        knows (a newer graphile-worker ran); nothing is changed.
      MigrationError: PostgreSQL is older than 12, or a migration failed (rolled back).
    """
    schema_name = resolve_schema(schema)
    async with open_database(resolve_dsn(dsn), max_size=1) as db:
        await migrate_db(db, schema_name)


async def add_job(
    identifier: str,
    payload: JSONValue = None,
    *,
    dsn: str | None = None,
    schema: str | None = None,
    queue_name: str | None = None,
    run_at: datetime | None = None,
    max_attempts: int | None = None,
    job_key: str | None = None,
    job_key_mode: JobKeyMode | None = None,
    priority: int | None = None,
    flags: Iterable[str] | None = None,
) -> Job:
    """Connect, add one job, disconnect: :meth:`Client.add_job` for scripts.

    Opening a connection costs far more than adding a job; keep a client open with
    :func:`open_client` when adding more than a few.
    """
    # Check before connecting, so a bad argument fails fast and offline.
    checked_add_job(
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
    async with open_client(dsn, schema=schema, max_connections=1) as client:
        return await client.add_job(
            identifier,
            payload,
            queue_name=queue_name,
            run_at=run_at,
            max_attempts=max_attempts,
            job_key=job_key,
            job_key_mode=job_key_mode,
            priority=priority,
            flags=flags,
        )


# --- units of work (asyncio side: each runs on one pooled connection) -------------------


async def _resolve_names(
    conn: asyncpg.Connection,
    queries: ClientQueries,
    rows: Sequence[asyncpg.Record],
    task_names: Mapping[int, str],
    queue_names: Mapping[int, str],
) -> list[asyncpg.Record]:
    """Fetch the names of task and queue ids the caches do not know yet.

    The join trick of the admin queries does not work here: add_job may create the
    task or queue row itself, and a statement's snapshot predates its own function's
    inserts. A second statement sees them.
    """
    task_ids = {row["task_id"] for row in rows} - task_names.keys()
    queue_ids = {row["job_queue_id"] for row in rows} - queue_names.keys() - {None}
    if not task_ids and not queue_ids:
        return []
    return await conn.fetch(queries.names_by_id, list(task_ids), list(queue_ids))


async def _add_job_unit(
    conn: asyncpg.Connection,
    queries: ClientQueries,
    args: tuple[object, ...],
    task_names: Mapping[int, str],
    queue_names: Mapping[int, str],
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    for _ in range(ADD_ATTEMPTS):
        row = await conn.fetchrow(queries.add_job, *args)
        if row is not None and row["id"] is not None:
            rows = [row]
            return rows, await _resolve_names(conn, queries, rows, task_names, queue_names)
    raise add_job_gave_up(args)


async def _add_jobs_unit(
    conn: asyncpg.Connection,
    queries: ClientQueries,
    specs: list[dict[str, Any]],
    encoded: str,
    preserve_run_at: bool,
    task_names: Mapping[int, str],
    queue_names: Mapping[int, str],
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    rows: list[asyncpg.Record] = []
    pending = specs
    for _ in range(ADD_ATTEMPTS):
        got = await conn.fetch(queries.add_jobs, encoded, preserve_run_at)
        rows.extend(got)
        if len(got) == len(pending):
            return rows, await _resolve_names(conn, queries, rows, task_names, queue_names)
        pending = dropped_by_580(pending, [row["key"] for row in got])
        encoded = dumps_specs(pending)
    raise add_jobs_gave_up(pending)


async def _admin_unit(
    conn: asyncpg.Connection, query: str, held: str, args: tuple[object, ...]
) -> list[asyncpg.Record]:
    """An admin function, then its counterpart for held jobs, in one transaction."""
    async with conn.transaction():
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        rows += await conn.fetch(held, *args)
    return rows


async def _cleanup_unit(
    conn: asyncpg.Connection,
    queries: ClientQueries,
    selected: list[CleanupTask],
    keep: list[str],
) -> dict[CleanupTask, int]:
    deleted: dict[CleanupTask, int] = {}
    for task in selected:
        if task == "DELETE_PERMAFAILED_JOBS":
            status = await conn.execute(queries.delete_permafailed_jobs)
        elif task == "GC_TASK_IDENTIFIERS":
            status = await conn.execute(queries.gc_task_identifiers, keep)
        else:
            status = await conn.execute(queries.gc_job_queues)
        deleted[task] = int(status.rsplit(" ", 1)[-1])  # "DELETE <n>"
    return deleted
