"""Worker-level lifecycle properties: real :func:`kongtask.open_worker` pools, random mixes.

A :class:`WorkerScenario` is a list of jobs (queue, handler outcome), a concurrency, a
point at which the pool is shut down, and a grace period. :meth:`WorkerHarness.check`
adds the jobs, runs a pool until the shutdown point, shuts it down, and checks what must
hold afterwards:

- every job ends exactly once in the state its handler's fate predicts: returned ->
  deleted; raised -> kept, attempts 1, its message; cancelled at shutdown -> kept,
  attempts 1, the shutdown message; never started -> kept, attempts 0, untouched;
- no job is lost across the shutdown, none runs twice, no lock is left behind;
- a named queue never runs two of its jobs at once.

The pool runs in a background trio thread (STACK.md P9); the checks read the database
from the calling thread.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from hypothesis import strategies as st

from .._config import quote_ident
from ._model import InvariantViolation
from ._postgres import run_sync_sql

T = TypeVar("T")

OUTCOMES = ("ok", "raise", "hang")
TASK = "lifecycle_worker_prop"
#: What a job cancelled by a shutdown is failed with (SCHEMA.md §3.5).
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
      stop_after_starts: shut down once this many handlers have started (or after
        ``patience`` seconds, whichever comes first).
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


@dataclass
class _Record:
    starts: dict[int, int] = field(default_factory=dict)  # job id -> times started
    fates: dict[int, str] = field(default_factory=dict)  # job id -> ok/raise/cancelled
    intervals: list[tuple[str, int, float, float]] = field(default_factory=list)
    started: int = 0


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
    """

    def __init__(self, dsn: str, schema: str, thread: _TrioThread, *, patience: float) -> None:
        self.dsn = dsn
        self.schema = schema
        self.patience = patience
        self._thread = thread
        self.scenarios = 0

    def check(self, scenario: WorkerScenario) -> None:
        """Run ``scenario`` and check the properties; raise :class:`InvariantViolation`."""
        self.scenarios += 1
        s = quote_ident(self.schema)
        specs = [
            {
                "identifier": TASK,
                "payload": {"i": i, "outcome": job.outcome},
                "queue_name": job.queue,
                "priority": job.priority,
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
        record = _Record()
        self._thread.run(self._run_pool, scenario, record)
        rows = run_sync_sql(
            self.dsn,
            f"select id, attempts, last_error, locked_at, locked_by from {s}._private_jobs",
            f"select queue_name from {s}._private_job_queues where locked_at is not null",
        )
        self._verify(scenario, ids, record, rows[0], rows[1])  # type: ignore[arg-type]

    async def _run_pool(self, scenario: WorkerScenario, record: _Record) -> None:
        from .._worker import open_worker

        reached = trio.Event()
        if scenario.stop_after_starts == 0:
            reached.set()

        async def handler(job: Any, ctx: Any) -> None:
            record.starts[job.id] = record.starts.get(job.id, 0) + 1
            record.started += 1
            if record.started >= scenario.stop_after_starts:
                reached.set()
            begin = trio.current_time()
            outcome = job.payload["outcome"]
            try:
                await trio.sleep(0.002)
                if outcome == "hang":
                    await trio.sleep_forever()
                if outcome == "raise":
                    raise RuntimeError(f"boom {job.payload['i']}")
            except trio.Cancelled:
                record.fates[job.id] = "cancelled"
                raise
            except RuntimeError:
                record.fates[job.id] = "raise"
                raise
            finally:
                if job.queue_name is not None:
                    record.intervals.append((job.queue_name, job.id, begin, trio.current_time()))
            record.fates[job.id] = "ok"

        async with open_worker(
            self.dsn,
            {TASK: handler},
            schema=self.schema,
            concurrency=scenario.concurrency,
            batch_size=scenario.batch_size,
            poll_interval=0.05,
            grace=scenario.grace,
        ) as worker:
            with trio.move_on_after(self.patience):
                await reached.wait()
            await worker.shutdown(scenario.grace)

    def _verify(
        self,
        scenario: WorkerScenario,
        ids: dict[int, int],
        record: _Record,
        rows: list[Any],
        locked_queues: list[Any],
    ) -> None:
        step = f"worker scenario {scenario}"
        left = {int(r["id"]): r for r in rows}
        for job_id, count in record.starts.items():
            if count > 1:
                raise InvariantViolation(
                    "worker_runs_once", step, f"job {job_id} started {count} times"
                )
        for i, job_id in ids.items():
            fate = record.fates.get(job_id)
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


def _same_error(got: str | None, want: str | None) -> bool:
    """The first line of ``last_error`` is the message (a traceback may follow)."""
    if want is None or got is None:
        return got == want
    return got.split("\n", 1)[0] == want


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@contextmanager
def open_worker_harness(
    dsn: str, schema: str = "graphile_worker", *, patience: float = 1.0
) -> Iterator[WorkerHarness]:
    """A background trio thread for running worker scenarios against ``schema``.

    Args:
      dsn: a database with the schema migrated.
      schema: the schema.
      patience: the longest a scenario waits for its shutdown point, in seconds (keep it
        below the first retry delay, 2.7 s, so no failed job can run twice legitimately).
    """
    thread = _TrioThread()
    thread.start()
    try:
        yield WorkerHarness(dsn, schema, thread, patience=patience)
    finally:
        thread.close()
