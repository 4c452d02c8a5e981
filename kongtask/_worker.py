"""The worker: ``open_worker`` and the tasks of its nursery.

Data flows one way (ARCHITECTURE.md)::

    NOTIFY -> notifier --nudge--> fetcher --jobs--> workers (N) --outcomes--> completer
              poll timer --nudge--^      (local queue)    (memory channel)  (one statement
                                                                             per batch)

- **Memory channels** carry the wake-ups to the fetcher (one slot: a nudge is a hint)
  and the outcomes and returns to the completer; closing the latter's send side is
  what tells the completer that the pool is stopping.

- The **fetcher** claims batches sized to the free capacity plus a prefetch that follows
  the measured job rate (claiming hundreds per statement is what makes throughput,
  STACK.md), one claim in flight at a time, refilling when a quarter of the local queue is gone.
- The **local queue** is a deque, not a memory channel: unstarted jobs must be taken
  back (TTL, shutdown), and handing jobs over without a channel hop per job keeps the
  per-job path short (STACK.md: per-job scheduling was ~45% of the worker's time). Its
  bound is the fetcher's target, and idle workers park on a :class:`trio.lowlevel.ParkingLot`.
- **Workers** run one job at a time, each in its own cancel scope.
- The **completer** drains its channel and writes every outcome gathered since its
  last round trip in one statement, retrying transient errors without dropping a job
  (graphile-worker #636).
- The **notifier**, **sweeper** and **cron** scheduler are siblings in the same nursery.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import random
import signal
import traceback
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Concatenate, Final, ParamSpec, TypeAlias, TypeVar

import asyncpg
import trio

from ._client import Client
from ._config import resolve_dsn, resolve_schema
from ._errors import ConfigError
from ._events import EventCallback, EventEmitter
from ._health import IoCounters
from ._held import RECHECK_AFTER, claim_snapshot, needs_recheck
from ._job import Job
from ._liveness import hold_liveness_lock, is_marked_pool_id, new_pool_id as new_pool_id
from ._log_fallback import log_to_stderr_unless_configured
from ._logging import install_pool_filters, job_extra
from ._migrate import migrate as migrate_schema
from ._observe import JobObserver, combine
from ._outage import OutageLog, is_connection_lost
from ._pg import Database, open_database
from ._signals import StopOnSignals, receive_stop_signals
from ._sql import (
    Outcome,
    WorkerQueries,
    claim_jobs,
    complete_and_fail,
    recheck,
    register_tasks,
    return_jobs,
    return_unknown,
)
from ._tasks import TaskDef

log = logging.getLogger("kongtask.worker")

# after the grace period, jobs still running in threads are named after this long, then
# again every THREAD_REPORT_EVERY seconds until they return
THREAD_REPORT_FIRST = 0.2
THREAD_REPORT_EVERY = 10.0

T = TypeVar("T")
P = ParamSpec("P")

#: The ``last_error`` of jobs cancelled by a shutdown (graphile-worker's wording).
SHUTDOWN_MESSAGE: Final = "Worker pool is shutting down gracefully"
#: ``last_error`` when an exception carries no text (graphile-worker's wording).
NO_MESSAGE: Final = "Non error or error without message thrown."

DEFAULT_GRACE: Final = 5.0
DEFAULT_BATCH_SIZE: Final = 1000
#: A pool holds claimed jobs for at most about a second (docs/reliability.md): the
#: prefetch keeps PREFETCH_LOOKAHEAD of work at the measured rate, and when the handlers
#: slow down, jobs still waiting after this are handed back for other pools (and for
#: operators' functions, which skip locked jobs). graphile-worker's is 5 minutes.
DEFAULT_LOCAL_QUEUE_TTL: Final = 1.0
#: Seconds of work the fetcher keeps claimed ahead of the workers, at the measured rate.
PREFETCH_LOOKAHEAD: Final = 0.1
#: Seconds the workers together run jobs before they let the other tasks (fetcher,
#: completer, the asyncio loop) run: a scheduling round, of which each hand-over between
#: those tasks takes one.
ROUND_BUDGET: Final = 0.001
#: The fetcher claims again once this fraction (1/n) of its target is free.
REFILL_PARTS: Final = 4
#: The claiming connection's session (docs/worker.md, docs/reliability.md):
#: - its one statement is planned once, not for each claim (~1.5 ms of server CPU and
#:   latency each; a new plan is made after an ANALYZE of the jobs table);
#: - its commits do not wait for the WAL flush. A claim lost to a server crash only
#:   unlocks its jobs again (attempts not counted), which the crash does to running jobs
#:   anyway; outcomes are still written with synchronous commits, and a completion's
#:   flush covers the claim before it.
CLAIM_SESSION_SETTINGS: Final = {
    "plan_cache_mode": "force_generic_plan",
    "synchronous_commit": "off",
}
#: A claim, return or flush that takes longer than this is given up (and retried).
STATEMENT_TIMEOUT: Final = 30.0
#: After a claim whose reply was lost, the pool looks for that claim's jobs at once and
#: again this many seconds later (STATEMENT_TIMEOUT: a statement given up on may commit
#: late on the server).
RECONCILE_AGAIN_AFTER: Final = (5.0, STATEMENT_TIMEOUT, 4 * STATEMENT_TIMEOUT)
#: How long a shutdown waits for the final flush of outcomes before giving up on it.
FLUSH_TIMEOUT: Final = 30.0
#: Consecutive non-transient errors writing outcomes before the pool shuts down (#636).
GIVE_UP_AFTER: Final = 10
#: Longest wait between two reconnects of a marked pool's LISTEN connection, which holds
#: its liveness lock (graphile-worker's formula alone grows to 60 s).
LIVENESS_RECONNECT_CAP: Final = 2.0
#: Seconds between liveness checks of the LISTEN connection.
LISTEN_KEEPALIVE: Final = 30.0
#: A ready job of a task this pool does not support is reported once it has waited this
#: many seconds (another pool, Node or kongtask, may support it: such a pool takes ready
#: jobs within seconds, so a job left that long most likely has no worker at all).
UNSUPPORTED_AFTER: Final = 60.0
#: Seconds between two checks for such jobs: at most one warning per pool per interval.
UNSUPPORTED_CHECK_INTERVAL: Final = 300.0
#: The most jobs one check counts (it reads the claim's index; this bounds its work).
UNSUPPORTED_COUNT_LIMIT: Final = 10_000

# SQLSTATEs worth retrying (#636): serialization failure, deadlock, admin shutdown,
# crash shutdown, cannot connect now; class 08 is connection exceptions.
_TRANSIENT_SQLSTATES: Final = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})


# ---------------------------------------------------------------------------
# pure time logic (tested with trio's MockClock)


def failure_delay(attempts: int) -> float:
    """Seconds until a failed job may run again: ``exp(min(attempts, 10))`` (SCHEMA.md §5.5).

    The SQL computes the same from ``greatest(now(), run_at)``; this is for docs and logs.
    """
    return math.exp(min(attempts, 10))


def retry_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with jitter for database retries (0.1 s … 10 s)."""
    base: float = min(10.0, 0.1 * 2 ** min(attempt, 10))
    return base * (0.5 + rand() / 2)


