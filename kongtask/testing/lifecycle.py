"""A hypothesis state machine that checks the job lifecycle of a schema on a real Postgres.

Point it at any graphile-worker-compatible schema (migrated by kongtask, or by
graphile-worker itself). Its rules drive the schema through its SQL API (``add_job``,
``add_jobs``, ``remove_job``, ``complete_jobs``, ``permanently_fail_jobs``,
``reschedule_jobs``, ``force_unlock_workers``) and through the worker protocol with
kongtask's own statements (claim a batch as pool P, with or without forbidden flags;
complete, fail or return claimed jobs; let locks go stale and sweep them; claim while a
second connection holds row locks). A pure-Python model predicts every row; after every
step the invariants of :data:`INVARIANTS` are checked, and a violation raises
:class:`InvariantViolation` naming the invariant.

Typical use in a test suite::

    from kongtask.testing.lifecycle import open_lifecycle_harness, run_lifecycle_machine

    def test_schema_lifecycle(kongtask_dsn):
        with open_lifecycle_harness(kongtask_dsn) as harness:
            run_lifecycle_machine(harness, examples=50, seed=1)

Or from a shell, against a scratch schema it creates, migrates and drops::

    python -m kongtask.testing.lifecycle --dsn postgresql://... --examples 500

Worker-level properties on real :func:`kongtask.open_worker` pools live here too:
:func:`open_worker_harness` and :func:`worker_scenarios`.

Speed: the harness keeps one trio + trio-asyncio loop and its connections alive in a
background thread for all examples (docs/design/stack.md#hypothesis-and-async-fixtures);
each step is one crossing into that loop, and examples are separated by deleting the
schema's rows, not by reconnecting.

Needs the ``testing`` extra (hypothesis).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import asyncpg
from hypothesis import HealthCheck, Phase, seed as hypothesis_seed, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._config import quote_ident, resolve_dsn
from ._model import (
    JOB_FIELDS,
    STALE_AFTER,
    AddOutcome,
    InvariantViolation,
    MJob,
    Model,
    Pool,
    Spec,
    clone,
    describe_job,
    same_json,
)
from ._portal import Connections, Portal
from ._worker_props import (
    ScenarioJob,
    ScenarioResult,
    WorkerHarness,
    WorkerScenario,
    open_worker_harness,
    worker_scenarios,
)

__all__ = [
    "INVARIANTS",
    "JOB_KEY_MODES",
    "KEYS",
    "PAYLOAD_SAMPLES",
    "QUEUES",
    "TASKS",
    "InvariantViolation",
    "JobTemplate",
    "LifecycleHarness",
    "LifecycleMachine",
    "LifecycleReport",
    "ProtocolStatements",
    "ScenarioJob",
    "ScenarioResult",
    "SchemaFlavour",
    "Spec",
    "WorkerHarness",
    "WorkerScenario",
    "describe_failure",
    "detect_flavour",
    "flag_lists",
    "job_key_modes",
    "job_keys",
    "job_templates",
    "json_payloads",
    "lifecycle_machine",
    "lifecycle_settings",
    "main",
    "max_attempts_values",
    "open_lifecycle_harness",
    "open_worker_harness",
    "priorities",
    "queue_names",
    "run_at_offsets",
    "run_lifecycle",
    "run_lifecycle_machine",
    "task_identifiers",
    "worker_scenarios",
]

# --------------------------------------------------------------------------------------
# Invariants and schema flavours
# --------------------------------------------------------------------------------------

#: Every invariant the machine checks, by the name :class:`InvariantViolation` reports.
INVARIANTS: Mapping[str, str] = {
    "job_held_by_one_pool": "A claim never returns a job that is locked (by any pool) or the same "
    "job twice; a live pool's running jobs stay locked by that pool.",
    "named_queue_serial": "A named queue never has two jobs locked; a claim never takes two jobs "
    "of one named queue, nor a job whose queue row is locked.",
    "queue_lock_matches_jobs": "Queue rows are locked at claim (by P, at the claim's now) and "
    "unlocked by P's complete/fail/return, the stale sweep and force_unlock_workers, nothing else; "
    "a locked job of a named queue has its queue row locked by the same pool.",
    "attempts_transitions": "attempts changes only as documented: claim +1, return -1 (not "
    "below 0), a key hit resets it to 0, permanent failure and retire set max_attempts, "
    "reschedule sets it.",
    "claim_skips_permanently_failed": "A claim never takes a job with attempts >= max_attempts.",
    "claim_skips_future": "A claim never takes a job whose run_at is after the claim's now.",
    "claim_filters": "A claim takes only jobs of the given task ids and none carrying a "
    "forbidden flag.",
    "claim_skips_locked_rows": "A claim neither waits for nor takes job or queue rows another "
    "transaction holds (SKIP LOCKED).",
    "claim_progress_row_locked_queues": "As claim_progress, when other transactions hold "
    "queue rows: jobs whose queue row cannot be locked without waiting are not candidates "
    "(docs/design/database.md#claiming), so they must not use up the limit.",
    "claim_order": "Claims follow priority, then run_at, among the eligible jobs (the best "
    "job of each named queue).",
    "claim_progress": "A claim takes at most its limit; at least one job when one is eligible; "
    "and when the eligible jobs fit in the limit, every queue-less one and one per named queue.",
    "job_key_modes": "key and revision follow the job key rules (replace, preserve_run_at, "
    "unsafe_dedupe; unavailable rows are retired); a key names at most one live row.",
    "payloads": "Payloads default to {}; on a key hit two arrays concatenate (batch jobs), "
    "else the new payload wins; a worker fail replaces it only with a given replacement.",
    "run_at_rules": "run_at defaults to now(); preserve_run_at keeps the old one only while "
    "attempts = 0; fail backs off exp(least(attempts, 10)) s from greatest(now(), run_at); the "
    "sweep sets greatest(run_at, now()).",
    "job_locks": "locked_at/locked_by change only at claim, the worker's fail/return, the "
    "sweep and force_unlock_workers.",
    "job_columns": "Every other column is as predicted: task, queue, priority, max_attempts, "
    "flags ({flag: true}, NULL when none), last_error, created_at, updated_at, is_available.",
    "no_job_disappears": "A job leaves the table only by completion (complete_jobs, a worker's "
    "complete) or removal (remove_job).",
    "no_unexpected_jobs": "Rows appear only through add_job / add_jobs.",
    "task_and_queue_rows": "Task and queue rows exist exactly for the names used; task "
    "registration returns the id of every identifier asked for.",
    "no_identity_burn": "Adds and task registration for names that exist consume no identity "
    "values (graphile-worker #619; not checked on graphile-worker <= 0.17 schemas).",
    "notify_counts": 'jobs:insert carries {"r":<random>,"count":n}: n = number of specs for '
    "add_jobs (an empty payload for none), 1 for a fresh unsafe_dedupe insert, -1 when "
    "remove_job deletes; no other step notifies.",
    "jobs_view_agrees": "The jobs view shows exactly the private rows, with task and queue names.",
    "function_results": "Each SQL function and worker statement returns exactly the rows it "
    "affected, as they are afterwards (deleted rows: as they were).",
    "worker_runs_once": "(worker scenarios) No handler runs twice for one job within a "
    "scenario (its jobs have max_attempts 1, so no retry is legitimate).",
    "worker_progress": "(worker scenarios) The pool reaches the scenario's shutdown point: "
    "the handler starts it asks for, or every job that can start has started and every "
    "one that does not hang has finished; every job that can start does so in the latter "
    "case, and no job behind a hung one in its named queue starts.",
    "worker_outcomes": "(worker scenarios) A job whose handler returned is gone; one that "
    "raised is kept with attempts 1 and its message; one cancelled by the shutdown is kept "
    "with attempts 1 and the shutdown message; one never started is untouched.",
    "sql_errors": "Statements fail exactly when the contract says (duplicate keys in one "
    "add_jobs: 21000; a key with an unknown job_key_mode: GWBKM), and never otherwise.",
}

_FIELD_INVARIANT = {
    "attempts": "attempts_transitions",
    "locked_at": "job_locks",
    "locked_by": "job_locks",
    "key": "job_key_modes",
    "revision": "job_key_modes",
    "payload": "payloads",
    "run_at": "run_at_rules",
}


def _field_invariant(fields: Sequence[str]) -> str:
    """The invariant a set of differing columns breaks, the most telling first."""
    names = {_FIELD_INVARIANT.get(f, "job_columns") for f in fields}
    for name in ("attempts_transitions", "job_locks", "job_key_modes", "payloads", "run_at_rules"):
        if name in names:
            return name
    return "job_columns"


class SchemaFlavour(enum.Enum):
    """Who wrote the schema's function bodies; decides which documented differences apply.

    See docs/design/database.md#differences-from-graphile-worker.
    """

    #: Migrated by kongtask (migrations 1..20 with kongtask's own bodies).
    KONGTASK = "kongtask"
    #: Migrated by graphile-worker 0.18.0 (migration 20: the #619 fix is in).
    GRAPHILE_WORKER = "graphile-worker"
    #: Migrated by graphile-worker 0.17.x (19 migrations: adds burn identity values, #619).
    GRAPHILE_WORKER_0_17 = "graphile-worker-0.17"

    def rules(self) -> list[str]:
        """Which §8 differences the machine checks for this flavour, in words."""
        burn = (
            "#619 identity burn: NOT checked (graphile-worker <= 0.17 consumes a task and a "
            "queue identity value on every add; upstream behaviour, fixed by migration 20)"
            if self is SchemaFlavour.GRAPHILE_WORKER_0_17
            else "#619 identity burn: checked strictly (adds and registration of existing "
            "names consume no identity values)"
        )
        return [
            burn,
            "#580 (keyed row locked between retire and upsert): a race across sessions, not "
            "reachable from the machine's single acting connection; not checked",
            "#621 one job per named queue per claim: checked on every flavour, because the "
            "claims are kongtask's statements",
            "Q4 empty add_jobs: every flavour sends an empty jobs:insert payload (checked)",
        ]


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

#: Task identifiers the strategies use. All but the last are registered when an example
#: starts; ``task_late`` only when the ``register_tasks`` rule asks for it.
TASKS: tuple[str, ...] = ("task_a", "task_b", "task_c", "task_late")
#: Queue names the strategies use.
QUEUES: tuple[str, ...] = ("q1", "q2")
#: Job keys the strategies use (few, so that keys collide often).
KEYS: tuple[str, ...] = ("k1", "k2", "k3")
#: ``job_key_mode`` values: ``DEFAULT`` leaves the argument out; ``"bogus"`` must raise GWBKM.
JOB_KEY_MODES: tuple[str | None, ...] = (
    "<default>",
    "replace",
    "preserve_run_at",
    "unsafe_dedupe",
    None,
    "bogus",
)
DEFAULT_MODE = "<default>"
#: How far the machine's clock starts ahead of the database's ``now()``.
CLOCK_LEAD = timedelta(minutes=1)
FLAGS: tuple[str, ...] = ("fa", "fb", "fc")


def task_identifiers() -> st.SearchStrategy[str]:
    """Task identifiers from :data:`TASKS`."""
    return st.sampled_from(TASKS)


# Each strategy is one ``sampled_from`` with ``None`` first: one draw per field (the
# machine draws a lot of jobs, and hypothesis pays per draw), and shrinking goes
# towards "argument not given".


def queue_names() -> st.SearchStrategy[str | None]:
    """``None`` (no queue) or one of :data:`QUEUES`."""
    return st.sampled_from((None, *QUEUES))


def job_keys() -> st.SearchStrategy[str | None]:
    """``None`` or one of :data:`KEYS`."""
    return st.sampled_from((None, *KEYS))


def job_key_modes() -> st.SearchStrategy[str | None]:
    """One of :data:`JOB_KEY_MODES` (mostly valid ones)."""
    return st.sampled_from(JOB_KEY_MODES)


#: Payloads the strategies pick from: objects, nesting, unicode, scalars, and arrays
#: (batch jobs). No floats (their text round trip through jsonb is not what is being
#: tested), no NUL characters and no lone surrogates (jsonb rejects both).
PAYLOAD_SAMPLES: tuple[Any, ...] = (
    {},
    {"a": 1},
    {"nested": {"list": [1, "two", None, True]}, "emoji": "\u00e9\u2603\U0001f600"},
    {"b": [], "a": {}},
    "text",
    17,
    True,
    [],
    [1],
    [2, 3],
    [4, 5, 6],
    [{"id": 7}],
)


def json_payloads() -> st.SearchStrategy[Any]:
    """``None`` (omitted) or one of :data:`PAYLOAD_SAMPLES`."""
    return st.sampled_from((None, *PAYLOAD_SAMPLES))


_FLAG_LISTS: tuple[tuple[str, ...] | None, ...] = (
    None,
    (),
    ("fa",),
    ("fb",),
    ("fa", "fb"),
    ("fa", "fa"),
    ("fc", "fb", "fa"),
)


def flag_lists() -> st.SearchStrategy[tuple[str, ...] | None]:
    """``None``, empty, or flags from a small set, duplicates included."""
    return st.sampled_from(_FLAG_LISTS)


def priorities() -> st.SearchStrategy[int | None]:
    """``None`` (default 0) or a small priority, negatives included."""
    return st.sampled_from((None, -2, -1, 0, 1, 2))


def max_attempts_values() -> st.SearchStrategy[int | None]:
    """``None`` (default 25) or 1..4, so that jobs run out of attempts within an example."""
    return st.sampled_from((None, 1, 2, 3, 4))


_OFFSETS = tuple(timedelta(seconds=s) for s in (-3600, -1, 0, 1, 30, 3600, 5 * 3600))


def run_at_offsets() -> st.SearchStrategy[timedelta | None]:
    """``None`` (the database's ``now()``) or an offset from the machine's clock."""
    return st.sampled_from((None, *_OFFSETS))


@dataclass(frozen=True)
class JobTemplate:
    """A job to add, with ``run_at`` relative to the machine's clock.

    Attributes:
      identifier, payload, queue_name, max_attempts, job_key, priority, flags: as for
        ``add_job``; ``None`` means "not given".
      run_at_offset: added to the clock when the job is added; ``None`` leaves ``run_at``
        to the database's ``now()``.
    """

    identifier: str
    payload: Any = None
    queue_name: str | None = None
    run_at_offset: timedelta | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    priority: int | None = None
    flags: tuple[str, ...] | None = None

    def at(self, clock: datetime) -> Spec:
        """The absolute spec when the clock reads ``clock``."""
        return Spec(
            identifier=self.identifier,
            payload=self.payload,
            queue_name=self.queue_name,
            run_at=None if self.run_at_offset is None else clock + self.run_at_offset,
            max_attempts=self.max_attempts,
            job_key=self.job_key,
            priority=self.priority,
            flags=self.flags,
        )


def job_templates() -> st.SearchStrategy[JobTemplate]:
    """Jobs to add: every field of ``add_job`` drawn from the strategies above."""
    return st.builds(
        JobTemplate,
        identifier=task_identifiers(),
        payload=json_payloads(),
        queue_name=queue_names(),
        run_at_offset=run_at_offsets(),
        max_attempts=max_attempts_values(),
        job_key=job_keys(),
        priority=priorities(),
        flags=flag_lists(),
    )


# --------------------------------------------------------------------------------------
# Statements
# --------------------------------------------------------------------------------------


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
        from .._sql import WorkerQueries

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
        import dataclasses

        return dataclasses.replace(self, **changes)


SNAPSHOT_FUNCTION = "pg_temp.kongtask_lifecycle_snapshot"


class _SchemaSql:
    """The SQL the machine itself sends, for one schema."""

    def __init__(self, schema: str) -> None:
        s = quote_ident(schema)
        self.s = s
        args = (
            "identifier => $1::text, payload => $2::json, queue_name => $3::text, "
            "run_at => $4::timestamptz, max_attempts => $5::int, job_key => $6::text, "
            "priority => $7::int, flags => $8::text[]"
        )
        fuse = self._fused
        self.add_job = fuse(f"select now(), row_to_json(r)::text from {s}.add_job({args}) r")
        self.add_job_mode = fuse(
            f"select now(), row_to_json(r)::text "
            f"from {s}.add_job({args}, job_key_mode => $9::text) r"
        )
        self.add_jobs = fuse(
            f"select now(), (select coalesce(json_agg(r), '[]') from {s}.add_jobs("
            f"array(select x from json_populate_recordset(null::{s}.job_spec, $1::json) x), "
            "$2::boolean"
            ") r)::text"
        )
        self.remove_job = fuse(
            f"select now(), row_to_json(r)::text from {s}.remove_job($1::text) r"
        )
        self.complete_jobs = fuse(self._setof(f"{s}.complete_jobs($1::bigint[])"))
        self.permanently_fail_jobs = fuse(
            self._setof(f"{s}.permanently_fail_jobs($1::bigint[], $2::text)")
        )
        self.reschedule_jobs = fuse(
            self._setof(
                f"{s}.reschedule_jobs($1::bigint[], run_at => $2::timestamptz, "
                "priority => $3::int, attempts => $4::int, max_attempts => $5::int)"
            )
        )
        self.force_unlock_workers = fuse(
            f"select now(), {s}.force_unlock_workers($1::text[])::text"
        )
        self.make_stale = (
            f"with j as (update {s}._private_jobs set locked_at = now() - $2::interval "
            "where locked_by = $1 returning 1), "
            f"q as (update {s}._private_job_queues set locked_at = now() - $2::interval "
            "where locked_by = $1 returning 1) "
            "select now(), null::text"
        )
        self.lock_jobs = f"select id from {s}._private_jobs where id = any($1::bigint[]) for update"
        self.lock_queues = (
            f"select id from {s}._private_job_queues where queue_name = any($1::text[]) for update"
        )
        self.reset = (
            f"delete from {s}._private_jobs; delete from {s}._private_job_queues; "
            f"delete from {s}._private_tasks"
        )
        self.count_rows = f"select count(*) from {s}._private_jobs"
        self.snapshot = (
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
        # The same snapshot as a volatile function in the session's temporary schema.
        # Called after a step's SQL function in one statement, it sees that function's
        # writes: each query of a volatile function takes a fresh snapshot with a new
        # command id. That saves a round trip per step; plpgsql keeps the query's plan.
        self.create_snapshot_function = (
            f"create or replace function {SNAPSHOT_FUNCTION}() returns text "
            "language plpgsql volatile as $kongtask_lifecycle$ "
            f"begin return ({self.snapshot}); end $kongtask_lifecycle$"
        )

    @staticmethod
    def _fused(step: str) -> str:
        """``step`` (one row: now, value) and then the snapshot, in one statement.

        The materialized CTE runs the step to completion before the outer select calls
        the snapshot function for its row.
        """
        return (
            f"with step(n, v) as materialized ({step}) "
            f"select step.n, step.v, {SNAPSHOT_FUNCTION}() from step"
        )

    @staticmethod
    def _setof(call: str) -> str:
        return f"select now(), (select coalesce(json_agg(r), '[]') from {call} r)::text"


# --------------------------------------------------------------------------------------
# One step on the database: one crossing into the loop
# --------------------------------------------------------------------------------------


@dataclass
class _Raw:
    now: datetime | None  # the step's now(), when it returns it
    value: Any  # "fused"/"fn": the JSON text; "stmt": a list of row dicts
    error: tuple[str, str] | None  # (sqlstate, message)
    notifications: list[str]
    snapshot: str


async def _run_step(
    conns: Connections,
    snapshot_sql: str,
    kind: str,
    sql: str,
    args: tuple[Any, ...],
    blocker: tuple[str, str, list[int], list[str]] | None = None,
) -> _Raw:
    actor = conns.actor
    conns.notifications.clear()
    now: datetime | None = None
    value: Any = None
    error: tuple[str, str] | None = None
    try:
        if blocker is not None:
            lock_jobs, lock_queues, job_ids, queue_names_ = blocker
            await conns.blocker.execute("begin")
            try:
                await conns.blocker.fetch(lock_jobs, job_ids)
                await conns.blocker.fetch(lock_queues, queue_names_)
                value = [dict(r) for r in await actor.fetch(sql, *args)]
            finally:
                await conns.blocker.execute("rollback")
        elif kind == "fused":  # the statement brings its own snapshot (one round trip)
            row = await actor.fetchrow(sql, *args)
            if row is None:
                raise RuntimeError(f"no row from {sql}")
            return _Raw(row[0], row[1], None, list(conns.notifications), row[2])
        elif kind == "fn":
            row = await actor.fetchrow(sql, *args)
            if row is None:
                raise RuntimeError(f"no row from {sql}")
            now, value = row[0], row[1]
        else:  # "stmt": a worker statement
            value = [dict(r) for r in await actor.fetch(sql, *args)]
    except asyncpg.PostgresError as exc:
        error = (str(exc.sqlstate), str(exc))
    snapshot = await actor.fetchval(snapshot_sql)
    return _Raw(now, value, error, list(conns.notifications), snapshot)


async def _reset(
    conns: Connections, sql: _SchemaSql, register: str, identifiers: list[str], first: bool
) -> tuple[list[dict[str, Any]], str]:
    if first:
        await conns.actor.execute(sql.create_snapshot_function)
    await conns.actor.execute(sql.reset)
    rows = [dict(r) for r in await conns.actor.fetch(register, identifiers)]
    conns.notifications.clear()
    snapshot = await conns.actor.fetchval(sql.snapshot)
    return rows, snapshot


async def _fetchval(conns: Connections, query: str) -> Any:
    return await conns.actor.fetchval(query)


# --------------------------------------------------------------------------------------
# Reading the database's state
# --------------------------------------------------------------------------------------

_TIMESTAMPS = ("run_at", "created_at", "updated_at", "locked_at")


def _ts(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass
class _DbState:
    now: datetime
    jobs: dict[int, dict[str, Any]]
    raw_jobs: list[dict[str, Any]]
    queues: dict[str, dict[str, Any]]
    queue_names: dict[int, str]
    tasks: dict[str, int]
    task_names: dict[int, str]
    view: list[dict[str, Any]]
    seq: dict[str, int]

    def job(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """A ``_private_jobs`` row (as JSON) in the model's terms."""
        out: dict[str, Any] = {}
        for name in JOB_FIELDS:
            if name == "task":
                out[name] = self.task_names.get(
                    raw["task_id"], f"<unknown task id {raw['task_id']}>"
                )
            elif name == "queue":
                qid = raw["job_queue_id"]
                out[name] = (
                    None if qid is None else self.queue_names.get(qid, f"<unknown queue id {qid}>")
                )
            elif name in _TIMESTAMPS:
                out[name] = _ts(raw[name])
            elif name == "flags":
                flags = raw["flags"]
                if isinstance(flags, dict) and all(v is True for v in flags.values()):
                    out[name] = frozenset(flags)
                else:
                    out[name] = flags  # a malformed value never equals the model's
            else:
                out[name] = raw[name]
        out["is_available"] = raw.get("is_available")
        return out


def _parse_snapshot(text: str) -> _DbState:
    data = json.loads(text)
    tasks = {t["identifier"]: t["id"] for t in data["tasks"]}
    queue_names_ = {q["id"]: q["queue_name"] for q in data["queues"]}
    state = _DbState(
        now=datetime.fromisoformat(data["now"]),
        jobs={},
        raw_jobs=data["jobs"],
        queues={
            q["queue_name"]: {
                "id": q["id"],
                "locked_at": _ts(q["locked_at"]),
                "locked_by": q["locked_by"],
                "is_available": q["is_available"],
            }
            for q in data["queues"]
        },
        queue_names=queue_names_,
        tasks=tasks,
        task_names={v: k for k, v in tasks.items()},
        view=data["view"],
        seq={"tasks": int(data["seq_tasks"]), "queues": int(data["seq_queues"])},
    )
    state.jobs = {raw["id"]: state.job(raw) for raw in data["jobs"]}
    return state


def _diff(job: MJob, row: Mapping[str, Any], run_at_tolerance: timedelta) -> list[str]:
    """Fields where the database row differs from the model's job."""
    out = []
    for name in JOB_FIELDS:
        want = getattr(job, name)
        got = row[name]
        if name == "updated_at" and want is None:
            continue  # not predicted
        if name == "payload":
            if not same_json(want, got):
                out.append(name)
        elif name == "run_at" and run_at_tolerance and got is not None:
            if abs(got - want) > run_at_tolerance:
                out.append(name)
        elif want != got:
            out.append(name)
    return out


def _describe_diff(job: MJob, row: Mapping[str, Any], fields: Sequence[str]) -> str:
    parts = [f"{f}: model {getattr(job, f)!r}, database {row[f]!r}" for f in fields]
    return f"job {job.id}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------
# The harness and the machine
# --------------------------------------------------------------------------------------


# Rules draw indices from these strategies, built once: a strategy built inside a rule
# (``st.sampled_from(current_ids)``) costs hypothesis a validation on every draw.
_PICK = st.lists(st.integers(0, 15), max_size=4)
_ADMIN_PICK = st.lists(st.integers(0, 15), max_size=2)
_PICK1 = st.lists(st.integers(0, 15), min_size=1, max_size=4)
_INDEX = st.integers(0, 15)
_LIMIT = st.integers(1, 5)
_TASK_PICK: st.SearchStrategy[list[int]] = st.one_of(
    st.just([]), st.just([]), st.just([]), _PICK1
)  # [] = every registered task
_FORBIDDEN = st.none() | st.lists(st.sampled_from(FLAGS), max_size=2)
_MESSAGES = st.lists(st.sampled_from(["failed", "boom", ""]), min_size=4, max_size=4)
_FAILED_ELEMENTS = st.lists(st.none() | _PICK1, min_size=4, max_size=4)


def _choose(indices: Sequence[int], items: Sequence[Any]) -> list[Any]:
    """``items`` picked by ``indices`` (modulo their number), without repeats, in pick order."""
    out: list[Any] = []
    if items:
        for i in indices:
            item = items[i % len(items)]
            if item not in out:
                out.append(item)
    return out


class LifecycleHarness:
    """The connections, statements and schema facts the machine's examples share.

    Made by :func:`open_lifecycle_harness`; pass it to :func:`lifecycle_machine` or
    :func:`run_lifecycle_machine`.

    Attributes:
      schema: the schema under test.
      flavour: who migrated it (decides the §8 rules, see :meth:`SchemaFlavour.rules`).
      statements: the worker-protocol statements in use.
      pools: how many worker pools the machine plays.
      skip: invariants that are not enforced (known deviations, named in INVARIANTS).
      examples: how many examples (machines) have started so far.
    """

    def __init__(
        self,
        portal: Portal,
        schema: str,
        flavour: SchemaFlavour,
        statements: ProtocolStatements,
        *,
        pools: int = 3,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(skip) - set(INVARIANTS)
        if unknown:
            raise ValueError(f"unknown invariants {sorted(unknown)}; see INVARIANTS")
        self.skip = frozenset(skip)
        self.portal = portal
        self.schema = schema
        self.flavour = flavour
        self.statements = statements
        self.pools = pools
        self.sql = _SchemaSql(schema)
        self.examples = 0

    def job_count(self) -> int:
        """How many rows ``_private_jobs`` holds now."""
        return int(self.portal.run(_fetchval, self.sql.count_rows))

    def reset(self) -> tuple[list[dict[str, Any]], _DbState]:
        """Delete the schema's jobs, queues and tasks; register the first two tasks."""
        self.examples += 1
        rows, snapshot = self.portal.run(
            _reset,
            self.sql,
            self.statements.register_tasks,
            list(TASKS[:-1]),
            self.examples == 1,
        )
        return rows, _parse_snapshot(snapshot)


@contextmanager
def open_lifecycle_harness(
    dsn: str,
    schema: str = "graphile_worker",
    *,
    flavour: SchemaFlavour = SchemaFlavour.KONGTASK,
    statements: ProtocolStatements | None = None,
    pools: int = 3,
    skip: frozenset[str] | set[str] = frozenset(),
) -> Iterator[LifecycleHarness]:
    """Open the background loop and connections for a migrated ``schema`` at ``dsn``.

    Every example deletes the rows of ``schema``'s jobs, queues and tasks tables: use a
    database or schema that holds nothing else of value.

    Args:
      dsn: a libpq connection string or URL.
      schema: the (already migrated) schema to test.
      flavour: who migrated it; see :class:`SchemaFlavour`.
      statements: the worker statements; default: kongtask's own for ``schema``.
      pools: how many worker pools the machine plays (2 or more to test sharing).
      skip: names from :data:`INVARIANTS` not to enforce (known deviations).
    """
    if statements is None:
        statements = ProtocolStatements.kongtask(schema)
    with Portal(dsn) as portal:
        yield LifecycleHarness(
            portal, schema, flavour, statements, pools=pools, skip=frozenset(skip)
        )


class LifecycleMachine(RuleBasedStateMachine):
    """The rules and invariants; bind it to a harness with :func:`lifecycle_machine`.

    Each rule is one step: one round of statements on the database, the model's
    transition, then every invariant. Subclass it to add rules; ``self.model`` is the
    prediction and ``self.harness`` the shared connections.
    """

    harness: ClassVar[LifecycleHarness | None] = None

    def __init__(self) -> None:
        super().__init__()
        harness = type(self).harness
        if harness is None:
            raise RuntimeError("bind the machine to a harness first: lifecycle_machine(harness)")
        self.h: LifecycleHarness = harness
        rows, db = harness.reset()
        if db.jobs or db.queues:
            raise RuntimeError(f"schema {harness.schema!r} still holds rows after the reset")
        # The claims' clock starts a minute ahead of the database's, so that jobs added
        # with the default run_at (the database's now()) are due at once.
        self.model = Model(db.now + CLOCK_LEAD, harness.pools)
        self.model.tasks = set(db.tasks)
        self.model.registered = {r["identifier"]: int(r["id"]) for r in rows}
        self.model.seq = dict(db.seq)
        self._db_now = db.now  # the database's now() at the last snapshot
        self.sql = harness.sql
        self.st = harness.statements
        self.flavour = harness.flavour

    # ----- plumbing -----------------------------------------------------------------
    def _exec(
        self,
        kind: str,
        sql: str,
        *args: Any,
        blocker: tuple[list[int], list[str]] | None = None,
    ) -> _Raw:
        lock = None
        if blocker is not None:
            lock = (self.sql.lock_jobs, self.sql.lock_queues, blocker[0], blocker[1])
        return self.h.portal.run(_run_step, self.sql.snapshot, kind, sql, args, lock)

    def _fail(self, invariant: str, step: str, detail: str) -> InvariantViolation:
        return InvariantViolation(invariant, step, detail)

    def _check(self, invariant: str, step: str, detail: str) -> None:
        """Raise the violation unless the harness was told to skip that invariant."""
        if invariant not in self.h.skip:
            raise self._fail(invariant, step, detail)

    def _no_error(self, step: str, raw: _Raw) -> None:
        if raw.error is not None:
            code, message = raw.error
            if code == "55P03" and step.startswith("claim"):
                raise self._fail(
                    "claim_skips_locked_rows", step, f"the claim waited for a row lock: {message}"
                )
            raise self._fail("sql_errors", step, f"unexpected error {code}: {message}")

    def _expect_error(self, step: str, raw: _Raw, code: str) -> None:
        if raw.error is None:
            raise self._fail(
                "sql_errors", step, f"expected error {code}, but the statement succeeded"
            )
        if raw.error[0] != code:
            raise self._fail(
                "sql_errors", step, f"expected error {code}, got {raw.error[0]}: {raw.error[1]}"
            )
        self._verify(step, raw, notify=[], error_step=True)

    def _verify(
        self,
        step: str,
        raw: _Raw,
        *,
        notify: Sequence[str | int] = (),
        new_names: tuple[int, int] = (0, 0),
        run_at_tolerance: timedelta = timedelta(0),
        error_step: bool = False,
    ) -> _DbState:
        db = _parse_snapshot(raw.snapshot)
        self._db_now = db.now
        self._check_structure(step, db)
        self._check_model(step, db, run_at_tolerance)
        self._check_names(step, db, new_names, error_step)
        self._check_notifications(step, raw.notifications, notify)
        return db

    def _check_structure(self, step: str, db: _DbState) -> None:
        # The jobs view against the private tables.
        view = {v["id"]: v for v in db.view}
        if set(view) != {r["id"] for r in db.raw_jobs}:
            raise self._fail(
                "jobs_view_agrees",
                step,
                f"view ids {sorted(view)} != table ids {sorted(r['id'] for r in db.raw_jobs)}",
            )
        for raw in db.raw_jobs:
            v = view[raw["id"]]
            want = {k: raw[k] for k in v if k not in ("queue_name", "task_identifier")}
            want["queue_name"] = (
                None if raw["job_queue_id"] is None else db.queue_names.get(raw["job_queue_id"])
            )
            want["task_identifier"] = db.task_names.get(raw["task_id"])
            if want != v:
                raise self._fail("jobs_view_agrees", step, f"view row {v} != table row {want}")
        # At most one locked job per named queue, and its queue row is locked by its pool.
        locked_in_queue: dict[str, int] = {}
        for job_id, row in db.jobs.items():
            if row["is_available"] != (
                row["locked_at"] is None and row["attempts"] < row["max_attempts"]
            ):
                raise self._fail(
                    "job_columns", step, f"job {job_id}: is_available is {row['is_available']}"
                )
            queue = row["queue"]
            if row["locked_at"] is None or queue is None:
                continue
            if queue in locked_in_queue:
                raise self._fail(
                    "named_queue_serial",
                    step,
                    f"queue {queue!r} has two locked jobs: {locked_in_queue[queue]} and {job_id}",
                )
            locked_in_queue[queue] = job_id
            qrow = db.queues.get(queue)
            if qrow is None or qrow["locked_by"] != row["locked_by"]:
                raise self._fail(
                    "queue_lock_matches_jobs",
                    step,
                    f"job {job_id} is locked by {row['locked_by']!r} but queue {queue!r} by "
                    f"{None if qrow is None else qrow['locked_by']!r}",
                )

    def _check_model(self, step: str, db: _DbState, run_at_tolerance: timedelta) -> None:
        model = self.model
        missing = sorted(set(model.jobs) - set(db.jobs))
        if missing:
            raise self._fail(
                "no_job_disappears",
                step,
                "; ".join(describe_job(model.jobs[i]) for i in missing) + " vanished",
            )
        extra = sorted(set(db.jobs) - set(model.jobs))
        if extra:
            raise self._fail(
                "no_unexpected_jobs", step, "; ".join(describe_job(db.jobs[i]) for i in extra)
            )
        for job_id, job in model.jobs.items():
            row = db.jobs[job_id]
            fields = _diff(job, row, run_at_tolerance)
            if fields:
                raise self._fail(_field_invariant(fields), step, _describe_diff(job, row, fields))
            # Adopt what the model leaves open, and run_at within the float tolerance.
            job.updated_at = row["updated_at"]
            job.run_at = row["run_at"]
        for pool in model.pools:
            for job_id in pool.held:
                held = db.jobs.get(job_id)
                if held is None or held["locked_by"] != pool.pool_id:
                    raise self._fail(
                        "job_held_by_one_pool",
                        step,
                        f"pool {pool.pool_id} runs job {job_id}, which is locked by "
                        f"{None if held is None else held['locked_by']!r}",
                    )
        if set(db.queues) != set(model.queues):
            raise self._fail(
                "task_and_queue_rows",
                step,
                f"queues {sorted(db.queues)} != model {sorted(model.queues)}",
            )
        for name, queue in model.queues.items():
            qrow = db.queues[name]
            if (qrow["locked_at"], qrow["locked_by"]) != (queue.locked_at, queue.locked_by):
                raise self._fail(
                    "queue_lock_matches_jobs",
                    step,
                    f"queue {name!r}: model locked_by={queue.locked_by!r} at {queue.locked_at}, "
                    f"database locked_by={qrow['locked_by']!r} at {qrow['locked_at']}",
                )

    def _check_names(
        self, step: str, db: _DbState, new_names: tuple[int, int], error_step: bool
    ) -> None:
        model = self.model
        if set(db.tasks) != model.tasks:
            raise self._fail(
                "task_and_queue_rows",
                step,
                f"tasks {sorted(db.tasks)} != model {sorted(model.tasks)}",
            )
        for name, task_id in model.registered.items():
            if db.tasks.get(name) != task_id:
                raise self._fail(
                    "task_and_queue_rows",
                    step,
                    f"task {name!r} registered as {task_id}, table says {db.tasks.get(name)}",
                )
        if not error_step and self.flavour is not SchemaFlavour.GRAPHILE_WORKER_0_17:
            for what, created in zip(("tasks", "queues"), new_names, strict=True):
                used = db.seq[what] - model.seq[what]
                if used != created:
                    raise self._fail(
                        "no_identity_burn",
                        step,
                        f"{created} new {what} rows consumed {used} identity values (#619; "
                        f"flavour {self.flavour.value} must not burn them)",
                    )
        model.seq = dict(db.seq)

    def _check_notifications(
        self, step: str, got: Sequence[str], want: Sequence[str | int]
    ) -> None:
        counts: list[str | int] = []
        for payload in got:
            if payload == "":
                counts.append("")
                continue
            try:
                data = json.loads(payload)
            except ValueError:
                raise self._fail(
                    "notify_counts", step, f"unparseable payload {payload!r}"
                ) from None
            if (
                not isinstance(data, dict)
                or list(data) != ["r", "count"]
                or not isinstance(data["r"], float)
                or not isinstance(data["count"], int)
            ):
                raise self._fail("notify_counts", step, f"malformed payload {payload!r}")
            counts.append(data["count"])
        if counts != list(want):
            raise self._fail(
                "notify_counts", step, f"jobs:insert counts {counts}, expected {list(want)}"
            )

    def _returned_rows(self, db: _DbState, text: str | None) -> list[dict[str, Any]]:
        if text is None:
            return []
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
        return [db.job(r) for r in rows if r.get("id") is not None]

    def _check_returned(
        self, step: str, rows: Sequence[Mapping[str, Any]], want: Sequence[MJob]
    ) -> None:
        got_ids = sorted(r["id"] for r in rows)
        want_ids = sorted(j.id for j in want)
        if got_ids != want_ids:
            raise self._fail(
                "function_results", step, f"returned ids {got_ids}, expected {want_ids}"
            )
        by_id = {j.id: j for j in want}
        for row in rows:
            job = by_id[row["id"]]
            fields = _diff(job, row, timedelta(0))
            if fields:
                raise self._fail(
                    "function_results", step, "returned " + _describe_diff(job, row, fields)
                )

    def _apply_inserts(
        self, step: str, outcome: AddOutcome, rows: Sequence[Mapping[str, Any]], now: datetime
    ) -> list[int]:
        """Give the model's inserted jobs the ids the database chose (matched by content)."""
        new_rows = sorted(
            (r for r in rows if r["id"] not in self.model.jobs), key=lambda r: r["id"]
        )
        keyed = any(spec.job_key is not None for _, spec in outcome.inserts)
        if len(new_rows) != len(outcome.inserts):
            raise self._fail(
                "job_key_modes" if keyed else "function_results",
                step,
                f"{len(new_rows)} new rows returned ({[describe_job(r) for r in new_rows]}), "
                f"the model expects {len(outcome.inserts)} inserts",
            )
        pending = [self.model.new_job(0, spec, now) for _, spec in outcome.inserts]
        unmatched: list[Mapping[str, Any]] = []
        for row in new_rows:
            for i, job in enumerate(pending):
                job.id = row["id"]
                if not _diff(job, row, timedelta(0)):
                    self.model.jobs[job.id] = pending.pop(i)
                    break
            else:
                unmatched.append(row)
        for row, job in zip(unmatched, pending, strict=True):
            job.id = row["id"]
            fields = _diff(job, row, timedelta(0))
            raise self._fail(
                _field_invariant(fields),
                step,
                "inserted " + _describe_diff(job, row, fields),
            )
        return [r["id"] for r in new_rows]

    # ----- SQL API rules --------------------------------------------------------------
    @rule(template=job_templates(), mode=job_key_modes())
    def add_job(self, template: JobTemplate, mode: str | None) -> None:
        """``add_job`` with every argument, in every ``job_key_mode``."""
        spec = template.at(self.model.clock)
        step = f"add_job(mode={mode!r})"
        args: list[Any] = [
            spec.identifier,
            None if spec.payload is None else json.dumps(spec.payload),
            spec.queue_name,
            spec.run_at,
            spec.max_attempts,
            spec.job_key,
            spec.priority,
            None if spec.flags is None else list(spec.flags),
        ]
        if mode == DEFAULT_MODE:
            raw = self._exec("fused", self.sql.add_job, *args)
        else:
            raw = self._exec("fused", self.sql.add_job_mode, *args, mode)
        valid = (DEFAULT_MODE, None, "replace", "preserve_run_at", "unsafe_dedupe")
        if spec.job_key is not None and mode not in valid:
            self._expect_error(step, raw, "GWBKM")
            return
        self._no_error(step, raw)
        assert raw.now is not None
        now = raw.now
        new_names = self.model.ensure_names([spec])
        if spec.job_key is not None and mode == "unsafe_dedupe":
            outcome = self.model.add_job_unsafe_dedupe(spec, now)
        else:
            outcome = self.model.add_jobs([spec], mode == "preserve_run_at", now)
        db = _parse_snapshot(raw.snapshot)
        rows = self._returned_rows(db, raw.value)
        new_ids = self._apply_inserts(step, outcome, rows, now)
        self._verify(step, raw, notify=outcome.notify, new_names=new_names)
        self._check_returned(step, rows, [self.model.jobs[i] for i in [*outcome.updated, *new_ids]])

    @initialize(templates=st.lists(job_templates(), min_size=2, max_size=6))
    def seed_jobs(self, templates: list[JobTemplate]) -> None:
        """Every example starts with a few jobs (added with ``add_jobs``)."""
        self.add_jobs(templates, preserve_run_at=False)

    @rule(
        templates=st.lists(job_templates(), max_size=4),
        preserve_run_at=st.booleans(),
    )
    def add_jobs(self, templates: list[JobTemplate], preserve_run_at: bool) -> None:
        """``add_jobs`` with 0..4 specs (duplicate keys must raise 21000)."""
        specs = [t.at(self.model.clock) for t in templates]
        step = f"add_jobs(preserve_run_at={preserve_run_at})"
        payload = json.dumps([_spec_json(s) for s in specs])
        raw = self._exec("fused", self.sql.add_jobs, payload, preserve_run_at)
        keys = [s.job_key for s in specs if s.job_key is not None]
        if len(keys) != len(set(keys)):
            self._expect_error(step, raw, "21000")
            return
        self._no_error(step, raw)
        assert raw.now is not None
        new_names = self.model.ensure_names(specs)
        outcome = self.model.add_jobs(specs, preserve_run_at, raw.now)
        db = _parse_snapshot(raw.snapshot)
        rows = self._returned_rows(db, raw.value)
        new_ids = self._apply_inserts(step, outcome, rows, raw.now)
        self._verify(step, raw, notify=outcome.notify, new_names=new_names)
        self._check_returned(step, rows, [self.model.jobs[i] for i in [*outcome.updated, *new_ids]])

    @rule(key=job_keys())
    def remove_job(self, key: str | None) -> None:
        """``remove_job``: delete an unlocked or stale keyed job, retire a locked one."""
        step = f"remove_job({key!r})"
        raw = self._exec("fused", self.sql.remove_job, key)
        self._no_error(step, raw)
        assert raw.now is not None
        job, notify = self.model.remove_job(key, raw.now)
        snapshot = clone(job) if job is not None else None
        db = self._verify(step, raw, notify=notify)
        self._check_returned(
            step, self._returned_rows(db, raw.value), [snapshot] if snapshot else []
        )

    def _ids(self, picks: Sequence[int]) -> list[int]:
        known = sorted(self.model.jobs)
        missing = (max(known) if known else 0) + 1000
        return _choose(picks, [*known, missing])

    @precondition(lambda self: self.model.jobs)
    @rule(picks=_ADMIN_PICK)
    def complete_jobs(self, picks: list[int]) -> None:
        """``complete_jobs`` on a mix of jobs in every state, and an unknown id."""
        ids = self._ids(picks)
        step = f"complete_jobs({ids})"
        raw = self._exec("fused", self.sql.complete_jobs, ids)
        self._no_error(step, raw)
        assert raw.now is not None
        done = self.model.complete_jobs(ids, raw.now)
        db = self._verify(step, raw)
        self._check_returned(step, self._returned_rows(db, raw.value), done)

    @precondition(lambda self: self.model.jobs)
    @rule(picks=_ADMIN_PICK, message=st.none() | st.sampled_from(["boom", ""]))
    def permanently_fail_jobs(self, picks: list[int], message: str | None) -> None:
        """``permanently_fail_jobs`` (with and without a message)."""
        ids = self._ids(picks)
        step = f"permanently_fail_jobs({ids}, {message!r})"
        raw = self._exec("fused", self.sql.permanently_fail_jobs, ids, message)
        self._no_error(step, raw)
        assert raw.now is not None
        hit = self.model.permanently_fail_jobs(ids, message, raw.now)
        db = self._verify(step, raw)
        self._check_returned(step, self._returned_rows(db, raw.value), hit)

    @precondition(lambda self: self.model.jobs)
    @rule(
        picks=_ADMIN_PICK,
        offset=run_at_offsets(),
        priority=priorities(),
        attempts=st.none() | st.integers(0, 5),
        max_attempts=max_attempts_values(),
    )
    def reschedule_jobs(
        self,
        picks: list[int],
        offset: timedelta | None,
        priority: int | None,
        attempts: int | None,
        max_attempts: int | None,
    ) -> None:
        """``reschedule_jobs``: each non-NULL argument replaces its column (may revive a job)."""
        ids = self._ids(picks)
        run_at = None if offset is None else self.model.clock + offset
        step = (
            f"reschedule_jobs({ids}, run_at={run_at}, priority={priority}, "
            f"attempts={attempts}, max_attempts={max_attempts})"
        )
        raw = self._exec(
            "fused", self.sql.reschedule_jobs, ids, run_at, priority, attempts, max_attempts
        )
        self._no_error(step, raw)
        assert raw.now is not None
        hit = self.model.reschedule_jobs(ids, run_at, priority, attempts, max_attempts, raw.now)
        db = self._verify(step, raw)
        self._check_returned(step, self._returned_rows(db, raw.value), hit)

    @precondition(lambda self: any(p.held for p in self.model.pools) or self.model.dead_pool_ids)
    @rule(picks=_PICK1)
    def force_unlock_workers(self, picks: list[int]) -> None:
        """``force_unlock_workers`` with live, dead and unknown pool ids (the pools restart)."""
        candidates = (
            [p.pool_id for p in self.model.pools] + self.model.dead_pool_ids[-3:] + ["pool-unknown"]
        )
        ids = _choose(picks, candidates)
        step = f"force_unlock_workers({ids})"
        raw = self._exec("fused", self.sql.force_unlock_workers, ids)
        self._no_error(step, raw)
        self.model.force_unlock_workers(ids)
        self._verify(step, raw)

    # ----- worker protocol rules -----------------------------------------------------
    @rule(identifiers=st.lists(task_identifiers(), min_size=1, max_size=3, unique=True))
    def register_tasks(self, identifiers: list[str]) -> None:
        """The worker's task registration: insert missing identifiers, return all ids."""
        step = f"register_tasks({identifiers})"
        raw = self._exec("stmt", self.st.register_tasks, identifiers)
        self._no_error(step, raw)
        new = [i for i in identifiers if i not in self.model.tasks]
        self.model.tasks.update(identifiers)
        got = {r["identifier"]: int(r["id"]) for r in raw.value}
        if sorted(got) != sorted(identifiers) or len(raw.value) != len(identifiers):
            raise self._fail("task_and_queue_rows", step, f"registration returned {raw.value}")
        self.model.registered.update(got)
        self._verify(step, raw, new_names=(len(new), 0))

    @rule(slot=_INDEX, tasks=_TASK_PICK, limit=_LIMIT, forbidden=_FORBIDDEN)
    def claim(self, slot: int, tasks: list[int], limit: int, forbidden: list[str] | None) -> None:
        """Claim a batch as pool P at the machine's clock (``$5``), maybe with forbidden flags."""
        self._claim(slot, tasks, limit, forbidden, locked_jobs=[], locked_queues=[])

    @rule(slot=_INDEX)
    def claim_batch(self, slot: int) -> None:
        """A worker's usual claim: every registered task, no forbidden flags, limit 5."""
        self._claim(slot, [], 5, None, locked_jobs=[], locked_queues=[])

    @rule(
        slot=_INDEX,
        tasks=_TASK_PICK,
        limit=_LIMIT,
        forbidden=_FORBIDDEN,
        job_picks=_PICK,
        queue_picks=_PICK,
    )
    def claim_while_rows_locked(
        self,
        slot: int,
        tasks: list[int],
        limit: int,
        forbidden: list[str] | None,
        job_picks: list[int],
        queue_picks: list[int],
    ) -> None:
        """Claim while a second connection holds row locks on some jobs and queue rows."""
        jobs = _choose(job_picks, sorted(self.model.jobs))
        queues = _choose(queue_picks, sorted(self.model.queues))
        self._claim(slot, tasks, limit, forbidden, locked_jobs=jobs, locked_queues=queues)

    def _claim(
        self,
        slot: int,
        tasks: list[int],
        limit: int,
        forbidden: list[str] | None,
        *,
        locked_jobs: list[int],
        locked_queues: list[str],
    ) -> None:
        pool = self.model.pools[slot % len(self.model.pools)]
        # by name, not id: ids depend on the database, and draws must replay the same
        registered = [self.model.registered[name] for name in sorted(self.model.registered)]
        task_ids = _choose(tasks, registered) if tasks else registered
        now = self.model.clock
        step = (
            f"claim(pool={pool.pool_id}, tasks={task_ids}, limit={limit}, forbidden={forbidden}"
            + (
                f", row locks on jobs {locked_jobs} and queues {locked_queues})"
                if locked_jobs or locked_queues
                else ")"
            )
        )
        blocker = (locked_jobs, locked_queues) if locked_jobs or locked_queues else None
        raw = self._exec(
            "stmt", self.st.claim, pool.pool_id, task_ids, limit, forbidden, now, blocker=blocker
        )
        self._no_error(step, raw)
        ids = [int(r["id"]) for r in raw.value]
        eligible = self.model.eligible(task_ids, forbidden, now, locked_jobs, locked_queues)
        self._check_claim(
            step, ids, eligible, task_ids, limit, forbidden, now, locked_jobs, locked_queues
        )
        self.model.claim(pool, ids, now)
        self._verify(step, raw)

    def _check_claim(
        self,
        step: str,
        ids: Sequence[int],
        eligible: Sequence[MJob],
        task_ids: Sequence[int],
        limit: int,
        forbidden: Sequence[str] | None,
        now: datetime,
        locked_jobs: Sequence[int],
        locked_queues: Sequence[str],
    ) -> None:
        model = self.model
        if len(set(ids)) != len(ids):
            raise self._fail(
                "job_held_by_one_pool", step, f"the claim returned a job twice: {list(ids)}"
            )
        tasks = {n for n, t in model.registered.items() if t in set(task_ids)}
        seen_queues: dict[str, int] = {}
        for job_id in ids:
            job = model.jobs.get(job_id)
            if job is None:
                raise self._fail(
                    "function_results", step, f"the claim returned unknown job {job_id}"
                )
            if job.locked_at is not None:
                raise self._fail(
                    "job_held_by_one_pool",
                    step,
                    f"job {job_id} was already locked by {job.locked_by!r}",
                )
            if job.attempts >= job.max_attempts:
                raise self._fail(
                    "claim_skips_permanently_failed",
                    step,
                    f"job {job_id} has attempts {job.attempts} >= max_attempts {job.max_attempts}",
                )
            if job.run_at > now:
                raise self._fail(
                    "claim_skips_future", step, f"job {job_id} runs at {job.run_at}, now is {now}"
                )
            if job.task not in tasks:
                raise self._fail(
                    "claim_filters",
                    step,
                    f"job {job_id} has task {job.task!r}, not in {sorted(tasks)}",
                )
            if forbidden and job.flags and job.flags & set(forbidden):
                raise self._fail(
                    "claim_filters", step, f"job {job_id} has forbidden flags {sorted(job.flags)}"
                )
            if job_id in locked_jobs or (job.queue is not None and job.queue in locked_queues):
                raise self._fail(
                    "claim_skips_locked_rows",
                    step,
                    f"job {job_id} (queue {job.queue!r}) was row-locked elsewhere",
                )
            if job.queue is not None:
                if model.queues[job.queue].locked_at is not None:
                    raise self._fail(
                        "named_queue_serial",
                        step,
                        f"job {job_id}'s queue {job.queue!r} is locked by "
                        f"{model.queues[job.queue].locked_by!r}",
                    )
                if job.queue in seen_queues:
                    raise self._fail(
                        "named_queue_serial",
                        step,
                        f"jobs {seen_queues[job.queue]} and {job_id} of queue {job.queue!r} "
                        "claimed together",
                    )
                seen_queues[job.queue] = job_id
        if len(ids) > limit:
            raise self._fail("claim_progress", step, f"{len(ids)} jobs claimed with limit {limit}")
        claimed = [model.jobs[i] for i in ids]
        rest = [j for j in eligible if j.id not in set(ids)]
        for job in rest:
            if job.queue is not None and job.queue in seen_queues:
                best = model.jobs[seen_queues[job.queue]]
                if job.sort_key() < best.sort_key():
                    raise self._fail(
                        "claim_order",
                        step,
                        f"job {best.id} of queue {job.queue!r} {best.sort_key()} claimed "
                        "before job "
                        f"{job.id} {job.sort_key()}",
                    )
                continue
            for taken in claimed:
                if job.sort_key() < taken.sort_key():
                    raise self._fail(
                        "claim_order",
                        step,
                        f"job {taken.id} {taken.sort_key()} claimed while job {job.id} "
                        f"{job.sort_key()} waits",
                    )
        # Jobs that are eligible except that another transaction holds their queue row:
        # "can be row-locked without waiting" is part of candidacy
        # (docs/design/database.md#claiming), so they must not use up the limit. Shortfalls
        # they explain get their own name.
        shadowed = [
            j.id
            for j in model.eligible(task_ids, forbidden, now, locked_jobs)
            if j.queue is not None and j.queue in locked_queues
        ]
        progress = "claim_progress_row_locked_queues" if shadowed else "claim_progress"
        if eligible and not ids:
            self._check(
                progress,
                step,
                f"nothing claimed; eligible: {[j.id for j in eligible]}; jobs of row-locked queue "
                f"rows: {shadowed}",
            )
        if len(eligible) <= limit:
            left = [j.id for j in rest if j.queue is None or j.queue not in seen_queues]
            if left:
                self._check(
                    progress,
                    step,
                    f"eligible jobs {left} left behind (limit {limit}); jobs of row-locked queue "
                    f"rows: {shadowed}",
                )

    def _held(self, slot: int, picks: Sequence[int]) -> tuple[Pool, list[int]]:
        pools = [p for p in self.model.pools if p.held]
        pool = pools[slot % len(pools)]
        return pool, _choose(picks, pool.held)

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=_INDEX, picks=_PICK1)
    def complete_claimed(self, slot: int, picks: list[int]) -> None:
        """A pool completes some of its running jobs (one statement)."""
        self._complete(*self._held(slot, picks))

    def _complete(self, pool: Pool, ids: list[int], who: str = "") -> None:
        step = f"{who}complete(pool={pool.pool_id}, {ids})"
        raw = self._exec("stmt", self.st.complete, pool.pool_id, ids)
        self._no_error(step, raw)
        self.model.worker_complete(pool, ids)
        self._verify(step, raw)

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=_INDEX, picks=_PICK1, messages=_MESSAGES, failed_elements=_FAILED_ELEMENTS)
    def fail_claimed(
        self,
        slot: int,
        picks: list[int],
        messages: list[str],
        failed_elements: list[list[int] | None],
    ) -> None:
        """A pool fails some of its running jobs; batch jobs may keep only failed elements."""
        pool, ids = self._held(slot, picks)
        messages = messages[: len(ids)]
        payloads: list[Any] = []
        for job_id, elements in zip(ids, failed_elements, strict=False):
            payload = self.model.jobs[job_id].payload
            if isinstance(payload, list) and payload and elements is not None:
                # a partial batch failure keeps the failed elements, in order
                keep = sorted({i % len(payload) for i in elements})
                payloads.append([payload[i] for i in keep])
            else:
                payloads.append(None)
        self._worker_fail(pool, ids, messages, payloads)

    def _worker_fail(
        self,
        pool: Pool,
        ids: list[int],
        messages: list[str],
        payloads: list[Any],
        who: str = "",
    ) -> None:
        step = f"{who}fail(pool={pool.pool_id}, {ids})"
        texts = [None if p is None else json.dumps(p) for p in payloads]
        before = self._db_now
        raw = self._exec("stmt", self.st.fail, pool.pool_id, ids, messages, texts)
        self._no_error(step, raw)
        # The statement's now() lies between the previous snapshot's and this one's.
        after = _parse_snapshot(raw.snapshot).now
        self.model.worker_fail(pool, ids, messages, payloads, before)
        self._verify(step, raw, run_at_tolerance=after - before + timedelta(milliseconds=1))

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=_INDEX, picks=_PICK1)
    def return_claimed(self, slot: int, picks: list[int]) -> None:
        """A pool returns claimed jobs it did not start (local queue TTL, shutdown)."""
        self._return(*self._held(slot, picks))

    def _return(self, pool: Pool, ids: list[int], who: str = "") -> None:
        step = f"{who}return_jobs(pool={pool.pool_id}, {ids})"
        raw = self._exec("stmt", self.st.return_jobs, pool.pool_id, ids)
        self._no_error(step, raw)
        self.model.worker_return(pool, ids)
        self._verify(step, raw)

    @precondition(lambda self: any(z.held for z in self.model.zombies))
    @rule(which=_INDEX, picks=_PICK1, outcome=st.sampled_from(("complete", "fail", "return")))
    def zombie_finishes(self, which: int, picks: list[int], outcome: str) -> None:
        """A pool declared dead (force-unlocked, or crashed) finishes some jobs late.

        Its statements must act only as the protocol allows
        (docs/design/database.md#completing-and-failing): complete deletes by id (no
        ``locked_by`` check), fail and return touch only rows still locked by it, and
        no queue row another pool holds is unlocked.
        """
        zombies = [z for z in self.model.zombies if z.held]
        zombie = zombies[which % len(zombies)]
        ids = _choose(picks, zombie.held)
        if outcome == "complete":
            self._complete(zombie, ids, "zombie ")
        elif outcome == "fail":
            self._worker_fail(zombie, ids, ["late"] * len(ids), [None] * len(ids), "zombie ")
        else:
            self._return(zombie, ids, "zombie ")

    @rule(delta=st.sampled_from([timedelta(seconds=s) for s in (1, 3, 30, 600, 3600, 6 * 3600)]))
    def advance_clock(self, delta: timedelta) -> None:
        """Move the claims' clock (``$5``) forward, past run_at values and backoffs."""
        self.model.clock += delta

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=_INDEX)
    def crash_pool(self, slot: int) -> None:
        """Pool P died over 4 hours ago: its locks become stale (``locked_at`` set back)."""
        pool = [p for p in self.model.pools if p.held][
            slot % len([p for p in self.model.pools if p.held])
        ]
        step = f"crash_pool({pool.pool_id})"
        raw = self._exec(
            "fn", self.sql.make_stale, pool.pool_id, STALE_AFTER + timedelta(minutes=1)
        )
        self._no_error(step, raw)
        assert raw.now is not None
        self.model.make_stale(pool, raw.now - STALE_AFTER - timedelta(minutes=1))
        self._verify(step, raw)

    @precondition(lambda self: self.model.dead_pool_ids)
    @rule()
    def sweep_stale(self) -> None:
        """The stale-lock sweep: frees job and queue locks older than 4 hours."""
        step = "sweep_stale"
        before = self._db_now
        raw = self._exec("stmt", self.st.sweep_stale)
        self._no_error(step, raw)
        after = _parse_snapshot(raw.snapshot).now
        self.model.sweep(before)
        self._verify(step, raw, run_at_tolerance=after - before + timedelta(milliseconds=1))

    def teardown(self) -> None:
        """Nothing: the next example resets the rows."""


