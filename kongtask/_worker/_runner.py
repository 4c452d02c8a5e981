"""The runner: the worker tasks that take held jobs and run their handlers.

This is the hot path. Each worker runs one job at a time in a cancel scope it shares
between consecutive jobs (see :class:`~._context.JobSlot`); the facts of each run go to
:func:`~._outcome.classify`, and its outcome to the completer without waiting.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import trio

from .._events import EventEmitter
from .._job import Job
from .._logging import job_extra
from .._observe import JobObserver
from ._completer import Completer
from ._context import JobContext, JobSlot, PoolServices
from ._fetcher import WAITING_FOR_CAPACITY, FetchWakeup
from ._handlers import Runner
from ._lifecycle import Lifecycle
from ._local_queue import HeldRecheck, LocalQueue
from ._outcome import batch_failures, classify, raised_by_signal_handler, split_cancelled
from ._timing import WorkerTiming, failure_delay

log = logging.getLogger("kongtask.worker")

#: Seconds the workers together run jobs before they let the other tasks (fetcher,
#: completer, the asyncio loop) run: a scheduling round, of which each hand-over between
#: those tasks takes one.
ROUND_BUDGET: Final = 0.001


def thread_name(job: Job) -> str:
    """The name of the worker thread that runs a plain-function handler for ``job``."""
    return f"kongtask {job.task_identifier}#{job.id}"


class JobRunner:
    """The worker tasks; owns the running jobs, the start count and the thread limiter.

    Attributes:
      running: ``job id -> slot`` of the jobs whose handler runs now.
      started: jobs started since the pool started (the claim sizing's job rate).
      done: set once every worker task has ended.
    """

    def __init__(
        self,
        runners: dict[str, Runner],
        *,
        services: PoolServices,
        queue: LocalQueue,
        recheck: HeldRecheck,
        completer: Completer,
        wakeup: FetchWakeup,
        lifecycle: Lifecycle,
        events: EventEmitter,
        timing: WorkerTiming,
        concurrency: int,
    ) -> None:
        self._runners = runners
        self._services = services
        self._pool_id = services.pool_id
        self._queue = queue
        self._recheck = recheck
        self._completer = completer
        self._wakeup = wakeup
        self._lifecycle = lifecycle
        self._events = events
        self._timing = timing
        self._concurrency = concurrency
        self.running: dict[int, JobSlot] = {}
        self.started = 0
        self._live = 0
        self.done = trio.Event()
        # the workers' current scheduling round (trio clock)
        self._round_start = 0.0
        self._round_end = 0.0
        self._thread_limiter = trio.CapacityLimiter(concurrency)
        #: worker processes for ``task(..., process=True)`` handlers (set by the pool)
        self.processes: Any = None
        #: metrics and tracing, told of every job run (set by the pool)
        self.observer: JobObserver | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Start the worker tasks in ``nursery``."""
        for _ in range(self._concurrency):
            self._live += 1
            nursery.start_soon(self._worker_loop)

    def cancel_running(self) -> int:
        """Cancel every running job (the grace period is over); how many there were."""
        slots = list(self.running.values())
        for slot in slots:
            slot.cancel("pool")
        return len(slots)

    async def wait_for_threads(self) -> None:
        """Wait for the cancelled jobs to end, naming every few seconds the ones whose
        handler runs in a thread: those cannot be cancelled, only waited for."""
        with trio.move_on_after(self._timing.thread_report_first):
            await self.done.wait()
        while not self.done.is_set():
            for slot in list(self.running.values()):
                job = slot.job
                if job is None or self._runners[job.task_identifier].is_async:
                    continue
                log.warning(
                    "pool %s: waiting for %s (job %d): its handler runs in thread %r, "
                    "which cannot be cancelled; the pool stops when it returns",
                    self._pool_id,
                    job.task_identifier,
                    job.id,
                    thread_name(job),
                    extra=job_extra(self._pool_id, job, "job:wait"),
                )
            with trio.move_on_after(self._timing.thread_report_every):
                await self.done.wait()

    async def _worker_loop(self) -> None:
        slot = JobSlot()
        lifecycle = self._lifecycle
        try:
            while not lifecycle.stopping:
                # One cancel scope serves a run of jobs (a scope per job is a large part
                # of the per-job cost); a job cancelled by its context, its timeout or
                # the shutdown spends it, and the next job gets a new one.
                with trio.CancelScope() as scope:
                    slot.scope = scope
                    await self._run_jobs(slot)
        finally:
            self._live -= 1
            if self._live == 0:
                self.done.set()

    async def _run_jobs(self, slot: JobSlot) -> None:
        """Run held jobs in ``slot``'s scope until it is spent or the pool stops."""
        queue = self._queue
        held = queue.held
        recheck = self._recheck
        recheck_after = recheck.after
        lifecycle = self._lifecycle
        current_time = trio.current_time
        scope = slot.scope
        while not lifecycle.stopping:  # start nothing new; the shutdown returns what is held
            if held:
                job, claimed_at = held.popleft()
                if current_time() - claimed_at >= recheck_after and recheck.due(
                    current_time(), claimed_at
                ):
                    held.appendleft((job, claimed_at))
                    await recheck.run()
                    continue
                await self._run_job(job, slot)
                if scope.cancel_called:
                    return  # cancelled, but the handler returned before noticing
                # Handlers that never await would keep this task running: yield when the
                # round's budget is spent, not after every job (a reschedule per job is a
                # large part of the per-job cost). The budget is the pool's, not this
                # task's: with one per task, the workers would each run a budget in turn
                # while the fetcher's claim waited and the local queue ran dry.
                if current_time() >= self._round_end:
                    yielded = current_time()
                    await trio.lowlevel.checkpoint()
                    if yielded >= self._round_start:
                        # the first worker back opens the round; the others that
                        # yielded before it was opened run only until its end
                        self._round_start = current_time()
                        self._round_end = self._round_start + ROUND_BUDGET
                continue
            self._wakeup.worker_idle()  # an idle worker with nothing held
            await queue.wait()

    async def _run_job(self, job: Job, slot: JobSlot) -> None:
        """Run one job in ``slot``'s scope and send its outcome to the completer.

        Raises :class:`trio.Cancelled` when the job was cancelled (its outcome is sent
        first); the caller's ``with slot.scope`` ends there.
        """
        runner = self._runners[job.task_identifier]
        self.started += 1
        scope = slot.scope
        slot.job = job
        slot.cancelled_by = None
        self.running[job.id] = slot
        ctx = JobContext(self._services, job, slot)
        events = self._events
        if events.enabled:
            events.emit("job:start", job=job)
        observer = self.observer
        observed = None if observer is None else observer.job_started(job)
        if log.isEnabledFor(logging.INFO):  # one line per state change (the CLI's INFO)
            log.info(
                "pool %s: started %s (job %d, attempt %d of %d)",
                self._pool_id,
                job.task_identifier,
                job.id,
                job.attempts,
                job.max_attempts,
                extra=job_extra(self._pool_id, job, "job:start"),
            )
        start = trio.current_time()
        if runner.timeout is not None:
            scope.deadline = start + runner.timeout
        result: object = None
        error: BaseException | None = None
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
            del self.running[job.id]
            slot.job = None
        timed_out = False
        if runner.timeout is not None:
            if cancelled is None and not scope.cancel_called:
                scope.deadline = math.inf
            timed_out = (cancelled is not None and slot.cancelled_by is None) or (
                not runner.is_async and trio.current_time() - start > runner.timeout
            )
        if error is not None or cancelled is not None or timed_out:
            error, message = classify(
                error,
                cancelled=cancelled is not None,
                also=also,
                cancelled_by_pool=slot.cancelled_by == "pool",
                timed_out_after=runner.timeout if timed_out else None,
            )
        else:
            message = ""  # the handler returned: what classify() says of such a run
        replacement: str | None = None
        if error is None:
            batch = self._batch_outcome(job, result)
            if batch is not None:
                message, replacement = batch
        if observed is not None and observer is not None:  # None: nothing to end
            observer.job_ended(job, observed, error, message)
        if not message:
            self._completer.send_outcome(job)
            if events.enabled:
                events.emit("job:success", job=job)
                events.emit("job:complete", job=job)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "pool %s: completed %s (job %d) in %.1f ms",
                    self._pool_id,
                    job.task_identifier,
                    job.id,
                    (trio.current_time() - start) * 1000,
                    extra=job_extra(self._pool_id, job, "job:success"),
                )
        else:
            self._completer.send_outcome(job, message, replacement)
            final = job.attempts >= job.max_attempts
            events.emit("job:error", job=job, error=error, message=message)
            if final:
                events.emit("job:failed", job=job, message=message)
            events.emit("job:complete", job=job)
            self._log_failure(job, error, message, final)
        # capacity freed: tell a fetcher that waits for it
        wakeup = self._wakeup
        if wakeup.state is WAITING_FOR_CAPACITY:
            wakeup.capacity_freed(len(self._queue.held) + len(self.running))
        if cancelled is not None:
            raise cancelled

    async def _call(self, runner: Runner, job: Job, ctx: JobContext) -> object:
        if runner.is_async:
            return await runner.fn(job, ctx)
        if runner.in_process:
            assert self.processes is not None  # the pool opened them for such runners
            # cancellation (timeout, ctx.cancel_scope, end of grace) kills the process
            return await self.processes.run_sync(runner.fn, job, cancellable=True)
        return await trio.to_thread.run_sync(
            runner.fn,
            job,
            ctx,
            limiter=self._thread_limiter,
            # named while it runs the handler, so a leftover one would be easy to spot
            thread_name=thread_name(job),
        )

    def _batch_outcome(self, job: Job, result: object) -> tuple[str, str] | None:
        if not isinstance(result, list | tuple):
            return None  # not a batch's results: the payload is not even decoded
        try:
            return batch_failures(job.payload, result)
        except ValueError as exc:
            log.warning(
                "pool %s: %s (job %d) %s; counted as success",
                self._pool_id,
                job.task_identifier,
                job.id,
                exc,
            )
            return None

    def _log_failure(
        self, job: Job, error: BaseException | None, message: str, final: bool
    ) -> None:
        """One line with the exception's type and message; the traceback too at the
        job's first failure (later attempts of the same error would only repeat it)."""
        first_line = message.split("\n", 1)[0]
        # Only a raised error has a traceback: kongtask's own cancellation and timeout
        # messages get neither a type nor a traceback. last_error's first line names the
        # type of anything but an Exception already (_outcome.first_line).
        raised = error is not None and error.__traceback__ is not None
        if raised and isinstance(error, Exception):
            first_line = f"{type(error).__name__}: {first_line}"
        exc_info = error if raised and job.attempts == 1 else None
        if final:
            log.error(
                "pool %s: %s (job %d) failed permanently after %d attempt(s): %s",
                self._pool_id,
                job.task_identifier,
                job.id,
                job.attempts,
                first_line,
                exc_info=exc_info,
                extra=job_extra(self._pool_id, job, "job:failed"),
            )
        else:
            log.warning(
                "pool %s: %s (job %d) failed (attempt %d of %d, retry in %.0f s): %s",
                self._pool_id,
                job.task_identifier,
                job.id,
                job.attempts,
                job.max_attempts,
                failure_delay(job.attempts),
                first_line,
                exc_info=exc_info,
                extra=job_extra(self._pool_id, job, "job:error"),
            )
