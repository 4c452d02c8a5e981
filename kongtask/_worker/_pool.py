"""The pool: :func:`open_worker`, the :class:`Worker` facade, and the shutdown order.

This module builds the parts (``docs/design/worker.md``), starts them in its nursery and is
the only code that knows in which order they stop. Everything else asks it to stop
through the :class:`~._lifecycle.Lifecycle`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Final

import trio

from .._client import Client
from .._config import resolve_dsn, resolve_schema
from .._errors import ConfigError
from .._events import EventCallback, EventEmitter
from .._health import IoCounters, serve_http
from .._liveness import new_pool_id
from .._log_fallback import log_to_stderr_unless_configured
from .._logging import install_pool_filters
from .._migrate import check_schema, latest_known_migration, migrate as migrate_schema
from .._observe import combine
from .._outage import OutageLog
from .._pg import Database, open_database
from .._signals import StopOnSignals, receive_stop_signals
from .._sql import WorkerQueries
from .._tasks import TaskDef
from ._claim_sizing import ClaimSizer
from ._completer import Completer
from ._context import PoolServices
from ._fetcher import Fetcher, FetchWakeup, TaskRegistry
from ._handlers import Handler, Runner, TaskSpec, open_processes, runners_of
from ._housekeeping import Housekeeping
from ._lifecycle import FLUSHING, RETURNING, RUNNING, STOPPED, Lifecycle
from ._local_queue import HeldRecheck, LocalQueue
from ._notifier import Notifier
from ._runner import JobRunner
from ._statistics import StatisticsKeeper
from ._timing import DEFAULT_TIMING, WorkerTiming

log = logging.getLogger("kongtask.worker")

DEFAULT_GRACE: Final = 5.0
DEFAULT_BATCH_SIZE: Final = 1000
#: A pool holds claimed jobs for at most about a second (docs/reliability.md): the
#: prefetch keeps a tenth of a second of work at the measured rate, and when the handlers
#: slow down, jobs still waiting after this are handed back for other pools (and for
#: operators' functions, which skip locked jobs). graphile-worker's is 5 minutes.
DEFAULT_LOCAL_QUEUE_TTL: Final = 1.0


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of a worker pool (:meth:`Worker.statistics`).

    Attributes:
      running: jobs whose handler is running now.
      queued_locally: claimed jobs waiting for a free worker.
      completed: jobs that succeeded since the pool started.
      failed: jobs that failed (each failed attempt counts).
      returned: claimed jobs handed back unstarted (TTL, shutdown, or changed since
        their claim).
      pending_writes: outcomes not yet written to the database.
      state: the pool's phase: ``"starting"``, ``"running"``, ``"returning"`` (claiming
        stopped, held jobs going back), ``"grace"`` (waiting for running jobs),
        ``"flushing"`` (writing the last outcomes) or ``"stopped"``.
      fetcher: what the fetcher does: ``"claiming"``, ``"waiting for capacity"`` (every
        worker busy) or ``"waiting for jobs"`` (its last claim found every ready job).
      listening: whether the LISTEN connection (which holds the pool's liveness lock) is up.
      lost_claim_checks: looks still scheduled for the jobs of a claim whose reply was
        lost (the pool returns any it finds).
    """

    running: int
    queued_locally: int
    completed: int
    failed: int
    returned: int
    pending_writes: int
    state: str = RUNNING
    fetcher: str = "claiming"
    listening: bool = False
    lost_claim_checks: int = 0


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """What ``open_worker`` checked and the pool is built from."""

    concurrency: int
    poll_interval: float
    batch_size: int
    grace: float
    local_queue_ttl: float
    once: bool
    #: hold a liveness lock on the LISTEN connection (needs a real session)
    liveness_lock: bool
    #: give the claiming connection its session settings (needs a real session)
    claim_session_settings: bool
    check_schema: bool = True
    #: install or upgrade the schema at the start (instead of only checking it)
    migrate: bool = False
    timing: WorkerTiming = DEFAULT_TIMING


def _flags_reader(
    forbidden_flags: Iterable[str] | Callable[[], Iterable[str] | None] | None,
) -> Callable[[], list[str] | None]:
    """``forbidden_flags`` as a function the fetcher calls before each claim."""
    if callable(forbidden_flags):
        flags_fn = forbidden_flags

        def read() -> list[str] | None:
            flags = flags_fn()
            return list(flags) if flags else None

        return read
    if isinstance(forbidden_flags, str):
        raise ConfigError("forbidden_flags must be a list of flag names, not a string")
    static = None if forbidden_flags is None else (list(forbidden_flags) or None)
    return lambda: static