def _spec_json(spec: Spec) -> dict[str, Any]:
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


def lifecycle_machine(
    harness: LifecycleHarness, base: type[LifecycleMachine] = LifecycleMachine
) -> type[LifecycleMachine]:
    """A machine class bound to ``harness`` (hypothesis makes one instance per example).

    Args:
      harness: from :func:`open_lifecycle_harness`.
      base: :class:`LifecycleMachine` or a subclass with more rules.
    """
    return type(f"{base.__name__}On_{harness.schema}", (base,), {"harness": harness})


def lifecycle_settings(
    examples: int, *, steps: int = 30, shrink: bool = True, derandomize: bool = False
) -> settings:
    """Hypothesis settings for the machine: no deadline, no example database.

    Args:
      examples: ``max_examples``.
      steps: ``stateful_step_count``, the most steps per example.
      shrink: shrink a failure to a short counterexample (``False``: report it as found).
      derandomize: derive the examples from the test itself instead of a random seed.
    """
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if shrink:
        phases.append(Phase.shrink)
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=derandomize,
        report_multiple_bugs=False,
        print_blob=False,
        # no explain phase: it re-runs a failure many times to annotate lines (slow here)
        phases=phases,
        # too_slow: every step is a round trip to a real server, so data generation
        # legitimately takes longer than hypothesis expects; the other checks stay on
        suppress_health_check=[HealthCheck.too_slow],
    )


