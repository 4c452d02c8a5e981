"""Turning ``add_job``/``add_jobs`` arguments into checked values, and those into SQL.

One module for every way of adding jobs: the trio client (:mod:`kongtask._client`) and
the producers that run on the caller's own connection (:mod:`kongtask._producers`) share
these checks and messages, so a bad argument fails the same way everywhere and always
before anything is sent.

This module imports no database driver and neither trio nor asyncio.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

from ._errors import ConfigError, KongtaskError, schema_not_installed
from ._job import Job, JobSpec, JSONValue
from ._schema_sql import SchemaSql
from ._validate import (
    MAX_KEY_LENGTH,
    check_aware,
    check_job_key_mode,
    check_max_attempts,
    check_name,
    check_smallint,
    check_text,
)

# graphile-worker's own add_jobs can drop a keyed spec when the keyed row gets locked
# between its retire step and its upsert (graphile-worker #580). A retry resolves it: the
# row is now locked, so the retire step takes it. More than a few misses in a row
# means something else is wrong.
ADD_ATTEMPTS: Final = 5


def checked_add_job(
    identifier: str,
    payload: JSONValue,
    queue_name: str | None,
    run_at: datetime | None,
    max_attempts: int | None,
    job_key: str | None,
    job_key_mode: object,
    priority: int | None,
    flags: Iterable[str] | None,
) -> tuple[object, ...]:
    """Check one ``add_job`` call; its bound parameters (see :func:`add_job_args`)."""
    mode = check_job_key_mode(job_key_mode)
    spec = JobSpec(identifier, payload, queue_name, run_at, max_attempts, job_key, priority, flags)
    return add_job_args(checked_spec(spec, "add_job"), mode)


def checked_specs(specs: Iterable[JobSpec], preserve_run_at: object) -> list[dict[str, Any]]:
    """Check an ``add_jobs`` batch: every spec (:func:`checked_spec`) and that no two
    share a ``job_key``. The payloads are checked by :func:`encode_specs`."""
    if not isinstance(preserve_run_at, bool):
        raise ConfigError("job_key_preserve_run_at must be a bool")
    checked: list[dict[str, Any]] = []
    seen_keys: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if not isinstance(spec, JobSpec):
            raise ConfigError(
                f"add_jobs: item {index} is a {type(spec).__name__}, expected a JobSpec"
            )
        fields = checked_spec(spec, f"add_jobs: spec {index}")
        key = fields.get("job_key")
        if key is not None:
            if key in seen_keys:
                raise ConfigError(
                    f"add_jobs: specs {seen_keys[key]} and {index} share job_key {key!r}; "
                    "one batch may hold each key once"
                )
            seen_keys[key] = index
        checked.append(fields)
    return checked


def checked_spec(spec: JobSpec, where: str) -> dict[str, Any]:
    """``spec`` as the JSON object ``json_populate_recordset`` reads, after every check
    except the payload's (encoded later, once, by :func:`encode_payload` or
    :func:`encode_specs`).

    Options left as ``None`` are omitted, so the database applies its defaults.
    """
    fields: dict[str, Any] = {"identifier": check_name(spec.identifier, f"{where}: identifier")}
    if spec.payload is not None:
        fields["payload"] = spec.payload
    if spec.queue_name is not None:
        fields["queue_name"] = check_name(spec.queue_name, f"{where}: queue_name")
    if spec.run_at is not None:
        fields["run_at"] = check_aware(spec.run_at, f"{where}: run_at")
    if spec.max_attempts is not None:
        fields["max_attempts"] = check_max_attempts(spec.max_attempts, f"{where}: max_attempts")
    if spec.job_key is not None:
        key = check_text(spec.job_key, f"{where}: job_key")
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise ConfigError(
                f"{where}: job_key must be 1 to {MAX_KEY_LENGTH} characters long, not {len(key)}"
            )
        fields["job_key"] = key
    if spec.priority is not None:
        fields["priority"] = check_smallint(spec.priority, f"{where}: priority")
    if spec.flags is not None:
        if isinstance(spec.flags, str):
            raise ConfigError(f"{where}: flags must be a collection of names, not a single string")
        fields["flags"] = [check_text(flag, f"{where}: flag") for flag in spec.flags]
    return fields


def add_job_args(fields: Mapping[str, Any], mode: str | None) -> tuple[object, ...]:
    """The bound parameters of the ``add_job`` query, in ``$1..$9`` order."""
    return (
        fields["identifier"],
        encode_payload(fields["payload"], "add_job") if "payload" in fields else None,
        fields.get("queue_name"),
        fields.get("run_at"),
        fields.get("max_attempts"),
        fields.get("job_key"),
        fields.get("priority"),
        fields.get("flags"),
        mode,
    )


def json_default(value: object) -> object:
    # Only the run_at datetimes that checked_spec let through reach this; UTC keeps the
    # text free of odd historical offsets.
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# allow_nan=False: JSON has no NaN or Infinity, and PostgreSQL's json type rejects them.
dumps = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode
dumps_specs = json.JSONEncoder(
    allow_nan=False, ensure_ascii=False, separators=(",", ":"), default=json_default
).encode


def encode_payload(payload: JSONValue, where: str) -> str:
    try:
        # encode(): a lone surrogate passes json.dumps but cannot be sent as UTF-8.
        text = dumps(payload)
        text.encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{where}: payload is not JSON-serialisable: {exc}") from None
    return text


def encode_specs(specs: list[dict[str, Any]]) -> str:
    """The whole batch as one JSON document; on failure, name the spec at fault."""
    try:
        text = dumps_specs(specs)
        text.encode()
    except (TypeError, ValueError, RecursionError):
        # Slow path, only for bad input: find the culprit for a useful message.
        for index, spec in enumerate(specs):
            if "payload" in spec:
                encode_payload(spec["payload"], f"add_jobs: spec {index}")
        raise
    return text


# --- statements for any driver ----------------------------------------------------------

#: How a driver marks bound parameters: PEP 249's ``paramstyle`` names, and ``dollar``
#: for asyncpg's ``$1``.
ParamStyle = Literal["dollar", "format", "pyformat", "qmark", "numeric", "named"]
Params: TypeAlias = Sequence[object] | Mapping[str, object]
Row: TypeAlias = Sequence[Any]


def _epoch_us(column: str) -> str:
    # As the worker's claim (kongtask._sql): int8 microseconds decode several times faster
    # than timestamptz, and Job.from_claim turns them into UTC datetimes when read, the
    # same whatever the driver's or the session's time zone handling.
    return f"""case when isfinite(j.{column})
      then cast(extract(epoch from j.{column}) * 1000000 as int8)
      when j.{column} > 'epoch' then 9223372036854775807
      when j.{column} < 'epoch' then -9223372036854775807 - 1 end as {column}_us"""


# The columns every add statement returns, in this order: first those Job.from_claim
# reads, named as it reads them, then the task's name and the ids for a second lookup.
# Casts are written cast(x as t), not x::t: SQLAlchemy's text() would read ":t" as a
# parameter. payload and flags come back as JSON text whatever the driver's JSON
# decoding is, so every driver yields the same Job.
_COLUMNS = f"""j.id, cast(j.payload as text) as payload, j.priority, {_epoch_us("run_at")},
  j.attempts, j.max_attempts, j.key, cast(j.flags as text) as flags, j.last_error,
  {_epoch_us("created_at")}, {_epoch_us("updated_at")}, {_epoch_us("locked_at")},
  j.locked_by, j.revision, q.queue_name, t.identifier, j.task_id, j.job_queue_id"""
_CLAIM_FIELDS: Final = (
    "id",
    "payload",
    "priority",
    "run_at_us",
    "attempts",
    "max_attempts",
    "key",
    "flags",
    "last_error",
    "created_at_us",
    "updated_at_us",
    "locked_at_us",
    "locked_by",
    "revision",
    "queue_name",
)
_ID, _KEY = 0, 6
_QUEUE, _TASK, _TASK_ID, _QUEUE_ID = range(len(_CLAIM_FIELDS) - 1, len(_CLAIM_FIELDS) + 3)

# The joins name tasks and queues that existed when the statement began. A task or queue
# row that add_job creates itself is not in that snapshot: a second statement
# (names_by_id) looks those up, which happens only for the first job of a new name.
_JOINS = """
left join {s}._private_tasks as t on t.id = j.task_id
left join {s}._private_job_queues as q on q.id = j.job_queue_id"""

_ADD_JOB = (
    """select {cols} from {s}.add_job(
  identifier => cast({0} as text), payload => cast({1} as json),
  queue_name => cast({2} as text), run_at => cast({3} as timestamptz),
  max_attempts => cast({4} as int), job_key => cast({5} as text),
  priority => cast({6} as int), flags => cast({7} as text[]),
  job_key_mode => cast({8} as text)
) as j"""
    + _JOINS
)
# The joins must not reorder the batch: rows come back in the order add_jobs returns them
# (the specs' order, on a schema kongtask installed), as from the client.
_ADD_JOBS = (
    """select {cols} from {s}.add_jobs(
  array(select spec from json_populate_recordset(cast(null as {s}.job_spec), cast({0} as json))
        as spec),
  cast({1} as boolean)
) with ordinality as j"""
    + _JOINS
    + "\norder by j.ordinality"
)
_NAMES_BY_ID = """
select false, id, identifier from {s}._private_tasks where id = any(cast({0} as int[]))
union all
select true, id, queue_name from {s}._private_job_queues where id = any(cast({1} as int[]))"""


def _placeholder(style: ParamStyle, index: int) -> str:
    if style == "dollar":
        return f"${index + 1}"
    if style == "format":
        return "%s"
    if style == "pyformat":
        return f"%(p{index})s"
    if style == "qmark":
        return "?"
    if style == "numeric":
        return f":{index + 1}"
    return f":p{index}"


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement and its bound parameters, in the driver's parameter style."""

    sql: str
    params: Params