def listen_reconnect_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The LISTEN reconnect delay (graphile-worker's formula, SCHEMA.md §5.8).

    ``(0.5 + sqrt(r)/2) * min(60 s, 50 ms * e^attempt)``, rounded up to whole ms.
    """
    ms = math.ceil((0.5 + math.sqrt(rand()) / 2) * min(60_000.0, 50 * math.exp(min(attempt, 20))))
    return ms / 1000


def sweep_delays(rand: Callable[[], float] = random.random) -> Iterator[float]:
    """Delays between stale-lock sweeps: first in [0, 60 s), then in [480, 600 s) (§5.7)."""
    yield 60.0 * rand()
    while True:
        yield 480.0 + 120.0 * rand()


def parse_insert_count(payload: str | None) -> int:
    """The ``count`` of a ``jobs:insert`` payload; 1 when missing or unparseable (§5.8)."""
    if not payload:
        return 1
    try:
        count = json.loads(payload).get("count", 1)
    except (ValueError, AttributeError):
        return 1
    if isinstance(count, bool) or not isinstance(count, int | float):
        return 1
    return int(count)


# ---------------------------------------------------------------------------
# handlers

Handler: TypeAlias = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A handler with per-task options; made by :func:`task`."""

    handler: Handler
    timeout: float | None = None
    process: bool = False


def task(handler: Handler, *, timeout: float | None = None, process: bool = False) -> TaskSpec:
    """Wrap ``handler`` with per-task options.

    Args:
      handler: ``async def handler(job, ctx)`` or a plain function (run in a thread).
      timeout: seconds; an async handler still running then is cancelled and the job
        fails with ``"timed out after N s"`` (and retries). A plain function in a thread
        cannot be interrupted: it is failed the same way when it returns late.
      process: run a CPU-bound plain function ``handler(job)`` in a worker process
        instead of a thread (needs ``pip install 'kongtask[parallel]'``: trio-parallel).
        It gets the job only (a :class:`JobContext` holds connections and cannot cross
        processes), must be importable by name (a module-level function: it is pickled),
        and its exception or return value must be picklable. As many run at once as the
        machine has CPUs; a timeout or a shutdown past its grace kills the process.

    Example::

        tasks = {"resize": kongtask.task(resize, timeout=30, process=True)}
    """
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if isinstance(handler, TaskSpec):
        return task(
            handler.handler,
            timeout=timeout if timeout is not None else handler.timeout,
            process=process or handler.process,
        )
    if not callable(handler):
        raise ConfigError(f"a task handler must be callable, not {type(handler).__name__}")
    if process:
        _check_process_handler(handler)
    return TaskSpec(handler, timeout, process)


def _check_process_handler(handler: Handler) -> None:
    import pickle

    name = getattr(handler, "__qualname__", repr(handler))
    if importlib.util.find_spec("trio_parallel") is None:
        raise ConfigError(
            f"{name}: process=True needs trio-parallel (pip install 'kongtask[parallel]')"
        )
    if _is_async_callable(handler):
        raise ConfigError(f"{name}: process=True takes a plain function, not an async one")
    try:
        pickle.dumps(handler)
    except Exception as exc:
        raise ConfigError(
            f"{name}: process=True needs a handler importable by name (a module-level "
            f"function), and this one cannot be pickled: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class _Runner:
    fn: Handler
    is_async: bool
    timeout: float | None
    in_process: bool = False


def _is_async_callable(fn: object) -> bool:
    while hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (an object with async __call__)
    )


def _runners(
    tasks: Mapping[str, Handler | TaskSpec] | Iterable[TaskDef[Any]],
) -> dict[str, _Runner]:
    if not isinstance(tasks, Mapping):
        tasks = _handlers_of(tasks)
    runners: dict[str, _Runner] = {}
    for name, value in tasks.items():
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ConfigError(f"task identifier {name!r} must be a string of 1 to 128 characters")
        spec = value if isinstance(value, TaskSpec) else task(value)
        _check_signature(name, spec.handler, 1 if spec.process else 2)
        runners[name] = _Runner(
            spec.handler, _is_async_callable(spec.handler), spec.timeout, spec.process
        )
    return runners


def _check_signature(name: str, handler: Handler, arguments: int = 2) -> None:
    """Refuse a handler that cannot be called as ``handler(job, ctx)`` (``handler(job)``
    for a process handler: ``arguments=1``).

    Every job of such a task would fail with a ``TypeError`` only once it runs; this says
    so when the pool starts. A callable whose signature Python cannot tell (some builtins
    and extension types) is accepted.
    """
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*[None] * arguments)
    except TypeError as exc:
        call = "handler(job, ctx)" if arguments == 2 else "handler(job)"
        raise ConfigError(
            f"task {name!r}: the handler {getattr(handler, '__qualname__', handler)!r} cannot "
            f"be called as {call}: {exc}"
        ) from None


def _handlers_of(definitions: object) -> dict[str, TaskSpec]:
    """``open_worker``'s tasks given as :class:`TaskDef` items with handlers."""
    if isinstance(definitions, str | bytes) or not isinstance(definitions, Iterable):
        raise ConfigError("tasks must be a mapping of task identifier -> handler")
    handlers: dict[str, TaskSpec] = {}
    for item in definitions:
        if not isinstance(item, TaskDef):
            raise ConfigError(
                "tasks must be a mapping of task identifier -> handler, or TaskDef items, "
                f"not {type(item).__name__}"
            )
        if item.handler is None:
            raise ConfigError(
                f"task {item.identifier!r} has no handler: pass def.with_handler(handler)"
            )
        if item.identifier in handlers:
            raise ConfigError(f"task {item.identifier!r} is defined twice")
        handlers[item.identifier] = task(item.handler, timeout=item.timeout)
    return handlers


class _JobLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        # the job's fields on every record, as on the worker's own job records
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra['task']}#{extra['job_id']}] {msg}", kwargs


class _JobSlot:
    """A worker's cancel scope and the job running in it (``Worker._run_jobs``)."""

    __slots__ = ("cancelled_by", "job", "scope")

    scope: trio.CancelScope  # set by the worker loop before each run of jobs

    def __init__(self) -> None:
        self.job: Job | None = None
        #: who cancelled the running job: "job" (its context), "pool" (the shutdown);
        #: ``None`` with the scope cancelled means its deadline (the task's timeout)
        self.cancelled_by: str | None = None

    def cancel(self, by: str) -> None:
        if self.cancelled_by is None:
            self.cancelled_by = by
        self.scope.cancel()


class JobCancelScope:
    """``ctx.cancel_scope``: cancels one job's handler, and nothing after it.

    Workers share a :class:`trio.CancelScope` between consecutive jobs (one per job is
    costly); this handle acts on it only while its own job is running, so a context kept
    past its job cannot cancel a later one.
    """

    __slots__ = ("_job", "_slot")

    def __init__(self, slot: _JobSlot, job: Job) -> None:
        self._slot = slot
        self._job = job

    def _current(self) -> bool:
        return self._slot.job is self._job

    def cancel(self) -> None:
        """Cancel the handler: it gets :class:`trio.Cancelled` at its next checkpoint and
        the job fails with "Job was cancelled" (and retries). No effect once it has ended."""
        if self._current():
            self._slot.cancel("job")

    @property
    def cancel_called(self) -> bool:
        """Whether the job was cancelled (by :meth:`cancel`, its timeout or the shutdown)."""
        return self._current() and self._slot.scope.cancel_called

    @property
    def deadline(self) -> float:
        """The trio clock time at which the handler is cancelled (``inf``: none); the
        task's ``timeout`` sets it. Settable while the job runs."""
        return self._slot.scope.deadline if self._current() else math.inf

    @deadline.setter
    def deadline(self, value: float) -> None:
        if self._current():
            self._slot.scope.deadline = value