def run_lifecycle_machine(
    harness: LifecycleHarness,
    *,
    examples: int = 100,
    steps: int = 30,
    seed: int | None = None,
    base: type[LifecycleMachine] = LifecycleMachine,
    settings_: settings | None = None,
) -> None:
    """Run the machine for ``examples`` examples; raise the (shrunk) first violation.

    Args:
      harness: from :func:`open_lifecycle_harness`.
      examples: hypothesis ``max_examples``.
      steps: at most this many steps per example.
      seed: fix the random seed (CI); ``None`` draws a fresh one.
      base: the machine class to bind (a subclass may add rules).
      settings_: full hypothesis settings, overriding ``examples`` and ``steps``.

    Raises:
      InvariantViolation: an invariant failed; hypothesis has printed the steps.
    """
    machine = lifecycle_machine(harness, base)
    if seed is not None:
        machine = hypothesis_seed(seed)(machine)
    run_state_machine_as_test(
        machine, settings=settings_ or lifecycle_settings(examples, steps=steps)
    )


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------


@dataclass
class LifecycleReport:
    """The outcome of :func:`run_lifecycle`.

    Attributes:
      examples: machines (examples) run, shrinking included.
      seconds: wall time of the hypothesis run.
      seed: the seed used.
      failure: the violation found, or ``None``.
      flavour: the schema flavour the rules were chosen for.
    """

    examples: int
    seconds: float
    seed: int
    flavour: SchemaFlavour
    failure: BaseException | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        """Examples per second of wall time."""
        return self.examples / self.seconds if self.seconds else 0.0


