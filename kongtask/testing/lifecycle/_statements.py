"""The SQL the machine sends: the worker-protocol statements under test, and the
statements the machine itself uses to call the schema's functions and read its state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..._schema_sql import SchemaSql
from ..._sql import WorkerQueries
from .._model import Spec


@dataclass(frozen=True)
class ProtocolStatements:
    """The worker-protocol statements the machine runs (swap one in to test a variant).

    Parameters follow ``kongtask._sql.WorkerQueries``:

    Attributes:
      claim: ``$1`` pool id, ``$2`` task ids ``int[]``, ``$3`` limit, ``$4`` forbidden
        flags ``text[]`` or NULL, ``$5`` now; returns the claimed rows (with ``id``).
      complete: ``$1`` pool id, ``$2`` job ids ``bigint[]``.
      fail: ``$1`` pool id, ``$2`` job ids, ``$3`` messages ``text[]``, ``$4`` replacement
        payloads ``text[]`` (NULL element = keep).
      return_jobs: ``$1`` pool id, ``$2`` job ids.
      sweep_stale: no parameters; frees locks older than 4 hours.
      register_tasks: ``$1`` identifiers ``text[]``; returns ``(id, identifier)`` rows.
    """

    claim: str
    complete: str
    fail: str
    return_jobs: str
    sweep_stale: str
    register_tasks: str

    @classmethod
    def kongtask(cls, schema: str) -> ProtocolStatements:
        """kongtask's own statements for ``schema`` (from ``kongtask._sql``)."""
        q = WorkerQueries(schema)
        return cls(
            claim=q.claim,
            complete=q.complete,
            fail=q.fail,
            return_jobs=q.return_unknown,
            sweep_stale=q.sweep_stale,
            register_tasks=q.register_tasks,
        )

    def replace(self, **changes: str) -> ProtocolStatements:
        """A copy with some statements swapped (e.g. a deliberately broken claim)."""
        return dataclasses.replace(self, **changes)


SNAPSHOT_FUNCTION = "pg_temp.kongtask_lifecycle_snapshot"


def _fused(step: str) -> str:
    """``step`` (one row: now, value) and then the snapshot, in one statement.

    The materialized CTE runs the step to completion before the outer select calls the
    snapshot function for its row.
    """
    return (
        f"with step(n, v) as materialized ({step}) "
        f"select step.n, step.v, {SNAPSHOT_FUNCTION}() from step"
    )


def _setof(call: str) -> str:
    return f"select now(), (select coalesce(json_agg(r), '[]') from {call} r)::text"


_ADD_JOB_ARGS = (
    "identifier => $1::text, payload => $2::json, queue_name => $3::text, "
    "run_at => $4::timestamptz, max_attempts => $5::int, job_key => $6::text, "
    "priority => $7::int, flags => $8::text[]"
)


