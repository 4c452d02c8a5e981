"""Worker-level lifecycle properties: real :func:`kongtask.open_worker` pools, random mixes.

A :class:`WorkerScenario` is a list of jobs (queue, handler outcome), a concurrency, a
point at which the pool is shut down, and a grace period. :meth:`WorkerHarness.check`
adds the jobs (each with ``max_attempts`` 1, so no retry can make a job run twice), runs a
pool until the shutdown point, shuts it down, and checks what must hold afterwards:

- the shutdown point is reached by the pool's own progress, never by a timeout: either
  ``stop_after_starts`` handler starts, or, when the scenario asks for as many starts as
  can happen, the point where every job that can start has started and every one that
  does not hang has finished (a hung job holds its named queue and its slot);
- every job ends exactly once in the state its handler's fate predicts: returned ->
  deleted; raised -> kept, attempts 1, its message; cancelled at shutdown -> kept,
  attempts 1, the shutdown message; never started -> kept, attempts 0, untouched; and
  in the second kind of shutdown, "never started" is accepted only for the jobs that
  could not start;
- no job is lost across the shutdown, none runs twice, no lock is left behind;
- a named queue never runs two of its jobs at once.

:attr:`WorkerHarness.totals` counts handler starts and each kind of end, so a test can
fail a run that never exercised what it claims to.

The pool runs in a background trio thread; the checks read the database from the
calling thread.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import trio
from hypothesis import strategies as st

from .._config import quote_ident
from .._worker import open_worker
from ._model import InvariantViolation
from ._postgres import run_sync_sql

T = TypeVar("T")

OUTCOMES = ("ok", "raise", "hang")
TASK = "lifecycle_worker_prop"
#: What a job cancelled by a shutdown is failed with.
SHUTDOWN_MESSAGE = "Worker pool is shutting down gracefully"


@dataclass(frozen=True)
class ScenarioJob:
    """One job of a scenario.

    Attributes:
      queue: its named queue, or ``None``.
      outcome: what its handler does: ``"ok"`` returns, ``"raise"`` raises, ``"hang"``
        waits until cancelled.
      priority: its priority.
    """

    queue: str | None
    outcome: str
    priority: int = 0


@dataclass(frozen=True)
class WorkerScenario:
    """A pool run: jobs, concurrency, when to shut down and with how much grace.

    Attributes:
      jobs: the jobs added before the pool starts.
      concurrency: the pool's concurrency.
      stop_after_starts: shut down once this many handlers have started; when that is at
        least as many as can start, shut down once the pool is quiet instead (see
        :class:`Reachable`).
      grace: the shutdown's grace period (0 cancels running handlers at once).
      batch_size: the pool's claim size.
    """

    jobs: tuple[ScenarioJob, ...]
    concurrency: int
    stop_after_starts: int
    grace: float
    batch_size: int = 10


def worker_scenarios(max_jobs: int = 8) -> st.SearchStrategy[WorkerScenario]:
    """Random scenarios: up to ``max_jobs`` jobs in up to two named queues."""
    job = st.builds(
        ScenarioJob,
        queue=st.sampled_from((None, "wq1", "wq2")),
        outcome=st.sampled_from(OUTCOMES),
        priority=st.integers(-1, 1),
    )

    def build(jobs: list[ScenarioJob]) -> st.SearchStrategy[WorkerScenario]:
        return st.builds(
            WorkerScenario,
            jobs=st.just(tuple(jobs)),
            concurrency=st.sampled_from((1, 2, 4)),
            stop_after_starts=st.integers(0, len(jobs)),
            grace=st.sampled_from((0.0, 0.1)),
            batch_size=st.sampled_from((1, 3, 10)),
        )

    return st.lists(job, min_size=1, max_size=max_jobs).flatmap(build)


@dataclass(frozen=True)
class Reachable:
    """What a scenario's pool must do before a shutdown, worked out from the scenario.

    Attributes:
      startable: indexes of the jobs that can start: every job without a queue, and in
        each named queue the jobs up to and including its first ``"hang"`` (queue order:
        priority, then id), since a hung job holds its queue until the shutdown.
      saturated: the startable hangs can fill every slot; which jobs start then depends
        on timing, but at least ``concurrency`` handlers do.
      min_starts: the handler starts any correct pool reaches: every startable job, or
        ``concurrency`` when saturated.
    """

    startable: frozenset[int]
    saturated: bool
    min_starts: int

    @staticmethod
    def of(scenario: WorkerScenario, ids: dict[int, int]) -> Reachable:
        """``ids``: job index -> job id (the queue order's tie-break)."""
        startable: set[int] = set()
        by_queue: dict[str, list[int]] = {}
        for i, job in enumerate(scenario.jobs):
            if job.queue is None:
                startable.add(i)
            else:
                by_queue.setdefault(job.queue, []).append(i)
        for members in by_queue.values():
            for i in sorted(members, key=lambda i: (scenario.jobs[i].priority, ids[i])):
                startable.add(i)
                if scenario.jobs[i].outcome == "hang":
                    break
        hangs = sum(1 for i in startable if scenario.jobs[i].outcome == "hang")
        saturated = hangs >= scenario.concurrency
        return Reachable(
            frozenset(startable),
            saturated,
            scenario.concurrency if saturated else len(startable),
        )


@dataclass
class ScenarioResult:
    """What happened in one :meth:`WorkerHarness.check`.

    Attributes:
      fates: job index -> ``"ok"``, ``"raise"``, ``"cancelled"`` or ``"never started"``.
      rows: job index -> the job's row after the shutdown (``None``: deleted), with
        ``attempts``, ``last_error``, ``locked_at``, ``locked_by``.
      starts: handler starts in all.
      stop: ``"starts"`` (shut down after ``stop_after_starts`` starts) or ``"quiet"``
        (shut down once every job that can start had started and the others finished).
    """

    fates: dict[int, str]
    rows: dict[int, dict[str, Any] | None]
    starts: int
    stop: str


@dataclass
class _Record:
    starts: dict[int, int] = field(default_factory=dict)  # job id -> times started
    fates: dict[int, str] = field(default_factory=dict)  # job id -> ok/raise/cancelled
    intervals: list[tuple[str, int, float, float]] = field(default_factory=list)
    started: int = 0
    hanging: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class _TrioThread:
    """A trio run in a background thread that synchronous code can call into."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self._token is not None
        result: T = trio.from_thread.run(fn, *args, trio_token=self._token)
        return result

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._token = None
        self._thread.join(timeout=30)


class WorkerHarness:
    """Runs scenarios against ``schema`` at ``dsn``; made by :func:`open_worker_harness`.

    Each scenario deletes the schema's jobs and queue rows first: use a database made
    for testing.

    Attributes:
      scenarios: scenarios checked.
      totals: counts over all scenarios: ``starts`` (handler starts), ``ok``, ``raise``,
        ``cancelled``, ``never started`` (jobs by fate), ``stop:starts`` and
        ``stop:quiet`` (scenarios by kind of shutdown point).
    """

    def __init__(
        self, dsn: str, schema: str, thread: _TrioThread, *, progress_timeout: float
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.progress_timeout = progress_timeout
        self._thread = thread
        self.scenarios = 0
        self.totals: dict[str, int] = dict.fromkeys(
            ("starts", "ok", "raise", "cancelled", "never started", "stop:starts", "stop:quiet"),
            0,
        )

    def check(self, scenario: WorkerScenario) -> ScenarioResult:
        """Run ``scenario`` and check the properties; raise :class:`InvariantViolation`."""
        self.scenarios += 1
        s = quote_ident(self.schema)
        specs = [
            {
                "identifier": TASK,
                "payload": {"i": i, "outcome": job.outcome},
                "queue_name": job.queue,
                "priority": job.priority,
                "max_attempts": 1,
            }
            for i, job in enumerate(scenario.jobs)
        ]
        added = run_sync_sql(
            self.dsn,
            f"delete from {s}._private_jobs",
            f"delete from {s}._private_job_queues",
            "select id, (payload->>'i')::int as i from "
            f"{s}.add_jobs(array(select x from json_populate_recordset(null::{s}.job_spec, "
            f"{_literal(json.dumps(specs))}::json) x))",
        )[-1]
        ids = {int(r["i"]): int(r["id"]) for r in added}  # type: ignore[attr-defined]
        reachable = Reachable.of(scenario, ids)
        stop = "starts" if scenario.stop_after_starts < reachable.min_starts else "quiet"
        record = _Record()
        reached = self._thread.run(self._run_pool, scenario, reachable, stop, ids, record)
        rows = run_sync_sql(
            self.dsn,
            f"select id, attempts, last_error, locked_at, locked_by from {s}._private_jobs",
            f"select queue_name from {s}._private_job_queues where locked_at is not null",
        )
        step = f"worker scenario {scenario}"
        if not reached:
            raise InvariantViolation(
                "worker_progress",
                step,
                f"shutdown point ({stop}) not reached in {self.progress_timeout} s: "
                f"{record.started} handler starts, startable jobs "
                f"{sorted(reachable.startable)}, fates {record.fates}",
            )
        jobs_left, queues_locked = cast("list[list[Any]]", rows)
        result = self._verify(scenario, reachable, stop, ids, record, jobs_left, queues_locked)
        self.totals["starts"] += result.starts
        self.totals[f"stop:{stop}"] += 1
        for fate in result.fates.values():
            self.totals[fate] += 1
        return result

    async def _run_pool(
        self,
        scenario: WorkerScenario,
        reachable: Reachable,
        stop: str,
        ids: dict[int, int],
        record: _Record,
    ) -> bool:
        """Run a pool to the shutdown point and shut it down; ``False``: never reached."""
        startable_ids = {ids[i] for i in reachable.startable}
        hangs = {ids[i] for i, job in enumerate(scenario.jobs) if job.outcome == "hang"}

        def at_shutdown_point() -> bool:
            if stop == "starts":
                return record.started >= scenario.stop_after_starts
            if reachable.saturated and record.hanging >= scenario.concurrency:
                return True  # every slot holds a hung handler: nothing else can start
            return all(
                job_id in record.fates or (job_id in hangs and job_id in record.starts)
                for job_id in startable_ids
            )

        async def handler(job: Any, ctx: Any) -> None:
            record.starts[job.id] = record.starts.get(job.id, 0) + 1
            record.started += 1
            begin = trio.current_time()
            outcome = job.payload["outcome"]
            try:
                if outcome == "hang":
                    record.hanging += 1
                    record.note()
                    await trio.sleep_forever()
                record.note()
                await trio.sleep(0.002)
                if outcome == "raise":
                    raise RuntimeError(f"boom {job.payload['i']}")
            except trio.Cancelled:
                record.fates[job.id] = "cancelled"
                raise
            except RuntimeError:
                record.fates[job.id] = "raise"
                record.note()
                raise
            finally:
                if job.queue_name is not None:
                    record.intervals.append((job.queue_name, job.id, begin, trio.current_time()))
            record.fates[job.id] = "ok"
            record.note()

        reached = True
        async with open_worker(
            self.dsn,
            {TASK: handler},
            schema=self.schema,
            concurrency=scenario.concurrency,
            batch_size=scenario.batch_size,
            poll_interval=0.05,
            grace=scenario.grace,
            migrate=False,  # the schema under test stays as it is
        ) as worker:
            with trio.move_on_after(self.progress_timeout) as waiting:
                while not at_shutdown_point():
                    await record.changed.wait()
            reached = not waiting.cancelled_caught
            await worker.shutdown(scenario.grace)
        return reached

    def _verify(
        self,
        scenario: WorkerScenario,
        reachable: Reachable,
        stop: str,
        ids: dict[int, int],
        record: _Record,
        rows: list[Any],
        locked_queues: list[Any],
    ) -> ScenarioResult:
        step = f"worker scenario {scenario}"
        left = {int(r["id"]): r for r in rows}
        for job_id, count in record.starts.items():
            if count > 1:
                raise InvariantViolation(
                    "worker_runs_once", step, f"job {job_id} started {count} times"
                )
        if stop == "starts" and record.started < scenario.stop_after_starts:
            raise InvariantViolation(
                "worker_progress",
                step,
                f"shut down after {record.started} starts, wanted {scenario.stop_after_starts}",
            )
        fates: dict[int, str] = {}
        for i, job_id in ids.items():
            fate = record.fates.get(job_id)
            fates[i] = fate or "never started"
            if job_id in record.starts and i not in reachable.startable:
                raise InvariantViolation(
                    "worker_progress",
                    step,
                    f"job {job_id} started although a hung job holds its queue "
                    f"{scenario.jobs[i].queue!r}",
                )
            if (
                fate is None
                and stop == "quiet"
                and not reachable.saturated
                and i in reachable.startable
            ):
                raise InvariantViolation(
                    "worker_progress",
                    step,
                    f"job {job_id} ({scenario.jobs[i].outcome}) could start and never did",
                )
            row = left.get(job_id)
            if fate == "ok":
                if row is not None:
                    raise InvariantViolation(
                        "worker_outcomes", step, f"job {job_id} succeeded but is still there"
                    )
                continue
            if row is None:
                raise InvariantViolation(
                    "no_job_disappears", step, f"job {job_id} ({fate or 'never started'}) vanished"
                )
            if row["locked_at"] is not None or row["locked_by"] is not None:
                raise InvariantViolation(
                    "job_locks", step, f"job {job_id} still locked by {row['locked_by']!r}"
                )
            want = {
                None: (0, None),
                "raise": (1, f"boom {i}"),
                "cancelled": (1, SHUTDOWN_MESSAGE),
            }[fate]
            got = (row["attempts"], row["last_error"])
            if got[0] != want[0] or not _same_error(got[1], want[1]):
                raise InvariantViolation(
                    "worker_outcomes",
                    step,
                    f"job {job_id} ({fate or 'never started'}): attempts/last_error {got}, "
                    f"expected {want}",
                )
        if locked_queues:
            raise InvariantViolation(
                "queue_lock_matches_jobs",
                step,
                f"queues still locked after shutdown: {[r['queue_name'] for r in locked_queues]}",
            )
        by_queue: dict[str, list[tuple[float, float, int]]] = {}
        for queue, job_id, begin, end in record.intervals:
            by_queue.setdefault(queue, []).append((begin, end, job_id))
        for queue, spans in by_queue.items():
            spans.sort()
            for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
                if begin < end:
                    raise InvariantViolation(
                        "named_queue_serial", step, f"jobs {a} and {b} of {queue!r} overlapped"
                    )
        return ScenarioResult(
            fates=fates,
            rows={i: (dict(left[j]) if j in left else None) for i, j in ids.items()},
            starts=record.started,
            stop=stop,
        )


def _same_error(got: str | None, want: str | None) -> bool:
    """The first line of ``last_error`` is the message (a traceback may follow)."""
    if want is None or got is None:
        return got == want
    return got.split("\n", 1)[0] == want


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@contextmanager
def open_worker_harness(
    dsn: str, schema: str = "graphile_worker", *, progress_timeout: float = 30.0
) -> Iterator[WorkerHarness]:
    """A background trio thread for running worker scenarios against ``schema``.

    Args:
      dsn: a database with the schema migrated.
      schema: the schema.
      progress_timeout: how long a scenario may take to reach its shutdown point, in
        seconds; not reaching it is a ``worker_progress`` violation (a safety net against
        a pool that stalls, not a way to end a scenario).
    """
    thread = _TrioThread()
    thread.start()
    try:
        yield WorkerHarness(dsn, schema, thread, progress_timeout=progress_timeout)
    finally:
        thread.close()
