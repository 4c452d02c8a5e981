"""The client's named queries, rendered once per schema.

User values always travel as bound parameters. The only text spliced into a query is the
schema name, and only through :class:`~kongtask._schema_sql.SchemaSql`. asyncpg keeps a
per-connection cache of prepared statements keyed by query text, so each of these is
parsed and planned once per pooled connection (unless ``prepared_statements=False`` for
pgBouncer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._liveness_sql import MARKED_ID_RE
from ._schema_sql import SchemaSql
from ._sql import JOB_COLUMNS_US

# Job rows come back as kongtask.Job.from_claim reads them (JOB_COLUMNS_US): timestamps
# as int8 microseconds, so that one a Python datetime cannot hold reads as a documented
# bound instead of failing the whole fetch in asyncpg's decoder.
# The admin functions do not create task or queue rows, so the statement's own snapshot
# already holds the names: joining them in costs nothing and survives a concurrent
# GC_JOB_QUEUES that would empty a queue the moment its last job is deleted.
_WITH_NAMES = """
select {cols}, t.identifier as task_identifier, q.queue_name
from {call} as j
left join {s}._private_tasks as t on t.id = j.task_id
left join {s}._private_job_queues as q on q.id = j.job_queue_id
"""


# The jobs of ``$1`` that a marked kongtask pool (kongtask._liveness) holds: locked less
# than 4 hours ago (older locks count as free for graphile-worker's functions).
_HELD = f"""j.id = any($1::bigint[])
    and j.locked_at >= now() - interval '4 hours'
    and j.locked_by ~ '{MARKED_ID_RE}'"""


def _held_action(s: str, statement: str) -> str:
    return f"""
with done as ({statement})
select {JOB_COLUMNS_US}, t.identifier as task_identifier, q.queue_name
from done as j
left join {s}._private_tasks as t on t.id = j.task_id
left join {s}._private_job_queues as q on q.id = j.job_queue_id
"""


@dataclass(frozen=True, slots=True, repr=False)
class ClientQueries(SchemaSql):
    """Every statement the client sends, for one schema."""

    add_job: str = field(init=False)
    add_jobs: str = field(init=False)
    names_by_id: str = field(init=False)
    complete_jobs: str = field(init=False)
    permanently_fail_jobs: str = field(init=False)
    reschedule_jobs: str = field(init=False)
    complete_held: str = field(init=False)
    permanently_fail_held: str = field(init=False)
    reschedule_held: str = field(init=False)
    remove_job: str = field(init=False)
    force_unlock_workers: str = field(init=False)
    delete_permafailed_jobs: str = field(init=False)
    gc_task_identifiers: str = field(init=False)
    gc_job_queues: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        def with_names(call: str) -> str:
            return _WITH_NAMES.format(call=call, s=s, cols=JOB_COLUMNS_US)

        return dict(
            # Named arguments: immune to parameter order, and the casts pick the one overload.
            add_job=f"""
select {JOB_COLUMNS_US} from {s}.add_job(
  identifier => $1::text, payload => $2::json, queue_name => $3::text,
  run_at => $4::timestamptz, max_attempts => $5::int, job_key => $6::text,
  priority => $7::int, flags => $8::text[], job_key_mode => $9::text
) as j""",
            # One JSON document for the whole batch: a single json.dumps in Python and one
            # parse on the server cost less client CPU than asyncpg's per-field encoding of
            # a `$1::job_spec[]` array, and client CPU is what trio-asyncio makes scarce
            # (docs/design/stack.md#batch-or-lose; the figures:
            # docs/performance.md#figures-behind-choices-in-the-code).
            add_jobs=f"""
select {JOB_COLUMNS_US} from {s}.add_jobs(
  array(select spec from json_populate_recordset(null::{s}.job_spec, $1::json) as spec),
  $2::boolean
) as j""",
            names_by_id=f"""
select false as is_queue, id, identifier as name from {s}._private_tasks where id = any($1::int[])
union all
select true, id, queue_name from {s}._private_job_queues where id = any($2::int[])""",
            complete_jobs=with_names(f"{s}.complete_jobs($1::bigint[])"),
            permanently_fail_jobs=with_names(f"{s}.permanently_fail_jobs($1::bigint[], $2::text)"),
            reschedule_jobs=with_names(
                f"{s}.reschedule_jobs($1::bigint[], run_at => $2::timestamptz, "
                "priority => $3::int, attempts => $4::int, max_attempts => $5::int)"
            ),
            remove_job=with_names(f"{s}.remove_job($1::text)"),
            # The same three actions on jobs a kongtask pool holds (claimed, maybe not yet
            # started), which graphile-worker's functions skip as "running". The pool
            # rechecks a held job before it starts, sees the change and does not start it;
            # its hand-back leaves the row as the action left it (docs/reliability.md).
            # Same arguments as the function each one follows, run after it in the same
            # transaction: the function takes the unlocked rows, these the held ones.
            complete_held=_held_action(
                s, f"delete from {s}._private_jobs as j where {_HELD} returning j.*"
            ),
            permanently_fail_held=_held_action(
                s,
                f"""update {s}._private_jobs as j
    set last_error = coalesce($2::text, 'Manually marked as failed'),
        attempts = j.max_attempts, updated_at = now()
    where {_HELD} returning j.*""",
            ),
            # Without a new `attempts`, the held claim's attempt is given back, as the
            # hand-back of an unchanged job would.
            reschedule_held=_held_action(
                s,
                f"""update {s}._private_jobs as j
    set run_at = coalesce($2::timestamptz, j.run_at),
        priority = coalesce($3::int::smallint, j.priority),
        attempts = coalesce($4::int::smallint, greatest(0, j.attempts - 1)::smallint),
        max_attempts = coalesce($5::int::smallint, j.max_attempts),
        updated_at = now()
    where {_HELD} returning j.*""",
            ),
            # What graphile-worker's force_unlock_workers() does, with the rows it released
            # counted per pool id (the function returns nothing).
            force_unlock_workers=f"""
with jobs as (
  update {s}._private_jobs as j set locked_at = null, locked_by = null
  from (select id, locked_by from {s}._private_jobs where locked_by = any($1::text[])) as old
  where j.id = old.id and j.locked_by = old.locked_by
  returning old.locked_by
), queues as (
  update {s}._private_job_queues as q set locked_at = null, locked_by = null
  from (select id, locked_by from {s}._private_job_queues where locked_by = any($1::text[])) as old
  where q.id = old.id and q.locked_by = old.locked_by
  returning old.locked_by
)
select pool_id,
  (select count(*) from jobs where jobs.locked_by = pool_id) as jobs,
  (select count(*) from queues where queues.locked_by = pool_id) as queues
from unnest($1::text[]) as pool_id""",
            # `>=` (graphile-worker: `=`), so rows reschedule_jobs pushed past max_attempts go too:
            # docs/design/database.md#permanently-failed-cleanup
            delete_permafailed_jobs=f"""
delete from {s}._private_jobs
where attempts >= max_attempts and locked_at is null""",
            gc_task_identifiers=f"""
delete from {s}._private_tasks as t
where t.identifier <> all($1::text[])
  and not exists (select 1 from {s}._private_jobs as j where j.task_id = t.id)""",
            gc_job_queues=f"""
delete from {s}._private_job_queues as q
where q.locked_at is null
  and not exists (select 1 from {s}._private_jobs as j where j.job_queue_id = q.id)""",
        )