@dataclass(frozen=True, slots=True, repr=False)
class MachineStatements(SchemaSql):
    """The SQL the machine itself sends, for one schema: the schema's functions called
    with their results and a snapshot of the tables in one statement, and the reads and
    locks the machine needs."""

    add_job: str = field(init=False)
    add_job_mode: str = field(init=False)
    add_jobs: str = field(init=False)
    remove_job: str = field(init=False)
    complete_jobs: str = field(init=False)
    permanently_fail_jobs: str = field(init=False)
    reschedule_jobs: str = field(init=False)
    force_unlock_workers: str = field(init=False)
    make_stale: str = field(init=False)
    lock_jobs: str = field(init=False)
    lock_queues: str = field(init=False)
    reset: str = field(init=False)
    count_rows: str = field(init=False)
    snapshot: str = field(init=False)
    create_snapshot_function: str = field(init=False)
    drop_schema: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        args = _ADD_JOB_ARGS
        snapshot = (
            "select json_build_object("
            "'now', now(), "
            f"'jobs', (select coalesce(json_agg(j order by j.id), '[]') from {s}._private_jobs j), "
            "'queues', (select coalesce(json_agg(q order by q.id), '[]') "
            f"from {s}._private_job_queues q), "
            "'tasks', (select coalesce(json_agg(t order by t.id), '[]') "
            f"from {s}._private_tasks t), "
            f"'view', (select coalesce(json_agg(v order by v.id), '[]') from {s}.jobs v), "
            "'seq_tasks', (select case when is_called then last_value else 0 end "
            f"from {s}.tasks_id_seq), "
            f"'seq_queues', (select case when is_called then last_value else 0 end "
            f"from {s}.job_queues_id_seq)"
            ")::text"
        )
        return {
            "add_job": _fused(f"select now(), row_to_json(r)::text from {s}.add_job({args}) r"),
            "add_job_mode": _fused(
                f"select now(), row_to_json(r)::text "
                f"from {s}.add_job({args}, job_key_mode => $9::text) r"
            ),
            "add_jobs": _fused(
                f"select now(), (select coalesce(json_agg(r), '[]') from {s}.add_jobs("
                f"array(select x from json_populate_recordset(null::{s}.job_spec, $1::json) x), "
                "$2::boolean"
                ") r)::text"
            ),
            "remove_job": _fused(
                f"select now(), row_to_json(r)::text from {s}.remove_job($1::text) r"
            ),
            "complete_jobs": _fused(_setof(f"{s}.complete_jobs($1::bigint[])")),
            "permanently_fail_jobs": _fused(
                _setof(f"{s}.permanently_fail_jobs($1::bigint[], $2::text)")
            ),
            "reschedule_jobs": _fused(
                _setof(
                    f"{s}.reschedule_jobs($1::bigint[], run_at => $2::timestamptz, "
                    "priority => $3::int, attempts => $4::int, max_attempts => $5::int)"
                )
            ),
            "force_unlock_workers": _fused(
                f"select now(), {s}.force_unlock_workers($1::text[])::text"
            ),
            "make_stale": (
                f"with j as (update {s}._private_jobs set locked_at = now() - $2::interval "
                "where locked_by = $1 returning 1), "
                f"q as (update {s}._private_job_queues set locked_at = now() - $2::interval "
                "where locked_by = $1 returning 1) "
                "select now(), null::text"
            ),
            "lock_jobs": (
                f"select id from {s}._private_jobs where id = any($1::bigint[]) for update"
            ),
            "lock_queues": (
                f"select id from {s}._private_job_queues "
                "where queue_name = any($1::text[]) for update"
            ),
            "reset": (
                f"delete from {s}._private_jobs; delete from {s}._private_job_queues; "
                f"delete from {s}._private_tasks"
            ),
            "count_rows": f"select count(*) from {s}._private_jobs",
            # scratch mode: the schema the run created
            "drop_schema": f"drop schema if exists {s} cascade",
            "snapshot": snapshot,
            # The same snapshot as a volatile function in the session's temporary schema.
            # Called after a step's SQL function in one statement, it sees that function's
            # writes: each query of a volatile function takes a fresh snapshot with a new
            # command id. That saves a round trip per step; plpgsql keeps the query's plan.
            "create_snapshot_function": (
                f"create or replace function {SNAPSHOT_FUNCTION}() returns text "
                "language plpgsql volatile as $kongtask_lifecycle$ "
                f"begin return ({snapshot}); end $kongtask_lifecycle$"
            ),
        }


def spec_json(spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {"identifier": spec.identifier}
    if spec.payload is not None:
        out["payload"] = spec.payload
    if spec.queue_name is not None:
        out["queue_name"] = spec.queue_name
    if spec.run_at is not None:
        out["run_at"] = spec.run_at.isoformat()
    if spec.max_attempts is not None:
        out["max_attempts"] = spec.max_attempts
    if spec.job_key is not None:
        out["job_key"] = spec.job_key
    if spec.priority is not None:
        out["priority"] = spec.priority
    if spec.flags is not None:
        out["flags"] = list(spec.flags)
    return out
