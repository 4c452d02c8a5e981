"""The pure-Python model of a graphile-worker schema that the lifecycle machine checks.

Each transition here is written from the contract in docs/design/database.md (its "SQL
functions" for the functions, "Claiming" and the sections after it for the worker
protocol), never from upstream code. Given the transaction's ``now()``, the model
predicts every column of every row exactly, except the few the specification leaves
open (those are marked "adopted": the model takes the database's value).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

STALE_AFTER = timedelta(hours=4)
DEFAULT_MAX_ATTEMPTS = 25
MANUAL_FAIL_MESSAGE = "Manually marked as failed"
#: The columns of ``_private_jobs`` the model predicts, in table order.
JOB_FIELDS = (
    "id",
    "task",
    "queue",
    "payload",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "last_error",
    "created_at",
    "updated_at",
    "key",
    "locked_at",
    "locked_by",
    "revision",
    "flags",
)


class InvariantViolation(AssertionError):
    """A lifecycle invariant does not hold.

    Attributes:
      invariant: the invariant's name, a key of :data:`kongtask.testing.lifecycle.INVARIANTS`.
      step: the step after which it was found (e.g. ``"claim"``).
      detail: what was expected and what the database holds.
    """

    def __init__(self, invariant: str, step: str, detail: str) -> None:
        super().__init__(f"[{invariant}] after {step}: {detail}")
        self.invariant = invariant
        self.step = step
        self.detail = detail


@dataclass
class MJob:
    """A job row as the model predicts it (``task``/``queue`` by name)."""

    id: int
    task: str
    queue: str | None
    payload: Any
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime | None  # None: not predicted (adopted from the database)
    key: str | None
    locked_at: datetime | None
    locked_by: str | None
    revision: int
    flags: frozenset[str] | None
    #: The model's own creation order (the order of the specs that added the jobs). Rules
    #: pick jobs in this order, never by id: which id the database gives which row of one
    #: statement is its choice, and a replayed example must pick the same jobs.
    ordinal: int = field(default=0, compare=False)

    @property
    def is_available(self) -> bool:
        return self.locked_at is None and self.attempts < self.max_attempts

    def unlocked_or_stale(self, now: datetime) -> bool:
        """Whether the admin functions may act on the job (§3: stale locks count as unlocked)."""
        return self.locked_at is None or self.locked_at < now - STALE_AFTER

    def sort_key(self) -> tuple[int, datetime]:
        return (self.priority, self.run_at)


@dataclass
class MQueue:
    name: str
    locked_at: datetime | None = None
    locked_by: str | None = None


@dataclass(frozen=True)
class Spec:
    """A job to add, with ``run_at`` already absolute (``None`` = the database's ``now()``)."""

    identifier: str
    payload: Any = None
    queue_name: str | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    priority: int | None = None
    flags: tuple[str, ...] | None = None

    def flag_set(self) -> frozenset[str] | None:
        """The flags as a set, or ``None`` when the spec has none (as the row stores it)."""
        return frozenset(self.flags) if self.flags else None


@dataclass
class Pool:
    """A worker pool slot: its current pool id and the jobs it believes it is running."""

    slot: int
    incarnation: int = 0
    held: list[int] = field(default_factory=list)

    @property
    def pool_id(self) -> str:
        return f"pool-{self.slot:02x}{self.incarnation:016x}"


@dataclass
class AddOutcome:
    """What an add predicts: rows updated in place (by id), specs that insert, notifications."""

    updated: list[int]
    inserts: list[tuple[int, Spec]]  # (spec index, spec)
    notify: list[str | int]  # counts, or "" for an empty payload


def backoff(attempts: int) -> timedelta:
    """The retry delay of §5.5: ``exp(least(attempts, 10))`` seconds."""
    return timedelta(seconds=math.exp(min(attempts, 10)))


def same_json(a: Any, b: Any) -> bool:
    return bool(json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True))


