"""Typed records: :class:`Job` (a row of ``_private_jobs``) and :class:`JobSpec` (a job to add)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

import asyncpg

#: Any value :func:`json.dumps` turns into JSON: what a job payload may be.
JSONValue: TypeAlias = Any

_loads = json.loads

_FIELDS: Final = (
    "id",
    "task_identifier",
    "payload",
    "queue_name",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "key",
    "flags",
    "last_error",
    "created_at",
    "updated_at",
    "locked_at",
    "locked_by",
    "revision",
)

_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: How a job reads a timestamp later than a Python datetime can hold (after year 9999 in
#: UTC, ``infinity`` included): 9999-12-31 23:59:59.999999 UTC.
TIMESTAMP_MAX: Final = datetime.max.replace(tzinfo=UTC)
#: How a job reads a timestamp earlier than a Python datetime can hold (before year 1 in
#: UTC, BC dates and ``-infinity`` included): 0001-01-01 00:00:00 UTC.
TIMESTAMP_MIN: Final = datetime.min.replace(tzinfo=UTC)
# What the SQL sends for such values (kongtask._sql._epoch_us_expr).
_INT8_MAX: Final = 2**63 - 1
_INT8_MIN: Final = -(2**63)

# Job._cache: the lazily decoded attributes' places, and the mark of "not yet decoded".
_PAYLOAD, _FLAGS, _RUN_AT, _CREATED_AT, _UPDATED_AT, _LOCKED_AT = range(6)
_UNSET: Final[Any] = object()


def _from_epoch_us(us: int) -> datetime:
    """The timestamptz behind microseconds since the Unix epoch (exact integer arithmetic)."""
    if us == _INT8_MAX:
        return TIMESTAMP_MAX
    if us == _INT8_MIN:
        return TIMESTAMP_MIN
    seconds, micros = divmod(us, 1_000_000)  # small arguments: a cheaper timedelta
    try:
        return _UNIX_EPOCH + timedelta(0, seconds, micros)
    except OverflowError:  # not from kongtask's SQL, which sends the extremes instead
        return TIMESTAMP_MAX if us > 0 else TIMESTAMP_MIN


def _aware(value: datetime | None) -> datetime | None:
    """asyncpg decodes ``±infinity`` as naive ``datetime.max``/``min``: the job's bounds."""
    if value is None or value.tzinfo is not None:
        return value
    if value == datetime.max:
        return TIMESTAMP_MAX
    if value == datetime.min:
        return TIMESTAMP_MIN
    return value.replace(tzinfo=UTC)


