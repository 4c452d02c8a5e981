"""Prometheus metrics of one worker pool (the ``kongtask[metrics]`` extra).

Per-job metrics come from the worker's calls of :class:`kongtask._observe.JobObserver`, pool
metrics from :meth:`Worker.statistics` and the per-statement counters of
:class:`kongtask._health.IoCounters`, read when scraped; database gauges from the
inspection API, refreshed at most every :data:`DB_REFRESH_SECONDS` however often the
endpoint is scraped. Each pool has its own registry, so several pools in one process do
not collide. Labels are task names and derived states only: never job ids, payloads or
queue names (those can be unbounded).
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import trio

from ._health import readiness
from ._inspect import QueueCounts
from ._inspect_sql import JOB_STATES

if TYPE_CHECKING:
    from ._job import Job
    from ._worker import Worker

log = logging.getLogger("kongtask.metrics")

#: The database gauges are read at most this often (seconds) per pool.
DB_REFRESH_SECONDS: Final = 5.0
#: Seconds a read of the database gauges may take before the scrape goes on without it.
DB_READ_TIMEOUT: Final = 5.0
#: Histogram buckets of run time and queue wait (seconds): ms-scale jobs to hour-long waits.
BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
)  # fmt: skip
_FIRST_BUCKET: Final = BUCKETS[0]


def new_pool_metrics() -> PoolMetrics | None:
    """The metrics of a new pool, or ``None`` (with a warning) without prometheus_client."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        log.warning(
            "prometheus_client is not installed: /metrics answers 501 "
            "(pip install 'kongtask[metrics]'); /healthz and /readyz work"
        )
        return None
    return PoolMetrics()


class _TaskCounts:
    """One task's counters and histograms (plain numbers: a scrape turns them into text).

    Jobs started are the queue-wait histogram's count and jobs ended the run-time
    histogram's, so the per-job path keeps no separate started or completed counter:
    completed = ended - failed.
    """

    __slots__ = (
        "failed",
        "permanently_failed",
        "run_buckets",
        "run_sum",
        "wait_buckets",
        "wait_sum",
    )

    def __init__(self) -> None:
        self.failed = self.permanently_failed = 0
        self.run_buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.wait_buckets = [0] * (len(BUCKETS) + 1)
        self.run_sum = self.wait_sum = 0.0

    @property
    def started(self) -> int:
        return sum(self.wait_buckets)

    @property
    def completed(self) -> int:
        return sum(self.run_buckets) - self.failed


class PoolMetrics:
    """The registry of one pool and the job observer that feeds it.

    The per-job path only bumps plain numbers (no locks, no label lookups, no metric
    objects): it runs in the pool's trio thread for every job, so it has to be cheap.
    They become metric families when scraped, by a collector of this pool's registry.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self._tasks: dict[str, _TaskCounts] = {}
        self._worker: Worker | None = None
        self._db_counts: list[QueueCounts] = []
        self._db_oldest: float | None = None
        self._db_read_at = -math.inf
        self._db_errors = 0
        self._db_ok = False
        self._db_lock = trio.Lock()
        self.registry.register(_PoolCollector(self))

    # -- the per-job path (kongtask._observe.JobObserver) ---------------------

    def _new_task(self, task: str) -> _TaskCounts:
        counts = self._tasks[task] = _TaskCounts()
        return counts

    # Both methods run for every job, so each does the least it can: the job's private
    # fields (no property calls), the claimed row's run_at microseconds (no datetime), one
    # clock read, plain numbers; the bucket searches are C, skipped for sub-millisecond
    # runs. Both times are the wall clock, which the queue wait needs anyway (run_at is
    # one): a clock step during a run misstates that run only, and never below zero.

    def job_started(self, job: Job) -> float:
        now = time.time()
        try:
            task = job._task_identifier
            try:
                counts = self._tasks[task]
            except KeyError:
                counts = self._new_task(task)
            try:
                wait = now - job._row["run_at_us"] * 1e-6
            except KeyError:  # a job not built from a claimed row
                wait = now - job.run_at.timestamp()
            if wait < 0.0:
                wait = 0.0  # clocks disagree, or the job was claimed early by its run_at
            counts.wait_buckets[bisect_left(BUCKETS, wait)] += 1
            counts.wait_sum += wait
        except Exception:  # an observer must never take the pool down
            log.exception("metrics: counting the start of job %s failed", job.id)
        return now

    def job_ended(
        self, job: Job, started: object, error: BaseException | None, message: str
    ) -> None:
        try:
            took = time.time() - started  # type: ignore[operator]
            task = job._task_identifier
            try:
                counts = self._tasks[task]
            except KeyError:
                counts = self._new_task(task)
            if took <= _FIRST_BUCKET:
                counts.run_buckets[0] += 1
                if took < 0.0:
                    took = 0.0
            else:
                counts.run_buckets[bisect_left(BUCKETS, took)] += 1
            counts.run_sum += took
            if message:
                counts.failed += 1
                if job.attempts >= job.max_attempts:
                    counts.permanently_failed += 1
        except Exception:
            log.exception("metrics: counting the end of job %s failed", job.id)

    # -- scraping -------------------------------------------------------------

    def renderer(self, worker: Worker) -> Callable[[], Awaitable[bytes]]:
        """The ``/metrics`` body for ``worker``'s pool."""
        from prometheus_client import generate_latest

        self._worker = worker

        async def render() -> bytes:
            await self._refresh_db(worker)
            return generate_latest(self.registry)

        return render

    async def _refresh_db(self, worker: Worker) -> None:
        async with self._db_lock:
            if trio.current_time() - self._db_read_at < DB_REFRESH_SECONDS:
                return
            self._db_read_at = trio.current_time()
            try:
                with trio.fail_after(DB_READ_TIMEOUT):
                    self._db_counts = await worker._client.queue_counts()
                    self._db_oldest = await worker._client.oldest_ready_age()
                self._db_ok = True
            except Exception as exc:
                # serve the pool's own metrics anyway; the gauges keep their last values
                self._db_errors += 1
                log.warning("metrics: reading the queue from the database failed: %s", exc)