class Model:
    """What must be true of the schema's rows, updated by the transitions below."""

    def __init__(self, clock: datetime, pools: int) -> None:
        self.clock = clock
        self.jobs: dict[int, MJob] = {}
        self.queues: dict[str, MQueue] = {}
        self.tasks: set[str] = set()
        self.registered: dict[str, int] = {}  # identifiers a worker registered -> task id
        self.pools = [Pool(slot) for slot in range(pools)]
        self.dead_pool_ids: list[str] = []
        # Pools declared dead (force-unlocked, or crashed with stale locks) that still
        # believe they run some jobs: the machine may let them act late ("zombies").
        self.zombies: list[Pool] = []
        self.seq: dict[str, int] = {"tasks": 0, "queues": 0}
        self.created = 0  # jobs made by new_job so far: the next ordinal

    # ----- helpers -------------------------------------------------------------------
    def by_key(self, key: str) -> MJob | None:
        for job in self.jobs.values():
            if job.key == key:
                return job
        return None

    def kill_pool(self, pool: Pool) -> None:
        """The pool crashed (or was declared dead): it restarts with a new pool id.

        The old incarnation is kept as a zombie that may still finish its jobs late.
        """
        self.dead_pool_ids.append(pool.pool_id)
        if pool.held:
            self.zombies = [
                *self.zombies[-3:],
                Pool(pool.slot, pool.incarnation, list(pool.held)),
            ]
        pool.held = []
        pool.incarnation += 1

    def forget(self, ids: Iterable[int]) -> None:
        """Jobs deleted: nobody runs them any more."""
        gone = set(ids)
        for pool in [*self.pools, *self.zombies]:
            pool.held = [i for i in pool.held if i not in gone]

    def ensure_names(self, specs: Iterable[Spec]) -> tuple[int, int]:
        """Task and queue rows an add creates; returns how many of each are new."""
        new_tasks = new_queues = 0
        for spec in specs:
            if spec.identifier not in self.tasks:
                self.tasks.add(spec.identifier)
                new_tasks += 1
            if spec.queue_name is not None and spec.queue_name not in self.queues:
                self.queues[spec.queue_name] = MQueue(spec.queue_name)
                new_queues += 1
        return new_tasks, new_queues

    def job_ids(self) -> list[int]:
        """The jobs' ids in creation order (see :attr:`MJob.ordinal`)."""
        return sorted(self.jobs, key=lambda i: self.jobs[i].ordinal)

    def new_job(self, job_id: int, spec: Spec, now: datetime) -> MJob:
        self.created += 1
        return MJob(
            id=job_id,
            task=spec.identifier,
            queue=spec.queue_name,
            payload={} if spec.payload is None else spec.payload,
            priority=0 if spec.priority is None else spec.priority,
            run_at=now if spec.run_at is None else spec.run_at,
            attempts=0,
            max_attempts=DEFAULT_MAX_ATTEMPTS if spec.max_attempts is None else spec.max_attempts,
            last_error=None,
            created_at=now,
            updated_at=now,
            key=spec.job_key,
            locked_at=None,
            locked_by=None,
            revision=0,
            flags=spec.flag_set(),
            ordinal=self.created,
        )

    # ----- SQL API (§3) --------------------------------------------------------------
    def add_jobs(self, specs: Sequence[Spec], preserve_run_at: bool, now: datetime) -> AddOutcome:
        """§3.1 steps 3 and 5: retire unavailable keyed rows, then update or insert."""
        for spec in specs:
            if spec.job_key is None:
                continue
            old = self.by_key(spec.job_key)
            if old is not None and not old.is_available:
                old.key = None
                old.attempts = old.max_attempts
                old.updated_at = now
        updated: list[int] = []
        inserts: list[tuple[int, Spec]] = []
        for index, spec in enumerate(specs):
            old = self.by_key(spec.job_key) if spec.job_key is not None else None
            if old is None:
                inserts.append((index, spec))
                continue
            assert old.locked_at is None  # retired above otherwise (no race in one session)
            if isinstance(old.payload, list) and isinstance(spec.payload, list):
                old.payload = old.payload + spec.payload
            else:
                old.payload = {} if spec.payload is None else spec.payload
            if not (preserve_run_at and old.attempts == 0):
                old.run_at = now if spec.run_at is None else spec.run_at
            old.task = spec.identifier
            old.queue = spec.queue_name
            old.max_attempts = (
                DEFAULT_MAX_ATTEMPTS if spec.max_attempts is None else spec.max_attempts
            )
            old.priority = 0 if spec.priority is None else spec.priority
            old.flags = spec.flag_set()
            old.revision += 1
            old.attempts = 0
            old.last_error = None
            old.updated_at = now
            updated.append(old.id)
        notify: list[str | int] = [len(specs)] if specs else [""]
        return AddOutcome(updated, inserts, notify)

    def add_job_unsafe_dedupe(self, spec: Spec, now: datetime) -> AddOutcome:
        """§3.2 ``unsafe_dedupe``: any row with the key gets revision+1, nothing else."""
        assert spec.job_key is not None
        old = self.by_key(spec.job_key)
        if old is not None:
            old.revision += 1
            old.updated_at = now
            return AddOutcome([old.id], [], [])
        return AddOutcome([], [(0, spec)], [1])

    def remove_job(self, key: str | None, now: datetime) -> tuple[MJob | None, list[str | int]]:
        """§3.3 ``remove_job``: delete if unlocked or stale, else retire."""
        if key is None:
            return None, []
        job = self.by_key(key)
        if job is None:
            return None, []
        if job.unlocked_or_stale(now):
            del self.jobs[job.id]
            self.forget([job.id])
            return job, [-1]
        job.key = None
        job.attempts = job.max_attempts
        job.updated_at = now
        return job, []

    def admin_targets(self, ids: Iterable[int], now: datetime) -> list[MJob]:
        return [
            self.jobs[i]
            for i in sorted(set(ids))
            if i in self.jobs and self.jobs[i].unlocked_or_stale(now)
        ]

    def complete_jobs(self, ids: Iterable[int], now: datetime) -> list[MJob]:
        done = self.admin_targets(ids, now)
        for job in done:
            del self.jobs[job.id]
        self.forget(job.id for job in done)
        return done

    def permanently_fail_jobs(
        self, ids: Iterable[int], message: str | None, now: datetime
    ) -> list[MJob]:
        hit = self.admin_targets(ids, now)
        for job in hit:
            job.last_error = MANUAL_FAIL_MESSAGE if message is None else message
            job.attempts = job.max_attempts
            job.updated_at = now
        return hit

    def reschedule_jobs(
        self,
        ids: Iterable[int],
        run_at: datetime | None,
        priority: int | None,
        attempts: int | None,
        max_attempts: int | None,
        now: datetime,
    ) -> list[MJob]:
        hit = self.admin_targets(ids, now)
        for job in hit:
            if run_at is not None:
                job.run_at = run_at
            if priority is not None:
                job.priority = priority
            if attempts is not None:
                job.attempts = attempts
            if max_attempts is not None:
                job.max_attempts = max_attempts
            job.updated_at = now
        return hit

    def force_unlock_workers(self, pool_ids: Iterable[str]) -> None:
        ids = set(pool_ids)
        for job in self.jobs.values():
            if job.locked_by in ids:
                job.locked_at = job.locked_by = None
        for queue in self.queues.values():
            if queue.locked_by in ids:
                queue.locked_at = queue.locked_by = None
        for pool in self.pools:
            if pool.pool_id in ids:
                self.kill_pool(pool)

    # ----- worker protocol (§5) ------------------------------------------------------
    def eligible(
        self,
        task_ids: Iterable[int],
        forbidden: Sequence[str] | None,
        now: datetime,
        row_locked_jobs: Iterable[int] = (),
        row_locked_queues: Iterable[str] = (),
    ) -> list[MJob]:
        """The jobs a claim at ``now`` may take (§5.3 step 1)."""
        tasks = {name for name, tid in self.registered.items() if tid in set(task_ids)}
        locked_jobs = set(row_locked_jobs)
        locked_queues = set(row_locked_queues)
        out = []
        for job in self.jobs.values():
            if not job.is_available or job.run_at > now or job.task not in tasks:
                continue
            if forbidden and job.flags and job.flags & set(forbidden):
                continue
            if job.id in locked_jobs:
                continue
            if job.queue is not None:
                queue = self.queues[job.queue]
                if queue.locked_at is not None or job.queue in locked_queues:
                    continue
            out.append(job)
        return out

    def tie_breaking_locks(
        self,
        task_ids: Iterable[int],
        forbidden: Sequence[str] | None,
        now: datetime,
        limit: int,
        row_locked_jobs: Iterable[int] = (),
        row_locked_queues: Iterable[str] = (),
    ) -> list[int]:
        """The jobs to row-lock as well, so that a claim's result is determined (§5.3).

        A claim orders by ``(priority, run_at)``: where its limit cuts a group of equal
        keys, which members it takes depends on the rows' physical order (where the table
        put them, which vacuum and page pruning decide), and of a named queue's equal
        first jobs it takes the lowest id (which the database chose). A replayed example
        would then take other jobs, and hypothesis could not replay it. Row-locking the
        members that are not the first by :attr:`MJob.ordinal` (SKIP LOCKED passes over
        them) leaves the claim one possible answer. Applied until nothing is left open: a
        locked job lets the next ones in, which may tie again.
        """
        task_ids = list(task_ids)
        locked = list(row_locked_jobs)
        given = len(locked)
        queues = list(row_locked_queues)
        while True:
            eligible = self.eligible(task_ids, forbidden, now, locked, queues)
            queued = sorted((j for j in eligible if j.queue is not None), key=MJob.sort_key)
            unqueued = sorted((j for j in eligible if j.queue is None), key=MJob.sort_key)
            taken_queued, losers = _cut(queued, limit)
            taken_unqueued, more = _cut(unqueued, limit)
            losers += more
            firsts: dict[str, MJob] = {}
            for job in sorted(taken_queued, key=lambda j: (*j.sort_key(), j.ordinal)):
                assert job.queue is not None
                first = firsts.setdefault(job.queue, job)
                if first is not job and job.sort_key() == first.sort_key():
                    losers.append(job)
            if not losers:
                candidates = sorted([*firsts.values(), *taken_unqueued], key=MJob.sort_key)
                losers = _cut(candidates, limit)[1]
            if not losers:
                return locked[given:]
            locked += [j.id for j in losers]

    def claim(self, pool: Pool, ids: Sequence[int], now: datetime) -> None:
        for job_id in ids:
            job = self.jobs[job_id]
            job.attempts += 1
            job.locked_at = now
            job.locked_by = pool.pool_id
            if job.queue is not None:
                self.queues[job.queue].locked_at = now
                self.queues[job.queue].locked_by = pool.pool_id
            pool.held.append(job_id)

    def _unlock_queues(self, pool_id: str, jobs: Iterable[MJob]) -> None:
        for job in jobs:
            if job.queue is not None and self.queues[job.queue].locked_by == pool_id:
                self.queues[job.queue].locked_at = self.queues[job.queue].locked_by = None

    def worker_complete(self, pool: Pool, ids: Sequence[int]) -> None:
        """§5.4: delete by id (no ``locked_by`` check); unlock own queue rows of deleted jobs."""
        deleted = [self.jobs.pop(i) for i in ids if i in self.jobs]
        self._unlock_queues(pool.pool_id, deleted)
        self.forget(ids)

    def worker_fail(
        self,
        pool: Pool,
        ids: Sequence[int],
        messages: Sequence[str],
        payloads: Sequence[Any],
        now: datetime,
    ) -> None:
        """§5.5: only rows still ``locked_by = P``; attempts unchanged; backoff from now."""
        hit = []
        for job_id, message, payload in zip(ids, messages, payloads, strict=True):
            job = self.jobs.get(job_id)
            if job is None or job.locked_by != pool.pool_id:
                continue
            job.last_error = message
            job.run_at = max(now, job.run_at) + backoff(job.attempts)
            job.locked_at = job.locked_by = None
            if payload is not None:
                job.payload = payload
            hit.append(job)
        self._unlock_queues(pool.pool_id, hit)
        pool.held = [i for i in pool.held if i not in set(ids)]

    def worker_return(self, pool: Pool, ids: Sequence[int]) -> None:
        """§5.6: rows still ``locked_by = P`` lose the lock and get attempts - 1 (not below
        0) unless an add or admin function changed them after the claim (their updated_at
        is not older than locked_at): a removed or replaced job must not run again."""
        hit = []
        for job_id in ids:
            job = self.jobs.get(job_id)
            if job is None or job.locked_by != pool.pool_id:
                continue
            assert job.updated_at is not None
            assert job.locked_at is not None
            if job.updated_at < job.locked_at:
                job.attempts = max(0, job.attempts - 1)
            job.locked_at = job.locked_by = None
            job.updated_at = None  # §5.6 does not say; adopted
            hit.append(job)
        self._unlock_queues(pool.pool_id, hit)
        pool.held = [i for i in pool.held if i not in set(ids)]

    def make_stale(self, pool: Pool, locked_at: datetime) -> None:
        """The pool crashed long ago: its locks carry an old ``locked_at``."""
        for job in self.jobs.values():
            if job.locked_by == pool.pool_id:
                job.locked_at = locked_at
        for queue in self.queues.values():
            if queue.locked_by == pool.pool_id:
                queue.locked_at = locked_at
        self.kill_pool(pool)

    def sweep(self, now: datetime) -> None:
        """§5.7: free locks older than 4 hours; ``run_at := greatest(run_at, now)``."""
        for job in self.jobs.values():
            if job.locked_at is not None and job.locked_at < now - STALE_AFTER:
                job.locked_at = job.locked_by = None
                job.run_at = max(job.run_at, now)
                job.updated_at = None  # §5.7 does not say; adopted
        for queue in self.queues.values():
            if queue.locked_at is not None and queue.locked_at < now - STALE_AFTER:
                queue.locked_at = queue.locked_by = None


def describe_job(job: MJob | Mapping[str, Any]) -> str:
    data = {f: getattr(job, f) for f in JOB_FIELDS} if isinstance(job, MJob) else dict(job)
    return ", ".join(f"{k}={_short(v)}" for k, v in data.items())


def _short(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, frozenset):
        return "{" + ",".join(sorted(value)) + "}"
    return repr(value)


def clone(job: MJob) -> MJob:
    return replace(job)


def _cut(ordered: Sequence[MJob], limit: int) -> tuple[list[MJob], list[MJob]]:
    """The first ``limit`` of ``ordered`` (sorted by key), and, where the limit cuts a group
    of equal keys, that group's members past the cut in creation order (else none)."""
    if len(ordered) <= limit:
        return list(ordered), []
    key = ordered[limit - 1].sort_key() if limit > 0 else None
    if key is None or ordered[limit].sort_key() != key:
        return list(ordered[:limit]), []
    before = [j for j in ordered[:limit] if j.sort_key() != key]
    group = sorted((j for j in ordered if j.sort_key() == key), key=lambda j: j.ordinal)
    kept = group[: limit - len(before)]
    return [*before, *kept], group[len(kept) :]