class Worker:
    """A running worker pool. Made by :func:`open_worker`; not constructed directly.

    Attributes:
      pool_id: the id written to ``locked_by`` (``pool-`` + 18 hex digits).
      schema: the graphile-worker schema in use.
      exit_code: ``None`` while running normally; ``57`` after a breaking migration
        notification stopped the pool; ``1`` when outcomes could not be written after
        repeated non-transient errors (the CLI exits with it).
      add_job, add_jobs: :meth:`kongtask.Client.add_job` and :meth:`~kongtask.Client.add_jobs`
        on the pool's database.
      metrics_port: the bound port of the HTTP endpoints (``None`` without them).
    """

    def __init__(
        self,
        db: Database,
        schema: str,
        runners: dict[str, Runner],
        options: PoolOptions,
        *,
        forbidden_flags: Iterable[str] | Callable[[], Iterable[str] | None] | None = None,
        on_event: EventCallback | None = None,
        crontab: Sequence[Any] | None = None,
    ) -> None:
        timing = options.timing
        self._db = db
        self._options = options
        self.schema = schema
        self.pool_id = new_pool_id(once=options.once, marked=options.liveness_lock)
        pool_id = self.pool_id
        queries = WorkerQueries(schema)
        self._client = Client(db, schema)
        # the client's own methods: same signatures, docs and validation
        self.add_job = self._client.add_job
        self.add_jobs = self._client.add_jobs
        self._concurrency = options.concurrency
        self._poll_interval = options.poll_interval
        self._crontab = crontab
        self._events = events = EventEmitter(on_event, pool_id)
        outage = OutageLog(log, pool_id)
        # per statement (never per job): for /readyz and the metrics
        self._io = io = IoCounters()
        # (host, port, /metrics renderer) of the HTTP endpoints, set by open_worker
        self._http: tuple[str, int, Any] | None = None
        self.metrics_port: int | None = None

        self._lifecycle = lifecycle = Lifecycle(pool_id, events, options.grace)
        self._tasks = tasks = TaskRegistry(db, queries, runners)
        sizer = ClaimSizer(
            options.concurrency,
            options.batch_size,
            lookahead=timing.prefetch_lookahead,
            min_prefetch=timing.min_prefetch,
        )
        self._wakeup = wakeup = FetchWakeup(sizer)
        self._queue = queue = LocalQueue(options.local_queue_ttl)
        self._completer = completer = Completer(
            db,
            queries,
            pool_id,
            lifecycle=lifecycle,
            events=events,
            outage=outage,
            io=io,
            timing=timing,
            wake_fetcher=wakeup.nudge,
            once=options.once,
        )
        recheck = HeldRecheck(db, queries, pool_id, queue, completer, lifecycle, timing)
        self._runner = runner = JobRunner(
            runners,
            services=PoolServices(pool_id, db, self.add_job, self.add_jobs),
            queue=queue,
            recheck=recheck,
            completer=completer,
            wakeup=wakeup,
            lifecycle=lifecycle,
            events=events,
            timing=timing,
            concurrency=options.concurrency,
        )
        self._notifier = notifier = Notifier(
            db,
            pool_id,
            liveness_lock=options.liveness_lock,
            wakeup=wakeup,
            lifecycle=lifecycle,
            events=events,
            outage=outage,
            io=io,
            timing=timing,
        )
        self._statistics = statistics = StatisticsKeeper(db, queries, pool_id)
        self._fetcher = Fetcher(
            db,
            queries,
            pool_id,
            tasks=tasks,
            queue=queue,
            completer=completer,
            wakeup=wakeup,
            lifecycle=lifecycle,
            running=lambda: len(runner.running),
            started=lambda: runner.started,
            running_ids=lambda: runner.running,
            # claim only while the liveness lock is held (when the pool has one)
            listening=(lambda: notifier.listening) if options.liveness_lock else lambda: None,
            events=events,
            outage=outage,
            io=io,
            timing=timing,
            poll_interval=options.poll_interval,
            batch_size=options.batch_size,
            forbidden_flags=_flags_reader(forbidden_flags),
            session_settings=options.claim_session_settings,
            once=options.once,
            on_backlog=statistics.backlog_seen,
        )
        self._housekeeping = Housekeeping(
            db,
            queries,
            pool_id,
            schema=schema,
            tasks=tasks,
            wakeup=wakeup,
            events=events,
            outage=outage,
            timing=timing,
        )

    # -- public ----------------------------------------------------------

    @property
    def exit_code(self) -> int | None:
        return self._lifecycle.exit_code

    def statistics(self) -> WorkerStatistics:
        """An immutable snapshot of the pool's counters."""
        completer = self._completer
        return WorkerStatistics(
            running=len(self._runner.running),
            queued_locally=len(self._queue),
            completed=completer.completed,
            failed=completer.failed,
            returned=completer.returned,
            pending_writes=len(completer.unwritten),
            state=self._lifecycle.state,
            fetcher=self._wakeup.state,
            listening=self._notifier.listening.is_set(),
            lost_claim_checks=len(self._fetcher.reconcile_due),
        )

    def shutdown_nowait(self, grace: float | None = None) -> None:
        """Start a shutdown and return at once (safe from handlers and callbacks).

        A second call with a shorter ``grace`` shortens the wait (``grace=0``: cancel
        running jobs now, the "forceful" shutdown).
        """
        self._lifecycle.request_stop(grace)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop the pool and wait until it has stopped.

        Claiming stops at once; unstarted claimed jobs are returned; running jobs get
        ``grace`` seconds (default: the pool's ``grace``), then are cancelled and failed
        with "Worker pool is shutting down gracefully" (so they retry); outcomes are
        flushed and connections closed. Do not await this from one of the pool's own
        handlers (it would wait for itself): use :meth:`shutdown_nowait` there.
        """
        self.shutdown_nowait(grace)
        await self._lifecycle.stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until the pool has stopped (shutdown, breaking migration, ``once`` done)."""
        await self._lifecycle.stopped.wait()

    @property
    def stopping(self) -> bool:
        """Whether a shutdown has been requested."""
        return self._lifecycle.stopping

    # -- the nursery and the shutdown order ----------------------------------

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        lifecycle = self._lifecycle
        runner = self._runner
        completer = self._completer
        started = False
        try:
            async with trio.open_nursery() as outer:
                await self._start(outer)
                started = True
                lifecycle.state = RUNNING
                self._events.emit("pool:create", concurrency=self._concurrency)
                if self._http is not None:
                    self.metrics_port = await outer.start(serve_http, self, *self._http)
                outer.start_soon(completer.run)
                async with trio.open_nursery() as workers:
                    runner.start(workers)
                    async with trio.open_nursery() as background:
                        # the fetcher takes the connection its warm-up (begun by the
                        # start) left, while LISTEN is being set up
                        background.start_soon(self._fetcher.run)
                        await background.start(self._notifier.run)
                        self._housekeeping.start(background)
                        background.start_soon(self._statistics.run)
                        self._start_cron(background)
                        task_status.started()
                        await lifecycle.stop_requested.wait()
                        background.cancel_scope.cancel()
                    # 1. nothing claims any more: hand back what was not started
                    lifecycle.state = RETURNING
                    await completer.hand_back(self._queue.take_all(), "shutdown")
                    self._queue.wake_all()
                    # 2. running jobs get the grace period, then are cancelled
                    with lifecycle.grace_scope():
                        await runner.done.wait()
                    if runner.running:
                        log.warning(
                            "pool %s: cancelling %d running job(s) after the grace period",
                            self.pool_id,
                            len(runner.running),
                        )
                        runner.cancel_running()
                        await runner.wait_for_threads()
                # 3. nobody can send any more: the completer writes what it has, then ends
                lifecycle.state = FLUSHING
                completer.close()
                with trio.move_on_after(self._options.timing.flush_timeout):
                    await completer.done.wait()
                outer.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # a start that failed (or a stop before the loops took them)
                await self._fetcher.close_preopened()
                await self._notifier.close_preopened()
                # 4. nothing is claimed before the start is done: nothing to release
                if started:
                    await self._final_release()
                self._events.emit("pool:release")
                self._events.emit("stop")
                lifecycle.state = STOPPED
                lifecycle.stopped.set()

    async def _start(self, nursery: trio.Nursery) -> None:
        # Opening a connection is the slowest step of a start: the fetcher's and the
        # LISTEN connections open while the pool's own connection migrates or checks the
        # schema and registers the tasks. The fetcher warms up its claim as soon as the
        # schema is known to be current, in ``nursery``: beside the task registration and
        # LISTEN, and past the end of the start if need be (the claim loop waits for it).
        schema_ready = trio.Event()
        nursery.start_soon(self._fetcher.preopen, schema_ready)
        async with trio.open_nursery() as opening:
            opening.start_soon(self._notifier.preopen, schema_ready)
            if self._options.migrate:
                await migrate_schema(self._db, self.schema)
                self._notifier.schema_revision = latest_known_migration()
            elif self._options.check_schema:
                status = await check_schema(self._db, self.schema)
                self._notifier.schema_revision = status.latest or 0
            schema_ready.set()
            await self._tasks.register()
        if self._options.once:
            await self._housekeeping.sweep_once()

    def _start_cron(self, nursery: trio.Nursery) -> None:
        if not self._crontab:
            return
        # imported here: the scheduler is a large module most pools (no crontab) never use
        from .._cron import run_cron_scheduler

        nursery.start_soon(run_cron_scheduler, self._db, self.schema, list(self._crontab))

    async def _final_release(self) -> None:
        """Return anything still ours: held jobs, then any row locked by this pool."""
        try:
            with trio.move_on_after(self._options.timing.statement_timeout):
                await self._completer.hand_back(self._queue.take_all(), "shutdown")
                await self._completer.final_release()
        except Exception as exc:
            log.error("pool %s: final release failed: %s", self.pool_id, exc)


@asynccontextmanager
async def open_worker(
    dsn: str | None,
    tasks: Mapping[str, Handler | TaskSpec] | Iterable[TaskDef[Any]],
    *,
    schema: str | None = None,
    concurrency: int = 1,
    poll_interval: float = 2.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    forbidden_flags: Iterable[str] | Callable[[], Iterable[str] | None] | None = None,
    on_event: EventCallback | None = None,
    crontab: Sequence[Any] | None = None,
    max_pool_size: int = 10,
    prepared_statements: bool = True,
    grace: float = DEFAULT_GRACE,
    local_queue_ttl: float = DEFAULT_LOCAL_QUEUE_TTL,
    once: bool = False,
    migrate: bool = True,
    handle_signals: bool = True,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    tracing: bool = False,
    propagate_trace_context: bool = False,
    timing: WorkerTiming | None = None,
) -> AsyncIterator[Worker]:
    """Run a worker pool for the duration of the ``async with`` block.

    Args:
      dsn: a libpq connection string or URL; ``None``: ``$DATABASE_URL``, then ``PG*``.
      tasks: ``identifier -> handler``. A handler is ``async def handler(job, ctx)``
        (:class:`~kongtask.Job`, :class:`~kongtask.JobContext`) or a plain function
        (run in a thread), optionally wrapped by :func:`task` for a timeout. Returning
        completes the job; raising fails it (it retries with exponential backoff).
        Or :class:`~kongtask.TaskDef` items, each with its handler
        (``definition.with_handler(handler)``).
      schema: default ``$GRAPHILE_WORKER_SCHEMA``, then ``graphile_worker``.
      concurrency: how many jobs run at once (default 1, as graphile-worker).
      poll_interval: seconds between polls when no notification arrives.
      batch_size: the most jobs claimed in one statement (and held unstarted).
      forbidden_flags: flag names whose jobs this pool skips, or a function returning
        them, called before each claim.
      on_event: called with every :class:`~kongtask.Event`; exceptions are logged.
      crontab: :class:`kongtask.CronItem` items to schedule (``kongtask._cron``).
      max_pool_size: connections of the pool that serves ``ctx.with_connection``,
        ``add_job`` and housekeeping. Three more are dedicated: LISTEN, claiming and
        writing outcomes (held for the pool's life: no per-statement pool reset).
      prepared_statements: ``False`` behind a transaction-pooling pgBouncer.
      grace: seconds running jobs get to finish at shutdown before they are cancelled.
      local_queue_ttl: claimed jobs not started within this many seconds are returned.
      once: stop as soon as no job is ready (``kongtask run --once``).
      migrate: install or upgrade the schema before starting, as ``kongtask migrate``
        does (safe when many processes start at once). ``False``: the schema must be
        installed already (a missing one raises :class:`~kongtask.KongtaskError`).
      handle_signals: while the pool runs, SIGINT and SIGTERM stop it gracefully and end
        the ``async with`` block (a second signal cancels running jobs at once). Only in
        the main thread; ``False`` leaves signals to the application.
      metrics_port: serve ``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus, with
        the ``kongtask[metrics]`` extra) over HTTP on this port (0: any free port; the
        bound one is ``worker.metrics_port``), from the pool's nursery. See
        ``docs/operations.md``.
      metrics_host: the address to listen on (default all interfaces).
      tracing: an OpenTelemetry consumer span per job run and producer spans for
        ``ctx.add_job`` (needs the ``kongtask[tracing]`` extra; docs/operations.md).
      propagate_trace_context: ``ctx.add_job`` also stores the trace context in object
        payloads (the reserved key ``_kongtask_trace``), as ``open_client``'s option of
        the same name does, so the new job's span continues this job's trace (implies
        ``tracing``).
      timing: the pool's waits, limits and retry rules
        (:class:`kongtask.testing.WorkerTiming`); the default is the documented
        behaviour, and tests pass shorter ones.

    Leaving the block shuts the pool down gracefully (see :meth:`Worker.shutdown`). If the
    block raises or is cancelled, the shutdown is immediate (grace 0) but still returns
    jobs and writes outcomes. Afterwards no task, thread or connection of the pool remains.

    If nothing in the program configured logging, kongtask logs INFO and above to stderr
    while the pool runs (docs/worker.md, "Logging").
    """
    schema_name = resolve_schema(schema)
    runners = runners_of(tasks)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"concurrency must be a positive integer, not {concurrency!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
    if not poll_interval > 0:
        raise ConfigError(f"poll_interval must be positive, not {poll_interval!r}")
    if not isinstance(max_pool_size, int) or max_pool_size < 1:
        raise ConfigError(f"max_pool_size must be a positive integer, not {max_pool_size!r}")
    if not grace >= 0 or not local_queue_ttl > 0:
        raise ConfigError("grace must be >= 0 and local_queue_ttl > 0")
    if timing is not None and not isinstance(timing, WorkerTiming):
        raise ConfigError(f"timing must be a WorkerTiming, not {type(timing).__name__}")
    install_pool_filters()  # an outage is logged by the pool's OutageLog instead
    if metrics_port is not None and (
        not isinstance(metrics_port, int)
        or isinstance(metrics_port, bool)
        or not 0 <= metrics_port <= 65535
    ):
        raise ConfigError(f"metrics_port must be a port number (0-65535), not {metrics_port!r}")
    metrics = job_tracer = producer_tracer = None
    if metrics_port is not None:
        # optional dependency (prometheus-client): imported only when asked for
        from .._metrics import new_pool_metrics

        metrics = new_pool_metrics()
    if tracing or propagate_trace_context:
        # optional dependency (opentelemetry): imported only when asked for
        from .._tracing import JobTracer, ProducerTracer

        job_tracer = JobTracer()
        producer_tracer = ProducerTracer(propagate_context=propagate_trace_context)
    # A real session (no transaction-pooling pgBouncer, which is also what rules out
    # prepared statements) carries both the liveness lock and the claim's settings.
    has_sessions = prepared_statements
    options = PoolOptions(
        concurrency=concurrency,
        poll_interval=float(poll_interval),
        batch_size=batch_size,
        grace=float(grace),
        local_queue_ttl=float(local_queue_ttl),
        once=once,
        liveness_lock=has_sessions,
        claim_session_settings=has_sessions,
        check_schema=not migrate,  # the migration checks it
        migrate=migrate,
        timing=DEFAULT_TIMING if timing is None else timing,
    )
    with log_to_stderr_unless_configured():
        async with open_database(
            resolve_dsn(dsn),
            # the pool's first connection opens at the start's first statement, beside
            # the fetcher's and the LISTEN connections (Worker._start)
            min_size=0,
            max_size=max_pool_size,
            prepared_statements=prepared_statements,
        ) as db:
            worker = Worker(
                db,
                schema_name,
                runners,
                options,
                forbidden_flags=forbidden_flags,
                on_event=on_event,
                crontab=crontab,
            )
            worker._client._tracing = producer_tracer
            worker._runner.observer = combine(metrics, job_tracer)
            if metrics_port is not None:
                worker._http = (
                    metrics_host,
                    metrics_port,
                    None if metrics is None else metrics.renderer(worker),
                )
            async with open_processes(runners) as processes, trio.open_nursery() as nursery:
                worker._runner.processes = processes
                await nursery.start(worker._serve)
                # The first stop signal cancels the block's body: it ends where it waits
                # (often `trio.sleep_forever()`), while the pool shuts down gracefully.
                body = trio.CancelScope()
                on_signal = StopOnSignals(worker.shutdown_nowait, body.cancel)
                with receive_stop_signals(on_signal) if handle_signals else nullcontext(False):
                    with body:
                        try:
                            yield worker
                        except BaseException:
                            if body.cancel_called:
                                # a signal: the graceful shutdown it started goes on
                                with trio.CancelScope(shield=True):
                                    await worker.shutdown()
                                raise
                            # the block failed or was cancelled: stop now, but still hand
                            # jobs back
                            flush = options.timing.flush_timeout
                            with (
                                trio.CancelScope(shield=True),
                                trio.move_on_after(flush + options.timing.statement_timeout),
                            ):
                                await worker.shutdown(grace=0)
                            raise
                    await worker.shutdown()