class Job:
    """A job as stored in ``<schema>._private_jobs``, with its task and queue names resolved.

    Instances are immutable snapshots: changing the database does not change them.
    Assigning or deleting an attribute raises :class:`dataclasses.FrozenInstanceError`
    (an :class:`AttributeError`). Jobs compare equal when all the attributes below are
    equal, and hash by them (so a job with a ``dict`` or ``list`` payload is unhashable).
    ``payload`` and ``flags`` are decoded from their JSON text on first access, and the
    timestamps of a claimed job are built on first access; both are then cached.

    Attributes:
      id: the job's id (bigint, never reused).
      task_identifier: the name of the task that runs the job.
      payload: the decoded JSON payload (any JSON value; ``{}`` when added without one).
      queue_name: the named queue the job runs in serially, or ``None``.
      priority: lower numbers run first; may be negative.
      run_at: the earliest time the job may run.
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

    Timestamps are timezone-aware. One that a Python datetime cannot hold (after year
    9999 or before year 1 in UTC, such as ``infinity``, ``-infinity`` or a BC date,
    which graphile-worker and SQL can store) reads as ``datetime.max`` or
    ``datetime.min`` with ``tzinfo=UTC``; reading never raises.
    """

    # The worker builds thousands of jobs a second, most of which never look at their
    # payload or timestamps: so a job keeps its row (an immutable asyncpg Record, or a
    # dict of the plain columns) and decodes the rest on first access into `_cache`
    # (indexed by _PAYLOAD ... _LOCKED_AT; _UNSET until decoded). Not a frozen dataclass,
    # whose construction costs more than the rest of the job's path, and not unset slots,
    # whose first read raises and catches an AttributeError
    # (docs/performance.md#figures-behind-choices-in-the-code).
    __slots__: tuple[str, ...] = ("_cache", "_row", "_task_identifier")
    __match_args__ = _FIELDS

    _row: asyncpg.Record | Mapping[str, Any]
    _task_identifier: str
    _cache: list[Any]

    def __init__(
        self,
        id: int,
        task_identifier: str,
        payload: JSONValue,
        queue_name: str | None,
        priority: int,
        run_at: datetime,
        attempts: int,
        max_attempts: int,
        key: str | None,
        flags: frozenset[str] | None,
        last_error: str | None,
        created_at: datetime,
        updated_at: datetime,
        locked_at: datetime | None,
        locked_by: str | None,
        revision: int,
    ) -> None:
        row = {
            "id": id,
            "queue_name": queue_name,
            "priority": priority,
            "attempts": attempts,
            "max_attempts": max_attempts,
            "key": key,
            "last_error": last_error,
            "locked_by": locked_by,
            "revision": revision,
        }
        _set_row(self, row)
        _set_task_identifier(self, task_identifier)
        _set_cache(self, [payload, flags, run_at, created_at, updated_at, locked_at])

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
        JSON text, which is what asyncpg returns without a custom type codec; they are
        decoded on first access. The row's ``task_id``/``job_queue_id`` are not looked
        at: the caller resolves them to names (usually from a cache), which keeps this
        constructor free of I/O. The values are copied: changing a mapping afterwards
        does not change the job.

        Args:
          row: the database row.
          task_identifier: the name behind the row's ``task_id``.
          queue_name: the name behind the row's ``job_queue_id`` (``None`` without a queue).
        """
        job = _new(cls)
        _set_row(
            job,
            {
                "id": row["id"],
                "queue_name": queue_name,
                "payload": row["payload"],
                "priority": row["priority"],
                "attempts": row["attempts"],
                "max_attempts": row["max_attempts"],
                "key": row["key"],
                "flags": row["flags"],
                "last_error": row["last_error"],
                "locked_by": row["locked_by"],
                "revision": row["revision"],
            },
        )
        _set_task_identifier(job, task_identifier)
        _set_cache(
            job,
            [
                _UNSET,
                _UNSET,
                _aware(row["run_at"]),
                _aware(row["created_at"]),
                _aware(row["updated_at"]),
                _aware(row["locked_at"]),
            ],
        )
        return job

    @classmethod
    def from_claim(cls, row: asyncpg.Record | Mapping[str, Any], task_identifier: str) -> Job:
        """Build a job from a row returned by the worker's claim (``WorkerQueries.claim``).

        Such a row carries ``queue_name``, ``payload`` and ``flags`` as JSON text, and
        the timestamps as microseconds since the Unix epoch (``run_at_us``,
        ``created_at_us``, ``updated_at_us``, ``locked_at_us``: an ``int8`` decodes
        several times faster than a ``timestamptz``). The job keeps the (immutable)
        row and decodes those columns on first access.
        """
        job = _new(cls)
        _set_row(job, row)
        _set_task_identifier(job, task_identifier)
        _set_cache(job, [_UNSET] * 6)
        return job

    # -- plain columns: read from the row

    @property
    def id(self) -> int:
        result: int = self._row["id"]
        return result

    @property
    def task_identifier(self) -> str:
        return self._task_identifier

    @property
    def queue_name(self) -> str | None:
        result: str | None = self._row["queue_name"]
        return result

    @property
    def priority(self) -> int:
        result: int = self._row["priority"]
        return result

    @property
    def attempts(self) -> int:
        result: int = self._row["attempts"]
        return result

    @property
    def max_attempts(self) -> int:
        result: int = self._row["max_attempts"]
        return result

    @property
    def key(self) -> str | None:
        result: str | None = self._row["key"]
        return result

    @property
    def last_error(self) -> str | None:
        result: str | None = self._row["last_error"]
        return result

    @property
    def locked_by(self) -> str | None:
        result: str | None = self._row["locked_by"]
        return result

    @property
    def revision(self) -> int:
        result: int = self._row["revision"]
        return result

    # -- decoded on first access, then cached

    @property
    def payload(self) -> JSONValue:
        cache = self._cache
        value = cache[_PAYLOAD]
        if value is _UNSET:
            value = cache[_PAYLOAD] = _loads(self._row["payload"])
        return value

    @property
    def flags(self) -> frozenset[str] | None:
        cache = self._cache
        value: frozenset[str] | None = cache[_FLAGS]
        if value is _UNSET:
            text = self._row["flags"]
            value = cache[_FLAGS] = None if text is None else frozenset(_loads(text))
        return value

    @property
    def run_at(self) -> datetime:
        result: datetime = self._timestamp(_RUN_AT, "run_at_us")
        return result

    @property
    def created_at(self) -> datetime:
        result: datetime = self._timestamp(_CREATED_AT, "created_at_us")
        return result

    @property
    def updated_at(self) -> datetime:
        result: datetime = self._timestamp(_UPDATED_AT, "updated_at_us")
        return result

    @property
    def locked_at(self) -> datetime | None:
        result: datetime | None = self._timestamp(_LOCKED_AT, "locked_at_us")
        return result

    def _timestamp(self, index: int, column: str) -> Any:
        cache = self._cache
        value = cache[index]
        if value is _UNSET:
            us = self._row[column]
            value = cache[index] = None if us is None else _from_epoch_us(us)
        return value

    @property
    def is_permanently_failed(self) -> bool:
        """Whether the job has used up its attempts (it will not be claimed again)."""
        return self.attempts >= self.max_attempts

    # -- what the frozen dataclass provided: value semantics, immutability, repr

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Job) and other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={value!r}" for name, value in zip(_FIELDS, self._values(), strict=True)
        )
        return f"{self.__class__.__qualname__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[Job], tuple[Any, ...]]:
        # copy, deepcopy and pickle rebuild the job from its values (a Record does not
        # pickle)
        return (self.__class__, self._values())


# The slots' own setters: they bypass Job.__setattr__ (which refuses every assignment)
# and cost less than object.__setattr__.
_new = object.__new__
_Setter: TypeAlias = Callable[[Job, Any], None]
_set_row: _Setter = Job.__dict__["_row"].__set__
_set_task_identifier: _Setter = Job.__dict__["_task_identifier"].__set__
_set_cache: _Setter = Job.__dict__["_cache"].__set__


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
