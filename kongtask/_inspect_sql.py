"""Named queries of the inspection API (:mod:`kongtask._inspect`), rendered per schema.

They read graphile-worker 0.18's tables as they are (no index, view or function added),
so they work on a database only Node workers use. Values travel as bound parameters; the
schema name is spliced in only as quoted by :func:`~kongtask._config.quote_ident`, and the
job listing is assembled from the constant clauses of this module, one per filter given.

A job's derived state, first match wins:

1. ``running``: locked (``locked_at`` set), whatever else holds;
2. ``permanently_failed``: ``attempts >= max_attempts``;
3. ``retrying``: ``run_at`` in the future and attempted before;
4. ``scheduled``: ``run_at`` in the future and never attempted;
5. ``waiting_on_queue``: due, but its named queue is locked by another job;
6. ``ready``: due, and a worker for its task may claim it now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Literal

from ._config import quote_ident
from ._liveness_sql import LOCK_CLASS, MARKER
from ._schema_sql import SchemaSql

JobState = Literal[
    "ready", "scheduled", "retrying", "running", "waiting_on_queue", "permanently_failed"
]
#: Every derived state, in the order the CLI shows them.
JOB_STATES: Final[tuple[JobState, ...]] = (
    "ready",
    "waiting_on_queue",
    "scheduled",
    "retrying",
    "running",
    "permanently_failed",
)

# The state of job `j` whose queue row (or null) is `q`, as in the module docstring.
_STATE = """case
    when j.locked_at is not null then 'running'
    when j.attempts >= j.max_attempts then 'permanently_failed'
    when j.run_at > now() then case when j.attempts > 0 then 'retrying' else 'scheduled' end
    when q.locked_at is not null then 'waiting_on_queue'
    else 'ready'
  end"""

_MARKED_ID_RE = f"^(ot)?pool-{MARKER}[0-9a-f]{{10}}$"
# The unsigned second key of a marked pool id's liveness lock, as pg_locks shows it.
_KEY2_UNSIGNED = "('x' || right({id}, 8))::bit(32)::bigint"

# Listing filters: name -> clause over `j` (the job), `t` (its task), `q` (its queue row)
# and `s` (its derived state), with `{}` standing for the parameter's placeholder.
# Tasks and queues are matched by id, looked up first: the planner then estimates the
# share of jobs from the jobs table's own statistics. Matched by name through the join, it
# relies on the statistics of the tasks and queues tables, which autovacuum never takes
# while they hold fewer than 50 rows, and guesses a share small enough to pick a scan of
# the whole jobs table over walking its primary key.
_FILTERS: Final = {
    "ids": "j.id = any({}::bigint[])",
    "tasks": (
        "j.task_id = any(array(select t2.id from {s}._private_tasks as t2"
        " where t2.identifier = any({}::text[])))"
    ),
    "queues": (
        "j.job_queue_id = any(array(select q2.id from {s}._private_job_queues as q2"
        " where q2.queue_name = any({}::text[])))"
    ),
    "states": "s.state = any({}::text[])",
    "key": "j.key = {}::text",
    "min_id": "j.id >= {}::bigint",
    "max_id": "j.id <= {}::bigint",
    "after_id": "j.id > {}::bigint",
}
# A condition on the job row alone that every job in the state meets: it lets the scan drop
# rows before the queue row is joined in (the exact state is then checked as well).
_STATE_ROW_CONDITION: Final[dict[JobState, str]] = {
    "running": "j.locked_at is not null",
    "permanently_failed": "(j.locked_at is null and j.attempts >= j.max_attempts)",
    "retrying": "(j.is_available and j.run_at > now() and j.attempts > 0)",
    "scheduled": "(j.is_available and j.run_at > now() and j.attempts = 0)",
    "waiting_on_queue": "(j.is_available and j.run_at <= now() and j.job_queue_id is not null)",
    "ready": "(j.is_available and j.run_at <= now())",
}
#: The states whose row condition alone decides them (the others depend on the queue's
#: lock). Filtering on these needs no check of the derived state: that check would only
#: make the planner guess far fewer matches than there are, and scan the whole table
#: instead of walking the primary key until a page is full.
ROW_DECIDED_STATES: Final[frozenset[JobState]] = frozenset(
    ("running", "permanently_failed", "retrying", "scheduled")
)
#: The listing filters, in the order :meth:`InspectQueries.list_jobs` binds them.
LIST_FILTERS: Final = tuple(_FILTERS)


@dataclass(frozen=True, slots=True, repr=False)
class InspectQueries(SchemaSql):
    """Every fixed statement of the inspection API, for one schema.

    Attributes:
      counts: one row per (task, queue) that has jobs: ``task``, ``queue`` (null
        without one), one count per state, ``oldest_ready_age`` and ``oldest_lock_age`` (seconds, by
        the server's clock).
        One scan of the jobs table, aggregated per (task id, queue id) before the names
        and queue locks are joined in.
      oldest_ready: seconds since the oldest ready job became due, or null. Reads only the
        available rows (the workers' partial index ``jobs_main_index`` covers them).
      pools: one row per pool that holds a liveness lock or a job or queue row.
    """

    counts: str = field(init=False)
    oldest_ready: str = field(init=False)
    pools: str = field(init=False)
    list_jobs_from: str = field(init=False)

    def list_jobs(
        self, filters: Sequence[str], descending: bool, states: Sequence[JobState] = ()
    ) -> str:
        """The job listing with the given filters (names from :data:`LIST_FILTERS`, bound as
        ``$2, $3, …`` in that order; ``$1`` is the limit).

        Ordered by id, so ``after_id`` (the last id of the previous page) pages through a
        changing table without skipping or repeating rows (keyset pagination); with
        ``descending``, ``after_id`` continues below that id instead. ``states``: the
        (checked) states the ``states`` filter binds, to add their row conditions.
        """
        tail = _list_jobs_tail(quote_ident(self.schema), tuple(filters), descending, tuple(states))
        return self.list_jobs_from + tail

    def _render(self, s: str) -> dict[str, str]:
        return dict(
            # The job listing up to its conditions (see list_jobs).
            list_jobs_from=f"""
select j.*, t.identifier as task_identifier, q.queue_name, s.state,
  extract(epoch from now() - j.locked_at)::float8 as lock_age
from {s}._private_jobs as j
left join {s}._private_tasks as t on t.id = j.task_id
left join {s}._private_job_queues as q on q.id = j.job_queue_id
cross join lateral (select {_STATE} as state) as s""",
            counts=f"""
with per_group as (
  select j.task_id, j.job_queue_id,
    count(*) filter (where j.locked_at is not null) as running,
    count(*) filter (where j.locked_at is null and j.attempts >= j.max_attempts)
      as permanently_failed,
    count(*) filter (where j.is_available and j.run_at > now() and j.attempts > 0) as retrying,
    count(*) filter (where j.is_available and j.run_at > now() and j.attempts = 0) as scheduled,
    count(*) filter (where j.is_available and j.run_at <= now()) as due,
    min(j.run_at) filter (where j.is_available and j.run_at <= now()) as oldest_due_at,
    min(j.locked_at) as oldest_lock_at
  from {s}._private_jobs as j
  group by j.task_id, j.job_queue_id
)
select t.identifier as task, q.queue_name as queue,
  case when q.locked_at is null then g.due else 0 end as ready,
  case when q.locked_at is null then 0 else g.due end as waiting_on_queue,
  g.scheduled, g.retrying, g.running, g.permanently_failed,
  extract(epoch from now() - case when q.locked_at is null then g.oldest_due_at end)::float8
    as oldest_ready_age,
  extract(epoch from now() - g.oldest_lock_at)::float8 as oldest_lock_age
from per_group as g
left join {s}._private_tasks as t on t.id = g.task_id
left join {s}._private_job_queues as q on q.id = g.job_queue_id
order by t.identifier, q.queue_name nulls first""",
            # A loose index scan: for each priority present among the available rows (a
            # recursive walk of jobs_main_index, one probe per priority), the first ready job
            # in run_at order, skipping those whose queue is locked. Cost grows with the
            # number of priorities, not with the backlog.
            oldest_ready=f"""
with recursive priorities as (
  (select j.priority from {s}._private_jobs as j
   where j.is_available order by j.priority limit 1)
  union all
  select (select j.priority from {s}._private_jobs as j
          where j.is_available and j.priority > p.priority order by j.priority limit 1)
  from priorities as p where p.priority is not null
)
select extract(epoch from now() - min(first.run_at))::float8
from priorities as p
cross join lateral (
  select j.run_at from {s}._private_jobs as j
  where j.is_available and j.priority = p.priority and j.run_at <= now()
    and (j.job_queue_id is null or exists (
      select 1 from {s}._private_job_queues as q
      where q.id = j.job_queue_id and q.locked_at is null))
  order by j.run_at limit 1
) as first
where p.priority is not null""",
            # Live kongtask pools come from their liveness locks (pg_locks shows the lock's
            # session, so its start and address), every other pool from the rows it locks.
            # A marked id holding rows with nobody holding its lock is a dead kongtask pool;
            # an unmarked id (Node, or kongtask behind pgBouncer) cannot be checked.
            pools=f"""
with held as (
  select h.pool_id, sum(h.jobs)::bigint as jobs, sum(h.queues)::bigint as queues,
         min(h.oldest_lock_at) as oldest_lock_at
  from (
    select locked_by as pool_id, count(*) as jobs, 0 as queues, min(locked_at) as oldest_lock_at
    from {s}._private_jobs where locked_at is not null group by locked_by
    union all
    select locked_by, 0, count(*), min(locked_at)
    from {s}._private_job_queues where locked_at is not null group by locked_by
  ) as h
  group by h.pool_id
), marked as (
  select h.*, {_KEY2_UNSIGNED.format(id="h.pool_id")} as key
  from held as h where h.pool_id ~ '{_MARKED_ID_RE}'
), live as (
  select distinct on (l.objid) l.objid::bigint as key, a.backend_start, a.client_addr::text
  from pg_catalog.pg_locks as l
  left join pg_catalog.pg_stat_activity as a on a.pid = l.pid
  where l.locktype = 'advisory'
    and l.database = (select d.oid from pg_catalog.pg_database as d
                      where d.datname = pg_catalog.current_database())
    and l.classid = {LOCK_CLASS}::oid
    and l.objsubid = 2
  order by l.objid, l.granted desc
)
select 'kongtask' as kind, m.pool_id, lpad(to_hex(coalesce(m.key, v.key)), 8, '0') as id_suffix,
       v.key is not null as alive, coalesce(m.jobs, 0) as jobs, coalesce(m.queues, 0) as queues,
       extract(epoch from now() - m.oldest_lock_at)::float8 as oldest_lock_age,
       v.backend_start as connected_at, v.client_addr
from marked as m full join live as v on v.key = m.key
union all
select 'unmarked', h.pool_id, null, null, h.jobs, h.queues,
       extract(epoch from now() - h.oldest_lock_at)::float8, null, null
from held as h where h.pool_id !~ '{_MARKED_ID_RE}'
order by 1, 2 nulls last, 3""",
        )


@lru_cache(maxsize=256)
def _list_jobs_tail(
    s: str, filters: tuple[str, ...], descending: bool, states: tuple[JobState, ...]
) -> str:
    """The conditions, order and limit of :meth:`InspectQueries.list_jobs` for the quoted
    schema name ``s``, built from the constant clauses of this module only."""
    where = []
    for number, name in enumerate(filters, start=2):
        clause = _FILTERS[name]
        if name == "after_id" and descending:
            clause = "j.id < {}::bigint"
        where.append(clause.format(f"${number}", s=s))
    if states:
        where.append("(" + " or ".join(_STATE_ROW_CONDITION[state] for state in states) + ")")
    condition = " and ".join(where) if where else "true"
    order = "desc" if descending else "asc"
    return f"""
where {condition}
order by j.id {order}
limit $1::int"""