@dataclass(frozen=True, slots=True, repr=False)
class AddQueries(SchemaSql):
    """The add statements for one schema, with ``style``'s placeholders."""

    style: ParamStyle
    add_job: str = field(init=False)
    add_jobs: str = field(init=False)
    names_by_id: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        marks = [_placeholder(self.style, i) for i in range(9)]
        return dict(
            add_job=_ADD_JOB.format(*marks, cols=_COLUMNS, s=s),
            add_jobs=_ADD_JOBS.format(*marks, cols=_COLUMNS, s=s),
            names_by_id=_NAMES_BY_ID.format(*marks, s=s),
        )

    def bind(self, sql: str, values: Sequence[object]) -> Statement:
        if self.style in ("pyformat", "named"):
            return Statement(sql, {f"p{i}": value for i, value in enumerate(values)})
        return Statement(sql, tuple(values))


@functools.lru_cache(maxsize=64)
def queries(schema: str, style: ParamStyle) -> AddQueries:
    """The add statements for ``schema`` in ``style``, built once per pair."""
    return AddQueries(schema, style)


#: What a producer drives: it sends each statement the plan yields, on the caller's
#: connection, and sends back the rows (sequences in the statement's column order); the
#: plan's return value is the result.
Plan: TypeAlias = Generator[Statement, Sequence[Row], list[Job]]