class JobContext:
    """What a handler gets besides the job.

    Attributes:
      job: the job being run.
      logger: a :class:`logging.LoggerAdapter` that prefixes lines with ``[task#id]``.
      cancel_scope: the job's :class:`JobCancelScope`: ``ctx.cancel_scope.cancel()`` stops
        the handler (the job then fails and retries); ``deadline`` is the trio clock time
        of its timeout (``task(timeout=...)``).
      pool_id: the worker pool's id (what ``locked_by`` says).
      add_job, add_jobs: :meth:`kongtask.Client.add_job` and :meth:`~kongtask.Client.add_jobs`
        on the pool's database.
    """

    __slots__ = ("_logger", "_slot", "_worker", "add_job", "add_jobs", "job")

    def __init__(self, worker: Worker, job: Job, slot: _JobSlot) -> None:
        self._worker = worker
        self.add_job = worker.add_job
        self.add_jobs = worker.add_jobs
        self.job = job
        self._slot = slot
        self._logger: _JobLogger | None = None

    @property
    def cancel_scope(self) -> JobCancelScope:
        return JobCancelScope(self._slot, self.job)

    @property
    def pool_id(self) -> str:
        return self._worker.pool_id

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        # built on first use: most handlers never log, and this is the per-job hot path
        if self._logger is None:
            job = self.job
            self._logger = _JobLogger(
                logging.getLogger(f"kongtask.job.{job.task_identifier}"),
                job_extra(self._worker.pool_id, job, "job:log"),
            )
        return self._logger

    async def with_connection(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run the **asyncio** coroutine function ``fn(conn, *args)`` on a pooled connection.

        ``fn`` is written for asyncpg as usual (``await conn.fetch(...)``,
        ``async with conn.transaction(): ...``) and runs on the asyncio side in one
        crossing: the connection is acquired and released, and a transaction rolled
        back on error or cancellation, entirely inside asyncio. That is the safe way
        from trio (STACK.md P2): never keep the connection or call its methods from trio
        code directly.

        Example::

            async def count_users(conn, active):
                return await conn.fetchval("select count(*) from users where active = $1", active)

            n = await ctx.with_connection(count_users, True)

        To add a job that commits with ``fn``'s writes, call the asyncio producer on
        ``conn`` inside ``fn``: ``await kongtask.aio.add_job(conn, "task", payload)``.
        """
        return await self._worker._db.with_connection(fn, *args, **kwargs)


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
    """

    running: int
    queued_locally: int
    completed: int
    failed: int
    returned: int
    pending_writes: int


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A finished job for the completer: ``error`` is ``None`` on success."""

    job: Job
    error: str | None = None
    payload: str | None = None  # a batch job's failed elements (JSON), replacing its payload


@dataclass(frozen=True, slots=True)
class _Returns:
    """Claimed jobs to hand back unstarted: ``reason`` "ttl" (the local-queue TTL),
    "changed" (a recheck found their rows changed since the claim)."""

    jobs: list[Job]
    reason: str = "ttl"


_Write: TypeAlias = _Outcome | _Returns


class JobCancelled(Exception):
    """The ``error`` of ``job:error`` events for jobs cancelled (shutdown, ``cancel_scope``)."""


def _thread_name(job: Job) -> str:
    """The name of the worker thread that runs a plain-function handler for ``job``."""
    return f"kongtask {job.task_identifier}#{job.id}"


def _error_text(exc: BaseException) -> str:
    """``last_error`` for a handler exception: a first line, then a short traceback.

    The first line of an :class:`Exception` is its message (graphile-worker's wording; the
    type is on the traceback's last line). Any other ``BaseException`` says its type first
    (``CancelledError: x``): it is not an error a handler is expected to raise.
    """
    summary = "".join(traceback.format_exception(exc, limit=-5)).rstrip()
    return _pg_text(f"{_first_line(exc)}\n{summary}")


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, Exception):
        return str(exc) or NO_MESSAGE
    if isinstance(exc, SystemExit):
        return f"the handler raised SystemExit({exc.code!r})"
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _also_raised(exc: BaseException) -> str:
    """The part of ``last_error`` for an exception raised while a job was being cancelled."""
    return f"The handler also raised {_error_text(exc)}"


def split_cancelled(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``(cancellation, rest)`` of what a handler raised: the :class:`trio.Cancelled`
    part (a ``Cancelled`` or a group holding only those) and everything else."""
    if isinstance(exc, trio.Cancelled):
        return exc, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    return None, exc


#: Signals whose Python handler may raise in whatever code runs when they arrive.
_SHUTDOWN_SIGNALS: Final = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def raised_by_signal_handler(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it holds or was raised during) was raised by the
    Python-level handler of a real signal rather than by a handler's own code.

    trio's default SIGINT handler raises ``KeyboardInterrupt`` right in the code that was
    running (a job handler, when one was): the exception's innermost traceback frame is
    then that signal handler's. The same holds for a host program's own Python handler
    (``signal.signal(SIGTERM, ...)``) that raises. A handler's ``raise KeyboardInterrupt``
    has its own frame innermost, and so does anything raised in a thread.
    """
    handler_codes = {
        code
        for signum in _SHUTDOWN_SIGNALS
        if (code := getattr(signal.getsignal(signum), "__code__", None)) is not None
    }
    if not handler_codes:
        return False
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        tb = current.__traceback__
        if tb is not None:
            while tb.tb_next is not None:
                tb = tb.tb_next
            if tb.tb_frame.f_code in handler_codes:
                return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _pg_text(text: str) -> str:
    # PostgreSQL text cannot hold NUL: one such message would fail its whole batch of
    # outcomes on every retry, so it is escaped here
    return text.replace("\x00", "\\0") if "\x00" in text else text


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is worth retrying as is (#636)."""
    state = _sqlstate(exc)
    if state is not None and (state in _TRANSIENT_SQLSTATES or state.startswith("08")):
        return True
    return isinstance(
        exc, OSError | ConnectionError | TimeoutError | asyncpg.InterfaceError | trio.TooSlowError
    )


# ---------------------------------------------------------------------------
# the worker pool


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
    """

    def __init__(
        self,
        db: Database,
        schema: str,
        runners: dict[str, _Runner],
        *,
        concurrency: int,
        poll_interval: float,
        batch_size: int,
        forbidden_flags: Iterable[str] | Callable[[], Iterable[str] | None] | None,
        on_event: EventCallback | None,
        crontab: Sequence[Any] | None,
        grace: float,
        local_queue_ttl: float,
        once: bool,
        marked: bool,
        check_schema: bool = True,
    ) -> None:
        self._db = db
        self._check_schema = check_schema
        self.schema = schema
        self.pool_id = new_pool_id(once=once, marked=marked)
        self._outage = OutageLog(log, self.pool_id)
        self._q = WorkerQueries(schema)
        self._client = Client(db, schema)
        # the client's own methods: same signatures, docs and validation
        self.add_job = self._client.add_job
        self.add_jobs = self._client.add_jobs
        self._runners = runners
        self._concurrency = concurrency
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._static_flags: list[str] | None = None
        self._flags_fn: Callable[[], Iterable[str] | None] | None = None
        if callable(forbidden_flags):
            self._flags_fn = forbidden_flags
        elif forbidden_flags is not None:
            if isinstance(forbidden_flags, str):
                raise ConfigError("forbidden_flags must be a list of flag names, not a string")
            self._static_flags = list(forbidden_flags) or None
        self._events = EventEmitter(on_event, self.pool_id)
        self._observer: JobObserver | None = None  # metrics and tracing (open_worker)
        self._crontab = crontab
        self._default_grace = grace
        self._ttl = local_queue_ttl
        self._once = once
        self.exit_code: int | None = None

        self._task_ids: dict[str, int] = {}
        self._task_names: dict[int, str] = {}
        # claimed, unstarted jobs with their claim time (trio clock), oldest first
        self._local: deque[tuple[Job, float]] = deque()
        # the last recheck of held jobs (kongtask._held): the claim time of the newest
        # job it covered and when its answer came; one recheck at a time
        self._covered_up_to = -math.inf
        self._checked_at = -math.inf
        self._recheck_errors = 0
        self._recheck_lock = trio.Lock()
        self._parked = trio.lowlevel.ParkingLot()
        self._idle_workers = 0
        self._running: dict[int, _JobSlot] = {}
        self._live_workers = 0
        self._workers_done = trio.Event()
        # Fetcher wake-ups ("nudges") travel over a one-slot memory channel: a nudge is
        # a hint, so a full slot already says everything and further ones are dropped.
        self._nudge_send, self._nudge_recv = trio.open_memory_channel[None](1)
        self._fetch_full = False  # fetcher waits for capacity (not for new jobs)
        self._fetch_idle = False  # fetcher found nothing ready and waits for news
        self._refill_below = 0
        self._listening = trio.Event()  # the liveness lock is held (marked pools)
        # trio times at which to look for jobs of a claim whose reply was lost (sorted)
        self._reconcile_due: list[float] = []
        # session settings need a session: not behind a transaction-pooling pgBouncer
        self._claim_settings = marked
        # job-rate estimate for the prefetch
        self._rate = 0.0
        self._rate_t = 0.0
        self._rate_n = 0
        self._started = 0
        # the workers' current scheduling round (trio clock; _worker_loop)
        self._round_start = 0.0
        self._round_end = 0.0
        # Workers and the fetcher hand the completer their writes over a memory channel.
        # Its buffer is not bounded: every message is about a job already claimed (so
        # their number is bounded by the claims), and a worker must never block on the
        # database. Closing the send side once nobody can send ends the completer.
        self._writes_send, self._writes_recv = trio.open_memory_channel[_Write](math.inf)
        # ids of jobs whose outcome or return is not written yet (in the channel, in
        # the completer's batch, or in flight): what the lost-claim check must not touch
        self._unwritten: set[int] = set()
        # the completer's current batch: successes; (job, message, payload) failures
        self._ok: list[Job] = []
        self._fail: list[tuple[Job, str, str | None]] = []
        self._returns: list[tuple[list[Job], str]] = []
        self._thread_limiter = trio.CapacityLimiter(concurrency)
        #: worker processes for ``task(..., process=True)`` handlers (set by open_worker)
        self._processes: Any = None
        self._completer_done = trio.Event()
        self._completed = 0
        self._failed = 0
        self._returned = 0
        # shutdown
        self._stop_requested = trio.Event()
        self._stopping = False
        self._grace_deadline = math.inf
        self._grace_scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        # per statement (never per job): for /readyz and the metrics
        self._io = IoCounters()
        # (host, port, /metrics renderer) of the HTTP endpoints, set by open_worker
        self._http: tuple[str, int, Any] | None = None
        self.metrics_port: int | None = None

    # -- public ----------------------------------------------------------

    def statistics(self) -> WorkerStatistics:
        """An immutable snapshot of the pool's counters."""
        return WorkerStatistics(
            running=len(self._running),
            queued_locally=len(self._local),
            completed=self._completed,
            failed=self._failed,
            returned=self._returned,
            pending_writes=len(self._unwritten),
        )

    def shutdown_nowait(self, grace: float | None = None) -> None:
        """Start a shutdown and return at once (safe from handlers and callbacks).

        A second call with a shorter ``grace`` shortens the wait (``grace=0``: cancel
        running jobs now, the "forceful" shutdown).
        """
        grace = self._default_grace if grace is None else max(0.0, float(grace))
        deadline = trio.current_time() + grace
        if not self._stopping:
            self._stopping = True
            self._grace_deadline = deadline
            self._events.emit("pool:gracefulShutdown", message="Worker pool is shutting down")
            log.info("pool %s: shutting down (grace %.1f s)", self.pool_id, grace)
            self._stop_requested.set()
        elif deadline < self._grace_deadline:
            self._grace_deadline = deadline
            self._events.emit("pool:forcefulShutdown", message="Forced worker shutdown")
            log.warning("pool %s: forceful shutdown", self.pool_id)
            if self._grace_scope is not None:
                self._grace_scope.deadline = deadline

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop the pool and wait until it has stopped.

        Claiming stops at once; unstarted claimed jobs are returned; running jobs get
        ``grace`` seconds (default: the pool's ``grace``), then are cancelled and failed
        with "Worker pool is shutting down gracefully" (so they retry); outcomes are
        flushed and connections closed. Do not await this from one of the pool's own
        handlers (it would wait for itself): use :meth:`shutdown_nowait` there.
        """
        self.shutdown_nowait(grace)
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until the pool has stopped (shutdown, breaking migration, ``once`` done)."""
        await self._stopped.wait()

    @property
    def stopping(self) -> bool:
        """Whether a shutdown has been requested."""
        return self._stopping

    # -- the nursery ------------------------------------------------------

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            await self._start()
            started = True
            self._events.emit("pool:create", concurrency=self._concurrency)
            async with trio.open_nursery() as outer:
                if self._http is not None:
                    from ._health import serve_http

                    self.metrics_port = await outer.start(serve_http, self, *self._http)
                outer.start_soon(self._completer)
                async with trio.open_nursery() as workers:
                    for index in range(self._concurrency):
                        self._live_workers += 1
                        workers.start_soon(self._worker_loop, index)
                    async with trio.open_nursery() as background:
                        # the fetcher warms up its claim while LISTEN is being set up
                        background.start_soon(self._fetcher)
                        await background.start(self._notifier)
                        background.start_soon(self._sweeper)
                        background.start_soon(self._dead_pool_sweeper)
                        background.start_soon(self._unsupported_task_watch)
                        self._start_cron(background)
                        task_status.started()
                        await self._stop_requested.wait()
                        background.cancel_scope.cancel()
                    # nothing claims any more: hand back what was not started
                    await self._return_local("shutdown")
                    self._parked.unpark_all()
                    with trio.move_on_at(self._grace_deadline) as grace_scope:
                        self._grace_scope = grace_scope
                        await self._workers_done.wait()
                    if self._running:
                        log.warning(
                            "pool %s: cancelling %d running job(s) after the grace period",
                            self.pool_id,
                            len(self._running),
                        )
                        for slot in list(self._running.values()):
                            slot.cancel("pool")
                        await self._wait_for_threads()
                # nobody can send any more: the completer writes what it has, then ends
                self._writes_send.close()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await self._completer_done.wait()
                outer.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # nothing is claimed before the start is done: nothing to release
                if started:
                    await self._final_release()
                self._events.emit("pool:release")
                self._events.emit("stop")
                self._stopped.set()

    async def _wait_for_threads(self) -> None:
        """Wait for the cancelled jobs to end, naming every few seconds the ones whose
        handler runs in a thread: those cannot be cancelled, only waited for."""
        with trio.move_on_after(THREAD_REPORT_FIRST):
            await self._workers_done.wait()
        while not self._workers_done.is_set():
            for slot in list(self._running.values()):
                job = slot.job
                if job is None or self._runners[job.task_identifier].is_async:
                    continue
                log.warning(
                    "pool %s: waiting for %s (job %d): its handler runs in thread %r, "
                    "which cannot be cancelled; the pool stops when it returns",
                    self.pool_id,
                    job.task_identifier,
                    job.id,
                    _thread_name(job),
                    extra=job_extra(self.pool_id, job, "job:wait"),
                )
            with trio.move_on_after(THREAD_REPORT_EVERY):
                await self._workers_done.wait()

    async def _start(self) -> None:
        from ._migrate import check_schema

        if self._check_schema:
            await check_schema(self._db, self.schema)
        if self._runners:
            self._task_ids = await self._db.with_own_connection(
                register_tasks, self._q, sorted(self._runners)
            )
        self._task_names = {v: k for k, v in self._task_ids.items()}
        if self._once:
            await self._sweep_once()

    def _start_cron(self, nursery: trio.Nursery) -> None:
        if not self._crontab:
            return
        from ._cron import run_cron_scheduler  # lazily: most pools have no crontab

        nursery.start_soon(run_cron_scheduler, self._db, self.schema, list(self._crontab))

    async def _final_release(self) -> None:
        """Return anything still ours: local jobs, then any row locked by this pool.

        Rows whose outcome could not be written stay locked: their handlers ran, and
        handing them back would run them again at once while the database still refuses
        the outcome. They are released by ``kongtask unlock``, by a live kongtask pool's
        dead-pool sweep (seconds after this pool's liveness lock is gone), or after 4 hours.
        """
        try:
            with trio.move_on_after(STATEMENT_TIMEOUT):
                if self._local:
                    await self._return_local("shutdown")
                self._take_writes()
                if self._ok or self._fail:
                    try:
                        await self._flush_once()
                    except Exception as exc:
                        log.error(
                            "pool %s: could not write the outcome of %d job(s) (%s); they "
                            "stay locked until `kongtask unlock %s`, another kongtask "
                            "pool's dead-pool sweep or the 4-hour sweep",
                            self.pool_id,
                            len(self._ok) + len(self._fail),
                            exc,
                            self.pool_id,
                        )
                        return
                row = await self._db.fetchrow(self._q.release_pool, self.pool_id)
                if row is not None and (row["jobs"] or row["queues"]):
                    log.warning(
                        "pool %s: released %d job(s) and %d queue(s) still locked at shutdown",
                        self.pool_id,
                        row["jobs"],
                        row["queues"],
                    )
        except Exception as exc:
            log.error("pool %s: final release failed: %s", self.pool_id, exc)

    # -- fetcher ------------------------------------------------------------

    def _wake_fetcher(self) -> None:
        try:  # noqa: SIM105  (a hot path: no context manager per nudge)
            self._nudge_send.send_nowait(None)
        except trio.WouldBlock:
            pass  # a nudge is already waiting: the fetcher will look anyway

    def _forget_nudges(self) -> None:
        """Drop nudges sent before now: the fetcher is about to look at everything."""
        while True:
            try:
                self._nudge_recv.receive_nowait()
            except trio.WouldBlock:
                return

    def _nudged(self) -> bool:
        return self._nudge_recv.statistics().current_buffer_used > 0

    def _forbidden_flags(self) -> list[str] | None:
        if self._flags_fn is None:
            return self._static_flags
        flags = self._flags_fn()
        return list(flags) if flags else None

    def _claim_size(self) -> int:
        """How many jobs to claim now (0 = wait for capacity)."""
        now = trio.current_time()
        dt = now - self._rate_t
        if dt >= 0.01:
            instant = (self._started - self._rate_n) / dt
            # Up at once, down with ~0.2 s memory: a backlog is claimed at full size
            # within a few claims (a gradual ramp cost ~15% of a 20,000-job drain), and
            # one pause does not drop the prefetch to nothing.
            weight = 1.0 if instant > self._rate else min(1.0, dt / 0.2)
            self._rate += weight * (instant - self._rate)
            self._rate_t, self._rate_n = now, self._started
        prefetch = min(self._batch_size, int(self._rate * PREFETCH_LOOKAHEAD))
        target = self._concurrency + prefetch
        in_flight = len(self._local) + len(self._running)
        deficit = target - in_flight
        # Refill when a quarter is gone: a claim of n rows takes a few ms plus ~20 µs per
        # row, while the workers run a job in a fraction of that, so a claim sent when
        # the queue is half empty came back to idle workers; smaller claims sent sooner
        # keep one always in flight under load (the next one is planned in 0.1 ms:
        # CLAIM_SESSION_SETTINGS).
        step = max(1, target // REFILL_PARTS)
        self._refill_below = target - step
        if deficit <= 0:
            return 0
        if deficit >= step or (self._idle_workers and not self._local):
            return min(self._batch_size, deficit)
        return 0

    async def _fetcher(self) -> None:
        marked = is_marked_pool_id(self.pool_id)
        conn: Any = None
        errors = 0
        try:
            conn = await self._warm_up()
            while True:
                if marked and not self._listening.is_set():
                    # claim only while our liveness lock is held (it lives on the LISTEN
                    # connection), or a dead-pool sweeper could release what we claim
                    await self._listening.wait()
                self._forget_nudges()
                if self._reconcile_due and self._reconcile_due[0] <= trio.current_time():
                    await self._reconcile_locks()
                self._expire_local()
                size = self._claim_size()
                if size <= 0:
                    self._fetch_full = True
                    with trio.move_on_at(min(self._ttl_deadline(), self._next_reconcile())):
                        await self._nudge_recv.receive()
                    self._fetch_full = False
                    continue
                if conn is not None and conn.is_closed():
                    conn = None  # the server went away meanwhile: no failed claim needed
                try:
                    if conn is None:
                        conn = await self._connect_fetcher()
                    rows = await self._claim(conn, size)
                except Exception as exc:
                    errors += 1
                    # the claim may have committed and only its reply been lost
                    self._schedule_reconcile()
                    self._events.emit("worker:getJob:error", error=exc)
                    if is_connection_lost(exc):
                        self._outage.failed("claiming jobs", exc)
                    else:
                        log.warning(
                            "pool %s: claiming jobs failed (%s); retrying", self.pool_id, exc
                        )
                    if conn is not None:
                        # whatever broke, a fresh connection is cheap next to a stuck one
                        await self._db.close_connection(conn)
                        conn = None
                    await trio.sleep(retry_delay(errors))
                    continue
                errors = 0
                self._outage.ok("claiming jobs")
                if rows:
                    self._enqueue(rows)
                    # a candidate scan that hit the limit means more may be ready
                    if len(rows) == size or rows[0]["n_candidates"] >= size or self._once:
                        continue
                    # the claim saw every job it could take: wait for news
                elif self._once and self._quiet() and not self._nudged():
                    # (a nudge means outcomes were written during the claim: a queue
                    # may have been unlocked after its snapshot, so look again)
                    log.info("pool %s: no job is ready; stopping (once)", self.pool_id)
                    self.shutdown_nowait()
                    return
                # nothing ready: wait for a NOTIFY, an unlocked queue, the poll or the TTL
                self._fetch_idle = True
                with trio.move_on_at(
                    min(
                        trio.current_time() + self._poll_interval,
                        self._ttl_deadline(),
                        self._next_reconcile(),
                    )
                ):
                    await self._nudge_recv.receive()
                self._fetch_idle = False
        finally:
            if conn is not None:
                await self._db.close_connection(conn)

    def _db_warning(self, what: str, exc: BaseException) -> None:
        """A warning, unless the outage it belongs to has been reported already."""
        lost = self._outage.down and is_connection_lost(exc)
        level = logging.DEBUG if lost else logging.WARNING
        log.log(level, "pool %s: %s: %s", self.pool_id, what, exc)

    def _schedule_reconcile(self) -> None:
        """Compare the jobs locked by this pool with the ones it knows: before the next
        claim, and again :data:`RECONCILE_AGAIN_AFTER` later (the lost claim's statement
        may still be running on the server, and commit after the first look)."""
        now = trio.current_time()
        self._reconcile_due = [now, *(now + delay for delay in RECONCILE_AGAIN_AFTER)]

    def _next_reconcile(self) -> float:
        return self._reconcile_due[0] if self._reconcile_due else math.inf

    async def _reconcile_locks(self) -> None:
        """Return jobs locked by this pool that it does not know about.

        A claim that committed although its reply was lost (connection cut, timeout)
        leaves such jobs: locked by a live pool, they would wait for the 4-hour sweep.
        Runs in the fetcher between claims, so no claim is in flight; a job that is
        known (queued, running, its outcome pending or being written, being returned)
        is never touched, and one that finished meanwhile is no longer ``locked_by``
        us, so the return statement skips it.
        """
        try:
            rows = await self._db.fetch(self._q.locked_by_pool, self.pool_id)
        except Exception as exc:
            self._db_warning("checking its locks failed (will retry)", exc)
            return
        known = {job.id for job, _ in self._local}
        known.update(self._running)
        known.update(self._unwritten)
        unknown = [int(r["id"]) for r in rows if int(r["id"]) not in known]
        now = trio.current_time()
        self._reconcile_due = [due for due in self._reconcile_due if due > now]
        if not unknown:
            return
        log.warning(
            "pool %s: returning %d job(s) locked by a claim whose reply was lost",
            self.pool_id,
            len(unknown),
        )
        with trio.CancelScope(shield=True), trio.move_on_after(STATEMENT_TIMEOUT):
            try:
                returned = await self._db.with_own_connection(
                    return_unknown, self._q, self.pool_id, unknown
                )
            except Exception as exc:
                log.warning("pool %s: returning them failed (will retry): %s", self.pool_id, exc)
                self._reconcile_due.insert(0, now)
                return
        self._returned += len(returned)
        self._events.emit("job:returned", job_ids=tuple(returned), reason="lost claim")

    async def _warm_up(self) -> Any:
        """Open the fetcher's connection and run the claim once with a limit of 0.

        It claims nothing, so it may run before the liveness lock is held; it leaves the
        statement prepared and the backend's catalog caches warm, which takes the first
        real claim's planning (tens of ms on a busy server) off the start-to-first-job
        path: it overlaps with the LISTEN set-up instead.
        """
        try:
            conn = await self._connect_fetcher()
        except Exception:
            return None  # the claim loop connects (and retries) on its own
        try:
            await self._claim(conn, 0)
        except Exception as exc:
            log.debug("pool %s: warming up the claim failed: %s", self.pool_id, exc)
            await self._db.close_connection(conn)
            return None
        return conn

    async def _connect_fetcher(self) -> Any:
        if not self._claim_settings:
            return await self._db.connect()
        return await self._db.connect(CLAIM_SESSION_SETTINGS)

    def _quiet(self) -> bool:
        return not (self._local or self._running or self._unwritten)

    async def _claim(self, conn: Any, size: int) -> list[asyncpg.Record]:
        # Shielded: a claim whose reply is lost to a cancellation would leave jobs locked
        # by us that nobody runs. The shutdown hands back whatever this returns.
        start = trio.current_time()
        with trio.CancelScope(shield=True), trio.fail_after(STATEMENT_TIMEOUT):
            rows: list[asyncpg.Record] = await self._db.run(
                claim_jobs,
                conn,
                self._q,
                self.pool_id,
                list(self._task_ids.values()),
                size,
                self._forbidden_flags(),
                None,
            )
        io = self._io
        io.last_claim_at = end = trio.current_time()
        io.claims += 1
        io.claim_seconds += end - start
        io.claimed += len(rows)
        return rows

    def _enqueue(self, rows: Sequence[asyncpg.Record]) -> None:
        now = trio.current_time()
        names = self._task_names
        local = self._local
        for row in rows:
            job = Job.from_claim(row, names[row["task_id"]])
            local.append((job, now))
        if self._stopping:
            return  # the shutdown returns them
        self._parked.unpark(count=min(len(rows), len(self._parked)))

    def _ttl_deadline(self) -> float:
        if not self._local:
            return math.inf
        return self._local[0][1] + self._ttl

    def _expire_local(self) -> None:
        """Return jobs that waited longer than the TTL (another pool may be idle)."""
        if not self._local:
            return
        limit = trio.current_time() - self._ttl
        expired: list[Job] = []
        while self._local and self._local[0][1] <= limit:
            expired.append(self._local.popleft()[0])
        if expired:
            log.info(
                "pool %s: returning %d job(s) unstarted after %.0f s",
                self.pool_id,
                len(expired),
                self._ttl,
            )
            self._spawn_return(expired)

    def _spawn_return(self, jobs: list[Job]) -> None:
        # the fetcher must not block on the round trip: the completer writes it
        self._send_write(_Returns(jobs))

    async def _return_local(self, why: str) -> None:
        jobs = [job for job, _ in self._local]
        self._local.clear()
        if not jobs:
            return
        await self._return_jobs(jobs, why)

    async def _return_jobs(self, jobs: list[Job], why: str) -> None:
        snapshot = claim_snapshot(jobs)
        ids = snapshot[0]
        with trio.CancelScope(shield=True), trio.move_on_after(STATEMENT_TIMEOUT):
            try:
                returned = await self._db.with_own_connection(
                    return_jobs, self._q, self.pool_id, snapshot
                )
            except Exception as exc:
                log.error("pool %s: returning %d job(s) failed: %s", self.pool_id, len(ids), exc)
                return
            finally:
                # returned, or left for the lost-claim check and the final release
                self._unwritten.difference_update(ids)
            self._returned += len(returned)
            if returned:
                self._events.emit("job:returned", job_ids=tuple(returned), reason=why)
            if any(job.queue_name is not None for job in jobs):
                self._wake_fetcher()

    # -- workers -------------------------------------------------------------

    async def _worker_loop(self, index: int) -> None:
        slot = _JobSlot()
        try:
            while not self._stopping:
                # One cancel scope serves a run of jobs (entering and leaving one per job
                # cost ~12 µs, a quarter of the per-job time); a job cancelled by its
                # context, its timeout or the shutdown spends it, and the next job gets
                # a new one.
                with trio.CancelScope() as scope:
                    slot.scope = scope
                    await self._run_jobs(slot)
        finally:
            self._live_workers -= 1
            if self._live_workers == 0:
                self._workers_done.set()

    async def _run_jobs(self, slot: _JobSlot) -> None:
        """Run queued jobs in ``slot``'s scope until it is spent or the pool stops."""
        local = self._local
        current_time = trio.current_time
        scope = slot.scope
        while not self._stopping:  # start nothing new; the shutdown returns what is queued
            if local:
                job, claimed_at = local.popleft()
                if current_time() - claimed_at >= RECHECK_AFTER and needs_recheck(
                    current_time(), claimed_at, self._covered_up_to, self._checked_at
                ):
                    local.appendleft((job, claimed_at))
                    await self._recheck_held()
                    continue
                await self._run_job(job, slot)
                if scope.cancel_called:
                    return  # cancelled, but the handler returned before noticing
                # Handlers that never await would keep this task running: yield
                # when the round's budget is spent (not after every job: a trio
                # reschedule per job was a large part of the per-job cost, STACK.md).
                # The budget is the pool's, not this task's: with one per task, ten
                # workers each ran a millisecond in turn, and the fetcher's claim
                # went out 10 ms after the workers asked for it (the local queue
                # had run dry by then).
                if current_time() >= self._round_end:
                    yielded = current_time()
                    await trio.lowlevel.checkpoint()
                    if yielded >= self._round_start:
                        # the first worker back opens the round; the others that
                        # yielded before it was opened run only until its end
                        self._round_start = current_time()
                        self._round_end = self._round_start + ROUND_BUDGET
                continue
            if self._fetch_full:
                self._wake_fetcher()  # an idle worker with nothing queued
            self._idle_workers += 1
            try:
                await self._parked.park()
            finally:
                self._idle_workers -= 1

    async def _recheck_held(self) -> None:
        """Look at every held job's row again (one statement); drop and hand back those
        changed since their claim (``kongtask._held``). Other workers wait for it."""
        async with self._recheck_lock:
            local = self._local
            now = trio.current_time()
            if self._stopping or not local:
                return
            if not needs_recheck(now, local[0][1], self._covered_up_to, self._checked_at):
                return  # the recheck this worker waited for covered it
            held = list(local)
            snapshot = claim_snapshot(job for job, _ in held)
            try:
                with trio.fail_after(STATEMENT_TIMEOUT):
                    valid = await self._db.with_own_connection(
                        recheck, self._q, self.pool_id, snapshot
                    )
            except Exception as exc:
                # an unchecked job must not start: try again later (the TTL still
                # hands them back, and the shutdown too)
                self._recheck_errors += 1
                log.warning("pool %s: rechecking held jobs failed: %s", self.pool_id, exc)
                with trio.move_on_after(retry_delay(self._recheck_errors)):
                    await self._stop_requested.wait()
                return
            self._recheck_errors = 0
            self._covered_up_to = held[-1][1]
            # counted from the answer, so that a recheck slower than RECHECK_AFTER still
            # lets the jobs it covered start (the window grows by its round trip)
            self._checked_at = trio.current_time()
            checked = set(snapshot[0])
            changed = {i for i in checked if i not in valid}
            if not changed:
                return
            # the fetcher may have added jobs and the TTL taken some meanwhile: keep
            # whatever is held now except the changed ones, in order (same deque)
            kept = [entry for entry in local if entry[0].id not in changed]
            dropped = [job for job, _ in local if job.id in changed]
            local.clear()
            local.extend(kept)
            if dropped:
                log.info(
                    "pool %s: not starting %d held job(s) changed since their claim "
                    "(removed, replaced or administered)",
                    self.pool_id,
                    len(dropped),
                )
                self._send_write(_Returns(dropped, "changed"))

    async def _run_job(self, job: Job, slot: _JobSlot) -> None:
        """Run one job in ``slot``'s scope and send its outcome to the completer.

        Raises :class:`trio.Cancelled` when the job was cancelled (its outcome is sent
        first); the caller's ``with slot.scope`` ends there.
        """
        runner = self._runners[job.task_identifier]
        self._started += 1
        scope = slot.scope
        slot.job = job
        slot.cancelled_by = None
        self._running[job.id] = slot
        ctx = JobContext(self, job, slot)
        events = self._events
        if events.enabled:
            events.emit("job:start", job=job)
        observer = self._observer
        observed = None if observer is None else observer.job_started(job)
        if log.isEnabledFor(logging.INFO):  # one line per state change (the CLI's INFO)
            log.info(
                "pool %s: started %s (job %d, attempt %d of %d)",
                self.pool_id,
                job.task_identifier,
                job.id,
                job.attempts,
                job.max_attempts,
                extra=job_extra(self.pool_id, job, "job:start"),
            )
        start = trio.current_time()
        if runner.timeout is not None:
            scope.deadline = start + runner.timeout
        result: object = None
        error: BaseException | None = None
        timed_out = False
        cancelled: BaseException | None = None
        also: BaseException | None = None
        try:
            result = await self._call(runner, job, ctx)
        except Exception as exc:
            error = exc
        except BaseException as exc:
            # What stops a handler without being its job's failure is decided by where it
            # comes from, not by its type (docs/reliability.md, "What a handler may raise").
            if raised_by_signal_handler(exc):
                raise  # a real signal, delivered in the handler: the pool is torn down
            cancelled, error = split_cancelled(exc)
            if cancelled is not None and not scope.cancel_called:
                if trio.current_effective_deadline() == -math.inf:
                    raise  # an outer scope's Cancelled: the pool itself is being torn down
                # a trio.Cancelled that no live scope delivered (kept and re-raised by the
                # handler): the handler's own error
                cancelled, error = None, exc
            if cancelled is not None:
                # the job's scope was cancelled (timeout, ctx.cancel_scope, shutdown); its
                # exit takes the Cancelled once the outcome is sent. An error raised
                # while unwinding goes into last_error, after the cancellation's message.
                also, error = error, None
        finally:
            del self._running[job.id]
            slot.job = None
        if runner.timeout is not None:
            if cancelled is None and not scope.cancel_called:
                scope.deadline = math.inf
            timed_out = (cancelled is not None and slot.cancelled_by is None) or (
                not runner.is_async and trio.current_time() - start > runner.timeout
            )
        if timed_out:
            error = TimeoutError(f"timed out after {runner.timeout:g} s")
            message = str(error)
            if also is not None:
                message = _pg_text(f"{message}\n{_also_raised(also)}")
        elif cancelled is not None and error is None:
            message = SHUTDOWN_MESSAGE if slot.cancelled_by == "pool" else "Job was cancelled"
            error = JobCancelled(message)
            if also is not None:
                message = _pg_text(f"{message}\n{_also_raised(also)}")
        elif error is not None:
            message = _error_text(error)
        else:
            message = ""
        replacement: str | None = None
        if error is None:
            batch = self._batch_outcome(job, result)
            if batch is not None:
                message, replacement = batch
        if observer is not None:
            observer.job_ended(job, observed, error, message)
        if not message:
            self._send_write(_Outcome(job))
            if events.enabled:
                events.emit("job:success", job=job)
                events.emit("job:complete", job=job)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "pool %s: completed %s (job %d) in %.1f ms",
                    self.pool_id,
                    job.task_identifier,
                    job.id,
                    (trio.current_time() - start) * 1000,
                    extra=job_extra(self.pool_id, job, "job:success"),
                )
        else:
            self._send_write(_Outcome(job, message, replacement))
            final = job.attempts >= job.max_attempts
            events.emit("job:error", job=job, error=error, message=message)
            if final:
                events.emit("job:failed", job=job, message=message)
            events.emit("job:complete", job=job)
            self._log_failure(job, error, message, final)
        # capacity freed: tell a fetcher that waits for it
        if self._fetch_full and len(self._local) + len(self._running) <= self._refill_below:
            self._wake_fetcher()
        if cancelled is not None:
            raise cancelled

    def _log_failure(
        self, job: Job, error: BaseException | None, message: str, final: bool
    ) -> None:
        """One line with the exception's type and message; the traceback too at the
        job's first failure (later attempts of the same error would only repeat it)."""
        first_line = message.split("\n", 1)[0]
        # Only a raised error has a traceback: kongtask's own cancellation and timeout
        # messages get neither a type nor a traceback. last_error's first line names the
        # type of anything but an Exception already (_first_line).
        raised = error is not None and error.__traceback__ is not None
        if raised and isinstance(error, Exception):
            first_line = f"{type(error).__name__}: {first_line}"
        exc_info = error if raised and job.attempts == 1 else None
        if final:
            log.error(
                "pool %s: %s (job %d) failed permanently after %d attempt(s): %s",
                self.pool_id,
                job.task_identifier,
                job.id,
                job.attempts,
                first_line,
                exc_info=exc_info,
                extra=job_extra(self.pool_id, job, "job:failed"),
            )
        else:
            log.warning(
                "pool %s: %s (job %d) failed (attempt %d of %d, retry in %.0f s): %s",
                self.pool_id,
                job.task_identifier,
                job.id,
                job.attempts,
                job.max_attempts,
                failure_delay(job.attempts),
                first_line,
                exc_info=exc_info,
                extra=job_extra(self.pool_id, job, "job:error"),
            )

    async def _call(self, runner: _Runner, job: Job, ctx: JobContext) -> object:
        if runner.is_async:
            return await runner.fn(job, ctx)
        if runner.in_process:
            assert self._processes is not None  # open_worker opened it for such runners
            # cancellation (timeout, ctx.cancel_scope, end of grace) kills the process
            return await self._processes.run_sync(runner.fn, job, cancellable=True)
        return await trio.to_thread.run_sync(
            runner.fn,
            job,
            ctx,
            limiter=self._thread_limiter,
            # named while it runs the handler, so a leftover one would be easy to spot
            thread_name=_thread_name(job),
        )

    def _batch_outcome(self, job: Job, result: object) -> tuple[str, str] | None:
        """For a batch job whose handler returned per-element outcomes: (message, payload)
        of the failed elements, or ``None`` when everything succeeded (§5.5)."""
        if not isinstance(result, list | tuple):
            return None
        payload = job.payload
        if not isinstance(payload, list):
            return None
        if len(result) != len(payload):
            log.warning(
                "pool %s: %s (job %d) returned %d outcomes for a batch of %d; counted as success",
                self.pool_id,
                job.task_identifier,
                job.id,
                len(result),
                len(payload),
            )
            return None
        failed = [
            (item, r)
            for item, r in zip(payload, result, strict=True)
            if isinstance(r, BaseException)
        ]
        if not failed:
            return None
        message = _pg_text("Batch failures:\n" + "\n".join(str(r) or NO_MESSAGE for _, r in failed))
        return message, json.dumps([item for item, _ in failed])

    # -- completer -------------------------------------------------------------

    def _send_write(self, write: _Write) -> None:
        if isinstance(write, _Outcome):
            self._unwritten.add(write.job.id)
        else:
            self._unwritten.update(job.id for job in write.jobs)
        self._writes_send.send_nowait(write)

    def _take(self, write: _Write) -> None:
        """Add a received write to the completer's batch."""
        if isinstance(write, _Returns):
            self._returns.append((write.jobs, write.reason))
        elif write.error is None:
            self._ok.append(write.job)
        else:
            self._fail.append((write.job, write.error, write.payload))

    def _take_writes(self) -> None:
        """Move every write waiting in the channel into the batch (one statement for all)."""
        while True:
            try:
                self._take(self._writes_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def _completer(self) -> None:
        conn: Any = None
        errors = 0
        try:
            while True:
                if not (self._ok or self._fail or self._returns):
                    try:
                        self._take(await self._writes_recv.receive())
                    except trio.EndOfChannel:
                        return  # the pool is stopping and everything is written
                self._take_writes()
                if self._returns:
                    batches, self._returns = self._returns, []
                    for jobs, reason in batches:
                        await self._return_jobs(jobs, reason)
                if not self._ok and not self._fail:
                    continue
                if conn is not None and conn.is_closed():
                    conn = None  # the server went away meanwhile
                try:
                    if conn is None:
                        conn = await self._db.connect()
                    await self._flush_once(conn)
                    errors = 0
                    self._outage.ok("writing outcomes")
                except Exception as exc:
                    errors += 1
                    self._events.emit("worker:completeJob:error", error=exc)
                    transient = is_transient(exc)
                    if is_connection_lost(exc):
                        self._outage.failed("writing outcomes", exc)
                    else:
                        log.warning(
                            "pool %s: writing %d outcome(s) failed (%s%s); retrying",
                            self.pool_id,
                            len(self._ok) + len(self._fail),
                            exc,
                            "" if transient else ", not a known transient error",
                        )
                    if conn is not None:
                        await self._db.close_connection(conn)
                        conn = None
                    if not transient and errors == GIVE_UP_AFTER and not self._stopping:
                        # retries are exhausted: stop taking new work (the outcomes are
                        # kept and retried until the shutdown's flush deadline)
                        log.error(
                            "pool %s: outcomes still cannot be written after %d attempts; "
                            "shutting down",
                            self.pool_id,
                            errors,
                        )
                        self.exit_code = self.exit_code or 1
                        self.shutdown_nowait()
                    await trio.sleep(retry_delay(errors))
        finally:
            if conn is not None:
                await self._db.close_connection(conn)
            self._completer_done.set()

    async def _flush_once(self, conn: Any = None) -> None:
        """Write the outcomes gathered so far in one statement; on error keep them all."""
        ok, fail = self._ok, self._fail
        if not ok and not fail:
            return
        self._ok, self._fail = [], []
        start = trio.current_time()
        try:
            # shielded: a statement cancelled after it committed must not be forgotten
            # (it would be retried harmlessly, but the shutdown needs the answer)
            with trio.CancelScope(shield=True), trio.fail_after(STATEMENT_TIMEOUT):
                args = (
                    self._q,
                    self.pool_id,
                    [j.id for j in ok],
                    [j.id for j, _, _ in fail],
                    [m for _, m, _ in fail],
                    [p for _, _, p in fail],
                )
                if conn is None:
                    written = await self._db.with_own_connection(complete_and_fail, *args)
                else:
                    written = await self._db.run(complete_and_fail, conn, *args)
        except BaseException:
            # keep every outcome (the statement is all-or-nothing and idempotent)
            self._ok = ok + self._ok
            self._fail = fail + self._fail
            raise
        self._io.flushes += 1
        self._io.flush_seconds += trio.current_time() - start
        self._unwritten.difference_update(j.id for j in ok)
        self._unwritten.difference_update(j.id for j, _, _ in fail)
        self._release_vanished_queues(ok, fail, written)
        self._completed += len(ok)
        self._failed += len(fail)
        if (
            self._once
            or any(j.queue_name is not None for j in ok)
            or any(j.queue_name is not None for j, _, _ in fail)
        ):
            # a named queue was unlocked: its next job is ready (and `once` re-checks)
            self._wake_fetcher()

    def _release_vanished_queues(
        self, ok: list[Job], fail: list[tuple[Job, str, str | None]], written: list[Outcome]
    ) -> None:
        """Named-queue jobs whose row was gone (deleted by an operator while they ran)
        still hold their queue row: the hand-back statement unlocks it."""
        if len(written) == len(ok) + len(fail):
            return
        done = {outcome[1] for outcome in written}
        vanished = [j for j in ok if j.queue_name is not None and j.id not in done]
        vanished += [j for j, _, _ in fail if j.queue_name is not None and j.id not in done]
        if vanished:
            self._returns.append((vanished, "vanished"))

    # -- notifier -------------------------------------------------------------

    def _on_jobs_insert(self, conn: object, pid: int, channel: str, payload: str) -> None:
        # runs on the trio thread inside the asyncio loop: must never raise (STACK.md P3)
        try:
            # The fetcher claims up to its free capacity, so the count only says whether
            # to wake it: a claim never takes more than are ready, and limiting it to
            # the count would cost a second round trip whenever more were waiting.
            if parse_insert_count(payload) > 0:
                self._wake_fetcher()
        except Exception:
            log.exception("jobs:insert handler failed")

    def _on_migrate(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload) if payload else {}
            if isinstance(data, dict) and data.get("breaking") is True:
                from ._migrate import runtime_breaking_message

                log.warning(runtime_breaking_message(int(data.get("migrationNumber", 0))))
                self.exit_code = 57
                self.shutdown_nowait()
        except Exception:
            log.exception("worker:migrate handler failed")

    async def _notifier(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        attempt = 0
        started = False
        while True:
            conn: Any = None
            try:
                conn = await self._db.connect()
                lost = trio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                if is_marked_pool_id(self.pool_id):
                    await self._db.run(hold_liveness_lock, conn, self.pool_id)
                await self._db.run(conn.add_listener, "jobs:insert", self._on_jobs_insert)
                await self._db.run(conn.add_listener, "worker:migrate", self._on_migrate)
                attempt = 0
                self._listening.set()
                self._outage.ok("LISTEN connection")
                self._events.emit("pool:listen:success")
                self._wake_fetcher()  # notifications may have been missed meanwhile
                if not started:
                    started = True
                    task_status.started()
                while not lost.is_set():
                    with trio.move_on_after(LISTEN_KEEPALIVE):
                        await lost.wait()
                    if not lost.is_set():
                        with trio.fail_after(10):
                            await self._db.run(conn.execute, "select 1")
                raise ConnectionError("the LISTEN connection was closed")
            except Exception as exc:
                self._io.listen_errors += 1
                if self._listening.is_set():
                    self._listening = trio.Event()  # the liveness lock went with it
                self._events.emit("pool:listen:error", error=exc)
                if is_connection_lost(exc):
                    self._outage.failed("LISTEN connection", exc)
                else:
                    log.warning("pool %s: LISTEN connection failed: %s", self.pool_id, exc)
                if not started:
                    started = True
                    task_status.started()
            finally:
                if conn is not None:
                    await self._db.close_connection(conn)
            delay = listen_reconnect_delay(attempt)
            if is_marked_pool_id(self.pool_id):
                # While the LISTEN connection is down this pool holds rows but not its
                # liveness lock: come back quickly, so that dead-pool sweepers (two checks
                # a few seconds apart, kongtask._liveness) rarely catch it in between.
                delay = min(delay, LIVENESS_RECONNECT_CAP)
            await trio.sleep(delay)
            attempt += 1

    # -- sweepers -------------------------------------------------------------

    async def _dead_pool_sweeper(self) -> None:
        """Release the rows of provably dead kongtask pools within seconds (``_liveness``)."""
        from . import _liveness

        def on_release(release: _liveness.Release) -> None:
            self._events.emit(
                "pool:sweep", jobs=release.jobs, queues=release.queues, pools=release.pools
            )
            self._wake_fetcher()

        def on_check(error: BaseException | None) -> None:
            if error is None:
                self._outage.ok("checking for dead pools")
            elif is_connection_lost(error):
                self._outage.failed("checking for dead pools", error)
            else:
                log.warning(
                    "pool %s: check for dead pools failed (will retry): %s", self.pool_id, error
                )

        await _liveness.run_dead_pool_sweeper(
            self._db,
            self.schema,
            # read at call time, so a changed module default applies
            restart_grace=_liveness.DEFAULT_RESTART_GRACE,
            on_release=on_release,
            on_check=on_check,
        )

    async def _sweeper(self) -> None:
        for delay in sweep_delays():
            await trio.sleep(delay)
            await self._sweep_once()

    async def _unsupported_task_watch(self) -> None:
        if not self._runners:
            return  # a pool without tasks (cron only) has nothing to compare
        await trio.sleep(UNSUPPORTED_AFTER * (1 + random.random()))
        while True:
            await self._report_unsupported_tasks()
            await trio.sleep(UNSUPPORTED_CHECK_INTERVAL * (0.9 + random.random() / 5))

    async def _report_unsupported_tasks(self) -> dict[str, int]:
        """Warn about ready jobs that waited past ``UNSUPPORTED_AFTER`` for tasks this pool
        does not support; returns ``{task identifier: jobs}`` (empty when none or on error).

        A pool knows only its own tasks: a job another pool supports is reported only when
        it waited that long, e.g. behind a backlog of that pool.
        """
        try:
            rows = await self._db.fetch(
                self._q.unsupported_tasks,
                sorted(self._task_names),
                UNSUPPORTED_AFTER,
                UNSUPPORTED_COUNT_LIMIT,
            )
        except Exception as exc:
            log.debug("pool %s: looking for unsupported tasks failed: %s", self.pool_id, exc)
            return {}
        # a task of ours under an id this pool has not looked up yet is not unsupported
        # (the sweeper refreshes the ids)
        found = {
            str(row["identifier"]): int(row["jobs"])
            for row in rows
            if row["identifier"] not in self._runners
        }
        if found:
            total = sum(found.values())
            log.warning(
                "pool %s: %s%d ready job(s) waited more than %.0f s for task(s) this pool "
                "does not support: %s; is a worker for them running?",
                self.pool_id,
                "at least " if total >= UNSUPPORTED_COUNT_LIMIT else "",
                total,
                UNSUPPORTED_AFTER,
                ", ".join(f"{name} ({count})" for name, count in found.items()),
            )
        return found

    async def _sweep_once(self) -> None:
        if self._task_ids:
            # GC_TASK_IDENTIFIERS may have deleted our task rows meanwhile; jobs added
            # since carry new ids that only a fresh lookup finds (SCHEMA.md §5.2)
            try:
                task_ids = await self._db.with_own_connection(
                    register_tasks, self._q, sorted(self._runners)
                )
            except Exception as exc:
                self._db_warning("refreshing task ids failed", exc)
            else:
                self._task_ids = task_ids
                # keep old ids too: a claim in flight may still return them
                self._task_names = {**self._task_names, **{v: k for k, v in task_ids.items()}}
        try:
            row = await self._db.fetchrow(self._q.sweep_stale)
        except Exception as exc:
            self._db_warning("stale-lock sweep failed", exc)
            return
        if row is not None and (row["jobs"] or row["queues"]):
            log.warning(
                "pool %s: released %d job(s) and %d queue(s) locked for more than 4 hours",
                self.pool_id,
                row["jobs"],
                row["queues"],
            )
            self._events.emit("pool:sweep", jobs=row["jobs"], queues=row["queues"])
            self._wake_fetcher()


@asynccontextmanager
async def _open_processes(runners: Mapping[str, _Runner]) -> AsyncIterator[Any]:
    """trio-parallel's worker processes when a task runs in one, else ``None``; they end
    with the pool."""
    if not any(runner.in_process for runner in runners.values()):
        yield None
        return
    import trio_parallel  # type: ignore[import-untyped,import-not-found,unused-ignore]

    async with trio_parallel.open_worker_context() as context:
        yield context


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

    Leaving the block shuts the pool down gracefully (see :meth:`Worker.shutdown`). If the
    block raises or is cancelled, the shutdown is immediate (grace 0) but still returns
    jobs and writes outcomes. Afterwards no task, thread or connection of the pool remains.

    If nothing in the program configured logging, kongtask logs INFO and above to stderr
    while the pool runs (docs/worker.md, "Logging").
    """
    schema_name = resolve_schema(schema)
    runners = _runners(tasks)
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
    install_pool_filters()  # an outage is logged by the pool's OutageLog instead
    if metrics_port is not None and (
        not isinstance(metrics_port, int)
        or isinstance(metrics_port, bool)
        or not 0 <= metrics_port <= 65535
    ):
        raise ConfigError(f"metrics_port must be a port number (0-65535), not {metrics_port!r}")
    metrics = job_tracer = producer_tracer = None
    if metrics_port is not None:
        from ._metrics import new_pool_metrics

        metrics = new_pool_metrics()
    if tracing or propagate_trace_context:
        from ._tracing import JobTracer, ProducerTracer

        job_tracer = JobTracer()
        producer_tracer = ProducerTracer(propagate_context=propagate_trace_context)
    with log_to_stderr_unless_configured():
        async with open_database(
            resolve_dsn(dsn),
            min_size=1,
            max_size=max_pool_size,
            prepared_statements=prepared_statements,
        ) as db:
            if migrate:
                await migrate_schema(db, schema_name)
            worker = Worker(
                db,
                schema_name,
                runners,
                concurrency=concurrency,
                poll_interval=float(poll_interval),
                batch_size=batch_size,
                forbidden_flags=forbidden_flags,
                on_event=on_event,
                crontab=crontab,
                grace=float(grace),
                local_queue_ttl=float(local_queue_ttl),
                once=once,
                # a session lock needs a session: not behind a transaction-pooling pgBouncer
                marked=prepared_statements,
                check_schema=not migrate,  # the migration checked it
            )
            worker._client._tracing = producer_tracer
            worker._observer = combine(metrics, job_tracer)
            if metrics_port is not None:
                worker._http = (
                    metrics_host,
                    metrics_port,
                    None if metrics is None else metrics.renderer(worker),
                )
            async with _open_processes(runners) as processes, trio.open_nursery() as nursery:
                worker._processes = processes
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
                            with (
                                trio.CancelScope(shield=True),
                                trio.move_on_after(FLUSH_TIMEOUT + STATEMENT_TIMEOUT),
                            ):
                                await worker.shutdown(grace=0)
                            raise
                    await worker.shutdown()