def _le(bound: float) -> str:
    return repr(float(bound))


class _PoolCollector:
    """Pool and database gauges, read at scrape time."""

    def __init__(self, metrics: PoolMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # built at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        m = self._metrics
        worker = m._worker
        if worker is None:
            return
        stats = worker.statistics()
        io = worker._io

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        from prometheus_client.core import HistogramMetricFamily

        per_task = (
            ("kongtask_jobs_started", "Jobs started", "started"),
            ("kongtask_jobs_completed", "Jobs that succeeded", "completed"),
            ("kongtask_jobs_failed", "Failed attempts (each retry counts)", "failed"),
            (
                "kongtask_jobs_permanently_failed",
                "Jobs that failed their last attempt",
                "permanently_failed",
            ),
        )
        tasks = sorted(m._tasks.items())
        for name, doc, attribute in per_task:
            family = CounterMetricFamily(name, doc, labels=["task"])
            for task, counts in tasks:
                family.add_metric([task], getattr(counts, attribute))
            yield family
        histograms = (
            ("kongtask_job_run_seconds", "Handler run time, start to outcome", "run"),
            (
                "kongtask_job_queue_wait_seconds",
                "Time from a job's run_at to its start (this host's clock against run_at)",
                "wait",
            ),
        )
        for name, doc, prefix in histograms:
            histogram = HistogramMetricFamily(name, doc, labels=["task"])
            for task, counts in tasks:
                buckets: list[int] = getattr(counts, f"{prefix}_buckets")
                cumulative, total = [], 0
                for bound, n in zip((*map(_le, BUCKETS), "+Inf"), buckets, strict=True):
                    total += n
                    cumulative.append((bound, total))
                histogram.add_metric([task], cumulative, getattr(counts, f"{prefix}_sum"))
            yield histogram
        yield gauge("kongtask_pool_running_jobs", "Jobs running now", stats.running)
        yield gauge(
            "kongtask_pool_queued_locally_jobs",
            "Claimed jobs waiting for a free worker",
            stats.queued_locally,
        )
        yield gauge("kongtask_pool_capacity_jobs", "Concurrency", worker._concurrency)
        yield gauge(
            "kongtask_pool_pending_writes", "Outcomes not yet written", stats.pending_writes
        )
        yield gauge("kongtask_pool_ready", "1 when /readyz is 200", readiness(worker).ready)
        yield counter("kongtask_pool_jobs_returned", "Jobs handed back unstarted", stats.returned)
        yield counter("kongtask_pool_claimed_jobs", "Jobs claimed", io.claimed)
        yield SummaryMetricFamily(
            "kongtask_pool_claim_seconds",
            "Claim statements (count and total duration; size = claimed / count)",
            count_value=io.claims,
            sum_value=io.claim_seconds,
        )
        yield SummaryMetricFamily(
            "kongtask_pool_flush_seconds",
            "Outcome-writing statements (count and total duration)",
            count_value=io.flushes,
            sum_value=io.flush_seconds,
        )
        yield counter(
            "kongtask_pool_listen_reconnects",
            "Times the LISTEN connection failed or was lost",
            io.listen_errors,
        )
        jobs = GaugeMetricFamily(
            "kongtask_queue_jobs",
            f"Jobs in the database by task and derived state (read at most every "
            f"{DB_REFRESH_SECONDS:g} s)",
            labels=["task", "state"],
        )
        totals: dict[tuple[str, str], int] = {}
        for row in m._db_counts:
            for state in JOB_STATES:
                key = (row.task, state)
                totals[key] = totals.get(key, 0) + row.count(state)
        for (task, state_name), value in sorted(totals.items()):
            jobs.add_metric([task, state_name], value)
        yield jobs
        if m._db_ok:
            yield gauge(
                "kongtask_oldest_ready_job_age_seconds",
                "Seconds since the oldest ready job became due (0 when none is)",
                m._db_oldest or 0.0,
            )
        yield counter(
            "kongtask_queue_read_errors", "Failed reads of the database gauges", m._db_errors
        )