def add_job_plan(schema: str, style: ParamStyle, args: Sequence[object]) -> Plan:
    """One checked ``add_job`` (``args`` from :func:`checked_add_job`) as a plan."""
    q = queries(schema, style)
    for _ in range(ADD_ATTEMPTS):
        rows = yield q.bind(q.add_job, args)
        if rows and rows[0][_ID] is not None:
            return (yield from _named_jobs(q, [rows[0]]))
    raise add_job_gave_up(args)


def add_jobs_plan(
    schema: str, style: ParamStyle, specs: list[dict[str, Any]], preserve_run_at: bool
) -> Plan:
    """One checked ``add_jobs`` batch (from :func:`checked_specs`) as a plan."""
    if not specs:
        return []
    q = queries(schema, style)
    encoded = encode_specs(specs)
    found: list[Row] = []
    pending = specs
    for _ in range(ADD_ATTEMPTS):
        got = yield q.bind(q.add_jobs, (encoded, preserve_run_at))
        found.extend(got)
        if len(got) == len(pending):
            return (yield from _named_jobs(q, found))
        pending = dropped_by_580(pending, [row[_KEY] for row in got])
        encoded = dumps_specs(pending)
    raise add_jobs_gave_up(pending)


def dropped_by_580(
    pending: list[dict[str, Any]], returned_keys: Sequence[object]
) -> list[dict[str, Any]]:
    """The specs of ``pending`` to send again after an ``add_jobs`` call returned jobs
    with ``returned_keys``.

    graphile-worker #580 only ever drops keyed specs; any other loss means the function
    misbehaves, and is raised.
    """
    keys = set(returned_keys)
    dropped = [s for s in pending if s.get("job_key") not in keys]
    if len(dropped) != len(pending) - len(returned_keys) or any(
        "job_key" not in s for s in dropped
    ):
        raise KongtaskError(
            f"add_jobs returned {len(returned_keys)} jobs for {len(pending)} specs, and not "
            "because of keyed jobs getting locked; the add_jobs function misbehaves"
        )
    return dropped