def _refuse_if_workers_listen(dsn: str) -> None:
    """Migrating a scratch schema sends ``worker:migrate`` notifications with
    ``"breaking": true`` to the whole database; graphile-worker and kongtask workers on it
    would take them for their own schema and shut down (exit 57). Refuse when another
    session looks like a worker (its last statement LISTENed, or it is a kongtask pool)."""
    from ._postgres import run_sync_sql

    rows = run_sync_sql(
        dsn,
        "select count(*) as n from pg_stat_activity where datname = current_database() "
        "and pid <> pg_backend_pid() and (query ilike 'listen%' "
        "or application_name like 'kongtask%')",
    )
    if rows[0][0]["n"]:  # type: ignore[index]
        raise RuntimeError(
            "other sessions on this database look like workers (LISTEN or kongtask); "
            "migrating a scratch schema would send them worker:migrate notifications and "
            "make them shut down. Use a separate database, or --existing on a schema "
            "migrated beforehand."
        )


def describe_failure(exc: BaseException) -> list[str]:
    """Lines that explain a failed run: the violations and the steps hypothesis printed.

    Hypothesis attaches the (shrunk) steps to the exception as notes; a flaky replay comes
    as an exception group whose members are the original violations.
    """
    lines = [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())]
    for sub in getattr(exc, "exceptions", ()):
        lines += ["  " + line for line in describe_failure(sub)]
    return lines


