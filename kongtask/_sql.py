"""The worker's named queries (docs/design/database.md#claiming and the sections after it),
formatted once per schema.

Each attribute of :class:`WorkerQueries` is one SQL statement with positional
parameters. The schema name is the only thing spliced in, always quoted by
:class:`~kongtask._schema_sql.SchemaSql`; everything else is a bind parameter.

Every statement here is idempotent with respect to the pool id, so a statement that
is retried after a lost connection (maybe committed, maybe not) does no harm: complete
and fail act only on rows still present or still ``locked_by`` the pool, and unlock a
queue row only for jobs the very same statement touched.

The ``claim_jobs`` … ``sweep_stale`` coroutines below are the asyncio side of each
unit of work (docs/design/stack.md#one-crossing-per-unit-of-work): call them through
:meth:`kongtask._pg.Database.run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from ._held import Snapshot
from ._schema_sql import SchemaSql

#: Locks older than this are stale: graphile-worker's fixed rule, never shortened for rows
#: that are not provably abandoned (docs/design/database.md#stale-locks-and-dead-pools).
STALE_LOCK_INTERVAL = "4 hours"


def _epoch_us_expr(column: str) -> str:
    """``j.<column>`` (timestamptz) as int8 microseconds since the Unix epoch.

    asyncpg decodes an int8 several times faster than a timestamptz
    (docs/design/stack.md#wide-rows-cost-decoding);
    :meth:`kongtask.Job.from_claim` turns it back into a datetime when it is read.
    ``extract`` is numeric on PostgreSQL 14+, so the value is exact (on 12 and 13 it is
    a float8, exact from 1898 to 2041). Values a Python datetime cannot hold (before
    year 1 or after 9999 in UTC, infinities included) become the int8 extremes, which
    :class:`kongtask.Job` reads as its documented bounds; PostgreSQL's own range
    reaches past what int8 microseconds since 1970 can hold, so they are never
    computed. The same expression compares a row with what its claim returned.
    """
    return f"""case when j.{column} >= '10000-01-01 00:00:00+00'::timestamptz
        then 9223372036854775807
      when j.{column} < '0001-01-01 00:00:00+00'::timestamptz then -9223372036854775807 - 1
      else (extract(epoch from j.{column}) * 1000000)::int8 end"""


def _epoch_us(column: str) -> str:
    """:func:`_epoch_us_expr` named ``<column>_us``."""
    return f"{_epoch_us_expr(column)} as {column}_us"


# The claim snapshot of held jobs (kongtask._held.claim_snapshot), as the rows `i` of an
# unnest: what the claim returned of each job's row.
_SNAPSHOT = """unnest($2::bigint[], $3::int[], $4::int[], $5::int8[], $6::text[], $7::int[])
    as i(id, attempts, revision, updated_us, key, job_queue_id)"""

# "The row `j` is as our claim left it": nobody removed, replaced or administered it since.
# remove_job and a replacing add_job clear the key and set attempts to max_attempts; the
# add and admin functions set updated_at; the claim itself changes none of these but
# attempts, whose claimed value is in the snapshot. An unsafe_dedupe hit (revision + 1,
# updated_at) changes nothing that runs, so a changed updated_at with a new revision
# still counts as unchanged.
_UNCHANGED = f"""(j.attempts = i.attempts and j.key is not distinct from i.key
      and ({_epoch_us_expr("updated_at")} = i.updated_us or j.revision <> i.revision))"""

# The same question without a snapshot (a claim whose reply was lost, the shutdown's
# safety net): add and admin functions set updated_at to their transaction's start, which
# is later than the claim's locked_at when they ran after it. (One that started before
# the claim and waited for its row lock is missed; see docs/reliability.md.)
_UNCHANGED_SINCE_LOCKED = "(j.updated_at < j.locked_at)"


#: The columns of a jobs row ``j`` as :meth:`kongtask.Job.from_claim` reads them (with a
#: ``queue_name`` beside): JSON as text, timestamps as ``<column>_us``.
JOB_COLUMNS_US = f"""
    j.id, j.task_id, j.job_queue_id, j.payload::text as payload, j.priority,
    {_epoch_us("run_at")}, j.attempts, j.max_attempts, j.key, j.flags::text as flags,
    j.last_error, {_epoch_us("created_at")}, {_epoch_us("updated_at")},
    {_epoch_us("locked_at")}, j.locked_by, j.revision"""

# Columns a claimed job brings back: what kongtask.Job.from_claim needs and nothing more,
# because asyncpg decodes every column returned (docs/design/stack.md#wide-rows-cost-decoding).
# `queue_name` comes from
# the queue row the claim locks anyway, so no second lookup is needed.
_CLAIM_RETURNING = f"{JOB_COLUMNS_US}, k.queue_name"


#: Whether a schema's jobs table has outgrown its planner statistics
#: (kongtask._worker._statistics): ``$1 min_rows int8, $2 growth float8, $3 schema text``
#: (the name as a value, unquoted); ``live_rows, counted_rows, stale``: whether the table
#: holds at least ``$1`` rows and more than ``$2`` times the rows its statistics counted.
#: n_live_tup is the statistics system's running count; reltuples is what the last
#: ANALYZE or VACUUM counted (-1: never). No row when the current role does not own the
#: table (its ANALYZE would be a no-op with a warning).
JOBS_STATISTICS_STALE = """
select s.n_live_tup as live_rows, c.reltuples as counted_rows,
       s.n_live_tup >= $1::int8 and s.n_live_tup > $2::float8 * greatest(c.reltuples, 0)
         as stale
from pg_stat_user_tables s
join pg_class c on c.oid = s.relid
where s.schemaname = $3::text and s.relname = '_private_jobs'
  and pg_has_role(c.relowner, 'USAGE')
"""


@dataclass(frozen=True, slots=True, repr=False)
class WorkerQueries(SchemaSql):
    """The worker's SQL for one schema. Construct once per pool: ``WorkerQueries(schema)``.

    Attributes (SQL strings, parameters in order):
      claim: ``$1 pool_id text, $2 task_ids int[], $3 limit int, $4 forbidden_flags
        text[] (NULL or empty = none), $5 now timestamptz (NULL = now())``. Returns the
        claimed rows ordered by priority, run_at, each also carrying ``n_candidates``:
        the larger of the two candidate scans (queued, unqueued); fewer than ``$3``
        means the claim saw every job it could take right now.
      complete: ``$1 pool_id, $2 job_ids bigint[]``. Returns the deleted ids.
      fail: ``$1 pool_id, $2 job_ids bigint[], $3 messages text[], $4
        replacement_payloads text[]`` (a NULL element keeps the payload). Returns
        ``id, attempts, max_attempts, run_at`` of the failed rows.
      complete_and_fail: ``complete`` and ``fail`` in one statement: ``$1 pool_id, $2
        completed ids, $3 failed ids, $4 messages, $5 replacement payloads``. Returns
        ``kind ('complete'|'fail'), id, attempts, max_attempts``.
      recheck: ``$1 pool_id, $2..$7`` the claim snapshot of held jobs
        (:func:`kongtask._held.claim_snapshot`). Returns the ids still ours and unchanged.
      return_jobs: ``$1 pool_id, $2..$7`` the claim snapshot. Returns the returned ids.
      return_unknown: ``$1 pool_id, $2 job_ids bigint[]``. Returns the returned ids.
      release_pool: ``$1 pool_id``: return every job still locked by the pool and unlock
        its queues (the safety net at the end of a shutdown).
      locked_by_pool: ``$1 pool_id``; the ids of the jobs the pool has locked.
      unsupported_tasks: ``$1 supported task_ids int[], $2 seconds float8, $3 limit int``;
        ``identifier, jobs`` of the tasks (other than ``$1``) with jobs ready (unlocked,
        attempts left) for more than ``$2`` seconds, counting at most ``$3`` jobs in all.
      sweep_stale: no parameters; returns ``jobs, queues`` (counts released).
      register_tasks: ``$1 identifiers text[]``; returns ``id, identifier`` rows for
        those identifiers, inserting only the missing ones (#619).
      add_job: ``select * from <schema>.add_job($1..$9)`` (the SQL function).
      analyze_job_tables: ``ANALYZE`` the jobs and queue tables, skipping one that
        another session is vacuuming or analyzing.
    """

    add_job: str = field(init=False)
    analyze_job_tables: str = field(init=False)
    claim: str = field(init=False)
    complete: str = field(init=False)
    complete_and_fail: str = field(init=False)
    fail: str = field(init=False)
    locked_by_pool: str = field(init=False)
    recheck: str = field(init=False)
    register_tasks: str = field(init=False)
    release_pool: str = field(init=False)
    return_jobs: str = field(init=False)
    return_unknown: str = field(init=False)
    sweep_stale: str = field(init=False)
    unsupported_tasks: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        sql: dict[str, str] = {}
        jobs = f"{s}._private_jobs"
        queues = f"{s}._private_job_queues"

        # Claim (docs/design/database.md#claiming). Steps:
        # 1. Candidates, in two index-ordered scans, each at most $3 and row-locked with
        #    SKIP LOCKED so concurrent claimers never wait on each other:
        #    `queued` joins each job to its queue row and locks both (FOR UPDATE OF j, q),
        #    so a job whose queue row is locked by anyone else, or whose queue is marked
        #    busy (`is_available` is re-checked on the newest row version), is skipped
        #    *before* the limit: it never uses up the claim. `unqueued` takes jobs
        #    without a queue (its own partial index).
        # 2. `firsts`: at most one job per named queue (#621): keep the first candidate
        #    of each queue and drop the rest before anything is marked.
        # 3. `kept`: the first $3 by (priority, run_at) over both sets.
        # 4. Mark the kept jobs' queues and the kept jobs with the pool id; attempts + 1.
        # Every queue row locked in step 1 belongs to a queue with a kept candidate unless
        # step 3 cut it; such a row is only row-locked until the statement ends.
        now = "coalesce($5::timestamptz, now())"
        job_filter = f"""j.is_available = true
    and j.run_at <= {now}
    and j.task_id = any($2::int[])
    and (j.flags is null or $4::text[] is null or not (j.flags ?| $4::text[]))"""
        sql["claim"] = f"""
with queued as (
  select j.id, j.job_queue_id, q.queue_name, j.priority, j.run_at
  from {jobs} j
  join {queues} q on q.id = j.job_queue_id
  where {job_filter}
    and q.is_available = true
    -- evaluated once: with no available queue the scan is skipped, instead of reading
    -- every ready or future job row to find none (flat cost, docs/performance.md)
    and exists (select 1 from {queues} q1 where q1.is_available = true)
  order by j.priority asc, j.run_at asc
  limit $3::int
  for update of j, q skip locked
),
unqueued as (
  select j.id, j.job_queue_id, null::text as queue_name, j.priority, j.run_at
  from {jobs} j
  where {job_filter}
    and j.job_queue_id is null
  order by j.priority asc, j.run_at asc
  limit $3::int
  for update of j skip locked
),
firsts as (
  select r.id, r.job_queue_id, r.queue_name, r.priority, r.run_at
  from (
    select qd.*, row_number() over (
      partition by qd.job_queue_id order by qd.priority, qd.run_at, qd.id) as rn
    from queued qd
  ) r
  where r.rn = 1
  union all
  select u.id, u.job_queue_id, u.queue_name, u.priority, u.run_at from unqueued u
),
kept as (
  select f.id, f.job_queue_id, f.queue_name from firsts f
  order by f.priority asc, f.run_at asc
  limit $3::int
),
marked_queues as (
  update {queues} q
  set locked_by = $1::text, locked_at = {now}
  from kept k
  where q.id = k.job_queue_id
  returning q.id
),
claimed as (
  update {jobs} j
  set attempts = j.attempts + 1, locked_by = $1::text, locked_at = {now}
  from kept k
  where j.id = k.id
  returning {_CLAIM_RETURNING}
),
-- A claim's commit does not wait for the WAL flush (why no job can be lost by it:
-- docs/reliability.md). The claiming session says so for itself where it has a session
-- of its own; behind a transaction pooler this transaction-local setting is the only
-- way. Run once per claim (a CTE); a claim that takes nothing writes nothing to flush.
async_commit as (select pg_catalog.set_config('synchronous_commit', 'off', true) as s)
select c.*, greatest((select count(*) from queued), (select count(*) from unqueued))
       as n_candidates
from claimed c cross join async_commit
order by c.priority asc, c.run_at_us asc
"""

        # Complete (§5.4): delete by id (no locked_by check, as upstream), and unlock
        # the queue rows of the jobs this statement deleted, only where we hold them.
        sql["complete"] = f"""
with deleted as (
  delete from {jobs} j where j.id = any($2::bigint[]) returning j.id, j.job_queue_id
),
unlocked as (
  update {queues} q set locked_at = null, locked_by = null
  from deleted d
  where q.id = d.job_queue_id and q.locked_by = $1::text
  returning q.id
)
select d.id from deleted d
"""

        # Fail (§5.5): only rows we still hold. attempts already counted at claim.
        # exp() of a double; least(attempts, 10) caps the delay at ~6 h.
        fail_update = f"""
  update {jobs} j
  set last_error = i.message,
      run_at = greatest(now(), j.run_at) + exp(least(j.attempts, 10)) * interval '1 second',
      locked_at = null,
      locked_by = null,
      payload = coalesce(i.payload::json, j.payload)
  from fail_input i
  where j.id = i.id and j.locked_by = $1::text"""
        sql["fail"] = f"""
with fail_input as (
  select t.id, t.message, t.payload
  from unnest($2::bigint[], $3::text[], $4::text[]) as t(id, message, payload)
),
failed as ({fail_update}
  returning j.id, j.job_queue_id, j.attempts, j.max_attempts, j.run_at
),
unlocked as (
  update {queues} q set locked_at = null, locked_by = null
  from failed f
  where q.id = f.job_queue_id and q.locked_by = $1::text
  returning q.id
)
select f.id, f.attempts, f.max_attempts, f.run_at from failed f
"""

        # Both in one statement and one transaction: the completer's usual round trip.
        # The two sets of ids are disjoint (a job has one outcome), so the two
        # data-modifying CTEs never touch the same job row; one CTE unlocks all queues.
        sql["complete_and_fail"] = f"""
with deleted as (
  delete from {jobs} j where j.id = any($2::bigint[]) returning j.id, j.job_queue_id
),
fail_input as (
  select t.id, t.message, t.payload
  from unnest($3::bigint[], $4::text[], $5::text[]) as t(id, message, payload)
),
failed as ({fail_update}
  returning j.id, j.job_queue_id, j.attempts, j.max_attempts
),
unlocked as (
  update {queues} q set locked_at = null, locked_by = null
  where q.locked_by = $1::text
    and q.id in (select d.job_queue_id from deleted d
                 union all
                 select f.job_queue_id from failed f)
  returning q.id
)
select 'complete' as kind, d.id, null::smallint as attempts, null::smallint as max_attempts
from deleted d
union all
select 'fail', f.id, f.attempts, f.max_attempts from failed f
"""

        # Recheck held jobs before they start: the ids of those still locked by us and
        # unchanged since their claim (``$2..$7``: the claim snapshot, _SNAPSHOT).
        sql["recheck"] = f"""
select i.id from {_SNAPSHOT}
join {jobs} j on j.id = i.id
where j.locked_by = $1::text and {_UNCHANGED}
"""

        # Hand back claimed, unstarted jobs (§5.6): ``$1`` pool id, ``$2..$7`` their
        # claim snapshot. A row unchanged since the claim gets its attempt back; a row
        # changed meanwhile (removed, replaced, administered) is only unlocked: giving
        # the attempt back would undo remove_job's `attempts = max_attempts` and run it.
        # The test is in the UPDATE itself, so a concurrent change is judged on the row
        # version the update locks.
        # Queue rows: those of the jobs returned, and those of jobs deleted while held
        # (complete_jobs), unless another job of ours in that queue holds it now.
        sql["return_jobs"] = f"""
with returned as (
  update {jobs} j
  set attempts = case when {_UNCHANGED} then greatest(0, j.attempts - 1) else j.attempts end,
      locked_at = null, locked_by = null
  from {_SNAPSHOT}
  where j.id = i.id and j.locked_by = $1::text
  returning j.id, j.job_queue_id
),
vanished as (
  select i.job_queue_id from {_SNAPSHOT}
  where i.job_queue_id is not null
    and not exists (select 1 from {jobs} j where j.id = i.id)
),
unlocked as (
  update {queues} q set locked_at = null, locked_by = null
  where q.locked_by = $1::text
    and (q.id in (select r.job_queue_id from returned r)
         or (q.id in (select v.job_queue_id from vanished v)
             and not exists (select 1 from {jobs} j
                             where j.job_queue_id = q.id and j.locked_by = $1::text
                               and j.id <> all($2::bigint[]))))
  returning q.id
)
select r.id from returned r
"""

        # Hand back jobs this pool holds without knowing their claim (a claim whose reply
        # was lost): ``$1`` pool id, ``$2`` job ids. As return_jobs, judged by the row.
        sql["return_unknown"] = f"""
with returned as (
  update {jobs} j
  set attempts = case when {_UNCHANGED_SINCE_LOCKED} then greatest(0, j.attempts - 1)
                 else j.attempts end,
      locked_at = null, locked_by = null
  where j.id = any($2::bigint[]) and j.locked_by = $1::text
  returning j.id, j.job_queue_id
),
unlocked as (
  update {queues} q set locked_at = null, locked_by = null
  from returned r
  where q.id = r.job_queue_id and q.locked_by = $1::text
  returning q.id
)
select r.id from returned r
"""

        # Safety net for shutdown: anything still locked by this pool after every
        # handler has finished and every result was written was claimed but never
        # started (e.g. a claim whose reply raced a cancellation), so it is returned,
        # judged by the row as return_unknown.
        sql["release_pool"] = f"""
with returned as (
  update {jobs} j
  set attempts = case when {_UNCHANGED_SINCE_LOCKED} then greatest(0, j.attempts - 1)
                 else j.attempts end,
      locked_at = null, locked_by = null
  where j.locked_by = $1::text
  returning j.id
),
unlocked as (
  update {queues} q set locked_at = null, locked_by = null
  where q.locked_by = $1::text
  returning q.id
)
select (select count(*) from returned) as jobs, (select count(*) from unlocked) as queues
"""

        # The ids this pool holds in the database; the pool compares them with what it
        # knows after a claim whose reply was lost (it may have committed).
        sql["locked_by_pool"] = f"select j.id from {jobs} j where j.locked_by = $1::text"
        # `is_available` (unlocked, attempts left) makes this a scan of the claim's
        # partial index, which also holds task_id; the limit bounds the rows counted.
        sql["unsupported_tasks"] = f"""
select t.identifier, count(*) as jobs
from (
  select j.task_id from {jobs} j
  where j.is_available = true
    and j.run_at <= now() - make_interval(secs => $2::float8)
    and j.task_id <> all($1::int[])
  limit $3::int
) as j
join {s}._private_tasks t on t.id = j.task_id
group by t.identifier
order by count(*) desc, t.identifier
"""

        # Stale locks (§5.7): 4 h, attempts not decremented, run_at not in the past.
        sql["sweep_stale"] = f"""
with j as (
  update {jobs}
  set locked_at = null, locked_by = null, run_at = greatest(run_at, now())
  where locked_at < now() - interval '{STALE_LOCK_INTERVAL}'
  returning id
),
q as (
  update {queues}
  set locked_at = null, locked_by = null
  where locked_at < now() - interval '{STALE_LOCK_INTERVAL}'
  returning id
)
select (select count(*) from j) as jobs, (select count(*) from q) as queues
"""

        # Task registration (§5.2, #619): insert only names that are missing, so the
        # identity sequence is not consumed by every start. Rows inserted by this
        # statement are invisible to its own snapshot, hence the union with `ins`;
        # a concurrent insert that won the race is picked up by the caller's retry.
        sql["register_tasks"] = f"""
with wanted as (
  select distinct w.identifier from unnest($1::text[]) as w(identifier)
),
ins as (
  insert into {s}._private_tasks (identifier)
  select w.identifier from wanted w
  where not exists (select 1 from {s}._private_tasks t where t.identifier = w.identifier)
  on conflict do nothing
  returning id, identifier
)
select i.id, i.identifier from ins i
union all
select t.id, t.identifier from {s}._private_tasks t where t.identifier = any($1::text[])
"""

        # Planner statistics (kongtask._worker._statistics; the check is
        # JOBS_STATISTICS_STALE, a module constant: it takes the schema as a value).
        sql["analyze_job_tables"] = f"analyze (skip_locked) {jobs}, {queues}"

        sql["add_job"] = f"""
select * from {s}.add_job(
  identifier => $1::text, payload => $2::json, queue_name => $3::text,
  run_at => $4::timestamptz, max_attempts => $5::int, job_key => $6::text,
  priority => $7::int, flags => $8::text[], job_key_mode => $9::text)
"""

        return sql


# ---------------------------------------------------------------------------
# asyncio side: one coroutine per unit of work (call through Database.run)


async def claim_jobs(
    conn: asyncpg.Connection,
    q: WorkerQueries,
    pool_id: str,
    task_ids: Sequence[int],
    limit: int,
    forbidden_flags: Sequence[str] | None = None,
    now: datetime | None = None,
) -> list[asyncpg.Record]:
    """Claim up to ``limit`` jobs as ``pool_id``: rows for :meth:`kongtask.Job.from_claim`
    (timestamps as ``<column>_us``, see ``_epoch_us``), each with ``task_id`` and
    ``n_candidates``."""
    flags = list(forbidden_flags) if forbidden_flags else None
    return await conn.fetch(q.claim, pool_id, list(task_ids), limit, flags, now)


Outcome = tuple[str, int, int | None, int | None]


async def complete_and_fail(
    conn: asyncpg.Connection,
    q: WorkerQueries,
    pool_id: str,
    completed: Sequence[int],
    failed: Sequence[int],
    messages: Sequence[str],
    payloads: Sequence[str | None],
) -> list[Outcome]:
    """One round trip for a batch of outcomes (one statement, so all or nothing).

    Returns ``(kind, id, attempts, max_attempts)`` for each row the statement changed;
    ``kind`` is ``"complete"`` or ``"fail"`` (attempts are ``None`` for completions).
    """
    if not failed:
        if not completed:
            return []
        # complete-only batches (the common case) use the cheaper statement
        rows = await conn.fetch(q.complete, pool_id, list(completed))
        return [("complete", r["id"], None, None) for r in rows]
    rows = await conn.fetch(
        q.complete_and_fail, pool_id, list(completed), list(failed), list(messages), list(payloads)
    )
    return [(r["kind"], r["id"], r["attempts"], r["max_attempts"]) for r in rows]


async def return_jobs(
    conn: asyncpg.Connection, q: WorkerQueries, pool_id: str, snapshot: Snapshot
) -> list[int]:
    """Hand back held jobs (given by their claim snapshot); the returned ids."""
    if not snapshot[0]:
        return []
    rows = await conn.fetch(q.return_jobs, pool_id, *snapshot)
    return [int(r["id"]) for r in rows]


async def return_unknown(
    conn: asyncpg.Connection, q: WorkerQueries, pool_id: str, job_ids: Sequence[int]
) -> list[int]:
    """Hand back jobs locked by ``pool_id`` whose claim it never saw; the returned ids."""
    if not job_ids:
        return []
    rows = await conn.fetch(q.return_unknown, pool_id, list(job_ids))
    return [int(r["id"]) for r in rows]


async def recheck(
    conn: asyncpg.Connection, q: WorkerQueries, pool_id: str, snapshot: Snapshot
) -> set[int]:
    """The ids of held jobs still locked by ``pool_id`` and unchanged since their claim."""
    if not snapshot[0]:
        return set()
    rows = await conn.fetch(q.recheck, pool_id, *snapshot)
    return {int(r["id"]) for r in rows}


async def register_tasks(
    conn: asyncpg.Connection, q: WorkerQueries, identifiers: Sequence[str]
) -> dict[str, int]:
    """``identifier -> task id`` for every identifier, inserting the missing ones."""
    wanted = sorted(set(identifiers))
    found: dict[str, int] = {}
    for _ in range(5):
        rows = await conn.fetch(q.register_tasks, wanted)
        found = {r["identifier"]: int(r["id"]) for r in rows}
        if len(found) == len(wanted):
            return found
        # a concurrent registration inserted some name after our snapshot: read again
    missing = sorted(set(wanted) - set(found))
    raise RuntimeError(f"could not register task identifiers {missing}")
