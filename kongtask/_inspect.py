"""The inspection API: what the queue holds and which pools work on it.

Each call is one statement on graphile-worker 0.18's tables, so it works on any such
database, including one that only Node workers use. The derived job states are listed
in :mod:`kongtask._inspect_sql`; ages are measured with the server's clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    import asyncpg

from ._errors import ConfigError
from ._inspect_sql import (
    JOB_STATES,
    LIST_FILTERS,
    ROW_DECIDED_STATES,
    InspectQueries,
    JobState,
)
from ._job import Job
from ._validate import BIGINT_MAX, BIGINT_MIN, check_int

#: The most rows one page of :meth:`Client.list_jobs` may hold.
MAX_PAGE_SIZE: Final = 10_000


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """How many jobs of one task in one queue are in each derived state.

    Attributes:
      task: the task identifier.
      queue: the named queue, or ``None`` for jobs without one.
      ready: due, and claimable now.
      waiting_on_queue: due, but their named queue is locked by a running job.
      scheduled: ``run_at`` in the future, never attempted.
      retrying: failed before, ``run_at`` (the backoff) in the future.
      running: locked by a pool (which may be dead: see :meth:`Client.list_pools`).
      permanently_failed: ``attempts >= max_attempts`` and not locked.
      oldest_ready_age: seconds since the oldest ready job became due, or ``None``.
      oldest_lock_age: seconds since the oldest running job was locked, or ``None``.
    """

    task: str
    queue: str | None
    ready: int
    waiting_on_queue: int
    scheduled: int
    retrying: int
    running: int
    permanently_failed: int
    oldest_ready_age: float | None
    oldest_lock_age: float | None

    def count(self, state: JobState) -> int:
        """The number of jobs in ``state``."""
        value: int = getattr(self, state)
        return value


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job of a listing: the row, its derived state and how long it has been locked.

    Attributes:
      job: the job as stored.
      state: its derived state.
      lock_age: seconds since it was locked, or ``None`` when it is not running.
    """

    job: Job
    state: JobState
    lock_age: float | None


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A worker pool seen in the database.

    Attributes:
      kind: ``"kongtask"`` for a pool whose id carries kongtask's marker (its liveness
        can be checked), ``"unmarked"`` for any other (Node graphile-worker, or kongtask
        with ``prepared_statements=False``), known only by the rows it locks.
      pool_id: the pool id, or ``None`` for a live kongtask pool that locks no row yet
        (only the last 8 hex digits of its id, ``id_suffix``, are known then).
      id_suffix: the last 8 hex digits of a kongtask pool's id, else ``None``.
      alive: ``True`` while a session holds the kongtask pool's liveness lock, ``False``
        when it holds none (the pool is dead), ``None`` for unmarked pools (unknown).
      jobs: jobs it has locked.
      queues: named queues it has locked.
      oldest_lock_age: seconds since its oldest lock was taken, or ``None``.
      connected_at: when the session holding the liveness lock connected, or ``None``.
      client_addr: that session's client address, when the server shows it.
    """

    kind: str
    pool_id: str | None
    id_suffix: str | None
    alive: bool | None
    jobs: int
    queues: int
    oldest_lock_age: float | None
    connected_at: datetime | None
    client_addr: str | None


def queue_counts_from_rows(rows: Iterable[asyncpg.Record]) -> list[QueueCounts]:
    """Build the counts from the rows of ``InspectQueries.counts``."""
    result = []
    for row in rows:
        r = row
        result.append(
            QueueCounts(
                task=cast(str, r["task"]) if r["task"] is not None else "<unknown task>",
                queue=cast(str | None, r["queue"]),
                ready=cast(int, r["ready"]),
                waiting_on_queue=cast(int, r["waiting_on_queue"]),
                scheduled=cast(int, r["scheduled"]),
                retrying=cast(int, r["retrying"]),
                running=cast(int, r["running"]),
                permanently_failed=cast(int, r["permanently_failed"]),
                oldest_ready_age=cast(float | None, r["oldest_ready_age"]),
                oldest_lock_age=cast(float | None, r["oldest_lock_age"]),
            )
        )
    return result


def pools_from_rows(rows: Iterable[asyncpg.Record]) -> list[PoolInfo]:
    """Build the pools from the rows of ``InspectQueries.pools``."""
    result = []
    for row in rows:
        r = row
        result.append(
            PoolInfo(
                kind=cast(str, r["kind"]),
                pool_id=cast(str | None, r["pool_id"]),
                id_suffix=cast(str | None, r["id_suffix"]),
                alive=cast(bool | None, r["alive"]),
                jobs=cast(int, r["jobs"]),
                queues=cast(int, r["queues"]),
                oldest_lock_age=cast(float | None, r["oldest_lock_age"]),
                connected_at=cast(datetime | None, r["connected_at"]),
                client_addr=cast(str | None, r["client_addr"]),
            )
        )
    return result


def job_infos_from_rows(rows: Iterable[asyncpg.Record]) -> list[JobInfo]:
    """Build the listing from the rows of :meth:`InspectQueries.list_jobs`."""
    result = []
    for row in rows:
        r = row
        task = r["task_identifier"]
        job = Job.from_record(
            r,
            cast(str, task) if task is not None else f"<task id {r['task_id']}>",
            cast(str | None, r["queue_name"]),
        )
        result.append(JobInfo(job, cast(JobState, r["state"]), cast(float | None, r["lock_age"])))
    return result


def _names(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{what} must be names (strings), not {type(name).__name__}")
    return names


def _optional_id(value: object, what: str) -> int | None:
    return None if value is None else check_int(value, what, BIGINT_MIN, BIGINT_MAX)


def list_jobs_statement(
    queries: InspectQueries,
    *,
    ids: Iterable[int] | None = None,
    tasks: str | Iterable[str] | None,
    queues: str | Iterable[str] | None,
    states: str | Iterable[str] | None,
    key: str | None,
    min_id: int | None,
    max_id: int | None,
    after_id: int | None,
    limit: int,
    descending: bool,
) -> tuple[str, Sequence[object]]:
    """Check the listing's arguments and return its statement and parameters."""
    state_list = _names(states, "states")
    if state_list is not None:
        unknown = [s for s in state_list if s not in JOB_STATES]
        if unknown:
            raise ConfigError(
                f"unknown job state(s) {', '.join(map(repr, unknown))}; "
                f"the states are {', '.join(JOB_STATES)}"
            )
    if key is not None and not isinstance(key, str):
        raise ConfigError(f"key must be a string, not {type(key).__name__}")
    check_int(limit, "limit", 1, MAX_PAGE_SIZE)
    if not isinstance(descending, bool):
        raise ConfigError("descending must be a bool")
    id_list = None
    if ids is not None:
        if isinstance(ids, int | str):
            raise ConfigError("ids must be a collection of job ids")
        id_list = []
        for job_id in ids:
            checked = _optional_id(job_id, "each id")
            if checked is None:
                raise ConfigError("ids must not contain None")
            id_list.append(checked)
    values: dict[str, object] = {
        "ids": id_list,
        "tasks": _names(tasks, "tasks"),
        "queues": _names(queues, "queues"),
        "states": state_list,
        "key": key,
        "min_id": _optional_id(min_id, "min_id"),
        "max_id": _optional_id(max_id, "max_id"),
        "after_id": _optional_id(after_id, "after_id"),
    }
    chosen = tuple(sorted(set(cast(list[JobState], state_list or []))))
    if chosen and ROW_DECIDED_STATES.issuperset(chosen):
        values["states"] = None  # their row conditions (added for ``chosen``) are exact
    given = tuple(name for name in LIST_FILTERS if values[name] is not None)
    query = queries.list_jobs(given, descending, chosen)
    return query, [limit, *(values[name] for name in given)]