def add_job_gave_up(args: Sequence[object]) -> KongtaskError:
    """The error when ``add_job`` returned no job :data:`ADD_ATTEMPTS` times in a row."""
    return KongtaskError(
        f"add_job({args[0]!r}, job_key={args[5]!r}) returned no job {ADD_ATTEMPTS} times in a "
        "row (graphile-worker bug #580: the keyed job kept getting locked mid-update)"
    )


def add_jobs_gave_up(pending: Sequence[object]) -> KongtaskError:
    """The error when ``add_jobs`` still dropped ``pending`` after :data:`ADD_ATTEMPTS`
    tries."""
    return KongtaskError(
        f"add_jobs dropped {len(pending)} keyed job(s) {ADD_ATTEMPTS} times in a row "
        "(graphile-worker bug #580: the keyed jobs kept getting locked mid-update)"
    )


def _named_jobs(q: AddQueries, rows: Sequence[Row]) -> Plan:
    task_ids = {row[_TASK_ID] for row in rows if row[_TASK] is None}
    queue_ids = {row[_QUEUE_ID] for row in rows if row[_QUEUE_ID] is not None} - {
        row[_QUEUE_ID] for row in rows if row[_QUEUE] is not None
    }
    tasks: dict[int, str] = {}
    queues: dict[int, str] = {}
    if task_ids or queue_ids:
        names = yield q.bind(q.names_by_id, (sorted(task_ids), sorted(queue_ids)))
        for is_queue, id_, name in names:
            (queues if is_queue else tasks)[id_] = name
    jobs = []
    for row in rows:
        record: Any = row
        queue_id = row[_QUEUE_ID]
        if queue_id is not None and row[_QUEUE] is None:
            record = dict(zip(_CLAIM_FIELDS, row, strict=False))
            record["queue_name"] = queues.get(queue_id)
        elif not hasattr(row, "keys"):  # an asyncpg Record is read by name as it is
            record = dict(zip(_CLAIM_FIELDS, row, strict=False))
        # Only a concurrent GC_TASK_IDENTIFIERS can make the lookup miss; show the id
        # rather than fail an add that may commit.
        name = row[_TASK] or tasks.get(row[_TASK_ID], f"<task id {row[_TASK_ID]}>")
        jobs.append(Job.from_claim(record, name))
    return jobs


# SQLSTATEs of a missing schema, table or function (an older graphile-worker schema).
_MISSING_SCHEMA_STATES: Final = frozenset({"3F000", "42P01", "42883"})


def missing_schema(exc: BaseException, schema: str) -> KongtaskError | None:
    """The "run kongtask migrate" error when ``exc`` (from any driver, possibly wrapped
    by SQLAlchemy or Django) says the schema or its functions are missing."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str):
            if state in _MISSING_SCHEMA_STATES:
                return schema_not_installed(schema, maybe_old=True)
            return None
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return None