def detect_flavour(dsn: str, schema: str) -> SchemaFlavour:
    """Guess the flavour of an existing schema: 19 migrations means graphile-worker 0.17."""
    from ._postgres import run_sync_sql

    rows = run_sync_sql(dsn, f"select max(id) as m from {quote_ident(schema)}.migrations")
    top = rows[0][0]["m"]  # type: ignore[index]
    return (
        SchemaFlavour.GRAPHILE_WORKER_0_17
        if top is not None and top < 20
        else SchemaFlavour.GRAPHILE_WORKER
    )


def run_lifecycle(
    dsn: str,
    *,
    examples: int = 100,
    steps: int = 30,
    seed: int | None = None,
    schema: str | None = None,
    existing: bool = False,
    flavour: SchemaFlavour | None = None,
    statements: ProtocolStatements | None = None,
    skip: frozenset[str] | set[str] = frozenset(),
    out: Callable[[str], None] = print,
) -> LifecycleReport:
    """Run the machine against ``dsn``; the engine behind ``python -m kongtask.testing.lifecycle``.

    Without ``existing``, creates a scratch schema, migrates it with kongtask, and drops it
    afterwards. With ``existing``, tests the already-migrated ``schema`` and deletes only
    its job, queue and task rows between examples; it refuses a schema that holds jobs.

    Args:
      dsn: the database.
      examples, steps, seed: as for :func:`run_lifecycle_machine` (a seed is drawn and
        printed when ``None``).
      schema: the schema (scratch mode: its name; default a random one).
      existing: test an existing schema instead of a scratch one.
      flavour: default: kongtask for a scratch schema, detected for an existing one.
      statements: worker statements (default kongtask's).
      skip: invariants not to enforce (see :data:`INVARIANTS`).
      out: where progress lines go.
    """
    from ._postgres import run_sync_sql

    if seed is None:
        seed = secrets.randbelow(2**32)
    scratch = not existing
    if schema is None:
        schema = "graphile_worker" if existing else f"kongtask_lifecycle_{secrets.token_hex(4)}"
    if scratch:
        from .._migrate import migrate_sync

        _refuse_if_workers_listen(dsn)
        migrate_sync(dsn, schema)
        flavour = flavour or SchemaFlavour.KONGTASK
    else:
        flavour = flavour or detect_flavour(dsn, schema)
    report = LifecycleReport(0, 0.0, seed, flavour)
    try:
        with open_lifecycle_harness(
            dsn, schema, flavour=flavour, statements=statements, skip=skip
        ) as harness:
            if existing and harness.job_count():
                raise RuntimeError(
                    f"schema {schema!r} holds jobs; the machine deletes every row of its jobs, "
                    "queues and tasks tables, so point it at a schema made for testing"
                )
            out(
                f"lifecycle: schema {schema!r} ({'scratch' if scratch else 'existing'}), "
                f"flavour {flavour.value}, seed {seed}, {examples} examples of up to {steps} steps"
            )
            for line in flavour.rules():
                out(f"  rule: {line}")
            for name in sorted(skip):
                out(f"  skipped invariant: {name}")
            start = time.perf_counter()
            try:
                run_lifecycle_machine(harness, examples=examples, steps=steps, seed=seed)
            except Exception as exc:
                report.failure = exc
            finally:
                report.seconds = time.perf_counter() - start
                report.examples = harness.examples
                if existing:
                    harness.reset()  # leave the rows empty, as found
    finally:
        if scratch:
            run_sync_sql(dsn, f"drop schema if exists {quote_ident(schema)} cascade")
    out(
        f"lifecycle: {report.examples} examples in {report.seconds:.1f} s "
        f"= {report.per_second:.1f} examples/s (seed {seed})"
    )
    if report.failure is not None:
        out("lifecycle: FAILED")
        for line in describe_failure(report.failure):
            out(line)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kongtask.testing.lifecycle``: exit 0 when every invariant held, 1 if not."""
    parser = argparse.ArgumentParser(
        prog="python -m kongtask.testing.lifecycle",
        description="Check the job lifecycle of a graphile-worker-compatible schema "
        "with a hypothesis state machine.",
    )
    parser.add_argument(
        "--dsn", default=None, help="connection string (default: DATABASE_URL / PG* variables)"
    )
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30, help="maximum steps per example")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--existing", action="store_true", help="test an already-migrated schema")
    parser.add_argument(
        "--flavour",
        choices=[f.value for f in SchemaFlavour],
        default=None,
        help="who migrated the schema (default: kongtask for a scratch schema, "
        "detected with --existing)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=sorted(INVARIANTS),
        metavar="INVARIANT",
        help="an invariant not to enforce (repeatable)",
    )
    args = parser.parse_args(argv)
    dsn = resolve_dsn(args.dsn) or os.environ.get("KONGTASK_TEST_DSN") or ""
    report = run_lifecycle(
        dsn,
        examples=args.examples,
        steps=args.steps,
        seed=args.seed,
        schema=args.schema,
        existing=args.existing,
        flavour=None if args.flavour is None else SchemaFlavour(args.flavour),
        skip=set(args.skip),
    )
    return 1 if report.failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
