"""Typed records: :class:`Job` (a row of ``_private_jobs``) and :class:`JobSpec` (a job to add)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

#: Any value :func:`json.dumps` turns into JSON: what a job payload may be.
JSONValue: TypeAlias = Any

_loads = json.loads


@dataclass(frozen=True, slots=True)
class Job:
    """A job as stored in ``<schema>._private_jobs``, with its task and queue names resolved.

    Instances are immutable snapshots: changing the database does not change them.

    Attributes:
      id: the job's id (bigint, never reused).
      task_identifier: the name of the task that runs the job.
      payload: the decoded JSON payload (any JSON value; ``{}`` when added without one).
      queue_name: the named queue the job runs in serially, or ``None``.
      priority: lower numbers run first; may be negative.
      run_at: the earliest time the job may run (timezone-aware).
      attempts: how many times the job has been claimed (``attempts >= max_attempts``
        means permanently failed).
      max_attempts: the attempt limit.
      key: the job key (``job_key``), or ``None``.
      flags: the job's flag names, or ``None`` when it has none.
      last_error: the message of the last failure, or ``None``.
      created_at: when the row was inserted.
      updated_at: when the row was last changed by an add or admin operation.
      locked_at: when a worker claimed it, or ``None``.
      locked_by: the pool id holding the lock, or ``None``.
      revision: how many times an add with the same key has hit this row.
    """

    id: int
    task_identifier: str
    payload: JSONValue
    queue_name: str | None
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    key: str | None
    flags: frozenset[str] | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    locked_at: datetime | None
    locked_by: str | None
    revision: int

    @classmethod
    def from_record(
        cls,
        row: asyncpg.Record | Mapping[str, Any],
        task_identifier: str,
        queue_name: str | None,
    ) -> Job:
        """Build a job from a ``_private_jobs`` row (an asyncpg ``Record`` or a mapping).

        The row needs the columns ``id, payload, priority, run_at, attempts,
        max_attempts, key, flags, last_error, created_at, updated_at, locked_at,
        locked_by, revision``. ``payload`` (json) and ``flags`` (jsonb) are expected as
        JSON text, which is what asyncpg returns without a custom type codec. The row's
        ``task_id``/``job_queue_id`` are not looked at: the caller resolves them to names
        (usually from a cache), which keeps this constructor free of I/O.

        Args:
          row: the database row.
          task_identifier: the name behind the row's ``task_id``.
          queue_name: the name behind the row's ``job_queue_id`` (``None`` without a queue).
        """
        flags_text = row["flags"]
        return cls(
            row["id"],
            task_identifier,
            _loads(row["payload"]),
            queue_name,
            row["priority"],
            row["run_at"],
            row["attempts"],
            row["max_attempts"],
            row["key"],
            None if flags_text is None else frozenset(_loads(flags_text)),
            row["last_error"],
            row["created_at"],
            row["updated_at"],
            row["locked_at"],
            row["locked_by"],
            row["revision"],
        )

    @classmethod
    def from_claim(cls, row: asyncpg.Record, task_identifier: str) -> Job:
        """Build a job from a row returned by the worker's claim (``WorkerQueries.claim``)."""
        return cls.from_record(row, task_identifier, row["queue_name"])

    @property
    def is_permanently_failed(self) -> bool:
        """Whether the job has used up its attempts (it will not be claimed again)."""
        return self.attempts >= self.max_attempts


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job for :meth:`kongtask.Client.add_jobs` (the ``<schema>.job_spec`` type).

    ``None`` means "the database default" for every option: payload ``{}``, no queue,
    ``run_at`` now, 25 attempts, no key, priority 0, no flags. Values are checked when
    the spec is sent, before anything reaches the database.

    Attributes:
      identifier: the task name (at most 128 characters).
      payload: any JSON-serialisable value.
      queue_name: a named queue (jobs in one queue run one at a time), at most 128 characters.
      run_at: a timezone-aware datetime; naive datetimes are rejected.
      max_attempts: at least 1, at most 32767.
      job_key: a unique key (1 to 512 characters) for replacing or de-duplicating jobs.
      priority: -32768 to 32767; lower runs first.
      flags: flag names; workers can be told to skip jobs with some flags.
    """

    identifier: str
    payload: JSONValue = None
    queue_name: str | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    priority: int | None = None
    flags: Iterable[str] | None = None
