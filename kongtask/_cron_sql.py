"""The SQL of the cron scheduler (docs/design/database.md#cron), rendered per schema.

Values travel as bound parameters; the schema name is the only text spliced in, and only
through :class:`~kongtask._schema_sql.SchemaSql`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._schema_sql import SchemaSql


@dataclass(frozen=True, slots=True, repr=False)
class CronQueries(SchemaSql):
    """Every statement of the cron scheduler, for one schema.

    Attributes:
      register: register never-seen identifiers; return the rows that existed before.
        ``$1`` text[] identifiers, ``$2`` timestamptz start time. New identifiers get
        ``known_since = $2`` and no ``last_execution``; the SELECT runs on the statement's
        snapshot, which does not see the CTE's inserts, so exactly the previously known
        rows come back (only those are backfilled).
      schedule: claim one minute for some identifiers and add a job for each claim won.
        Parameters: ``$1`` timestamptz (the minute), then parallel arrays in crontab
        order: ``$2`` identifiers, ``$3`` task names, ``$4`` payloads (JSON text), ``$5``
        queue names, ``$6`` max attempts, ``$7`` job keys, ``$8`` priorities, ``$9`` job
        key modes. Returns the ids of the jobs added.
      known_crontabs: all ``known_crontabs`` rows (for ``kongtask cron list``).
    """

    register: str = field(init=False)
    schedule: str = field(init=False)
    known_crontabs: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        return dict(
            register=f"""
with registered as (
  insert into {s}._private_known_crontabs (identifier, known_since)
  select ident, $2::timestamptz from unnest($1::text[]) as u(ident)
  on conflict (identifier) do nothing
)
select identifier, known_since, last_execution
from {s}._private_known_crontabs
where identifier = any($1::text[])
""",
            # The upsert returns a row only where the stored `last_execution` is NULL or
            # older than $1. A concurrent scheduler (kongtask or Node) that claimed the same
            # minute holds the row lock until it commits; this statement then re-checks the
            # condition, gets no row and adds no job, so each (identifier, minute) yields
            # exactly one job. Rows are upserted, and jobs added, in crontab order: processes
            # sharing a crontab then lock the rows in the same order, which keeps them from
            # deadlocking one another (a deadlock victim just retries, see `_cron`).
            # `add_job` runs in that order because the lateral call follows its sorted
            # outer input.
            schedule=f"""
with specs as (
  select *
  from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
              $8::int[], $9::text[])
       with ordinality
       as u(identifier, task, payload, queue_name, max_attempts, job_key, priority,
            job_key_mode, ord)
), claimed as (
  insert into {s}._private_known_crontabs as kc (identifier, known_since, last_execution)
  select identifier, $1::timestamptz, $1::timestamptz from specs order by ord
  on conflict (identifier) do update
    set last_execution = excluded.last_execution
    where kc.last_execution is null or kc.last_execution < excluded.last_execution
  returning kc.identifier
)
select j.id
from (
  select specs.* from specs join claimed using (identifier) order by specs.ord
) as c
cross join lateral {s}.add_job(
  c.task,
  c.payload::json,
  c.queue_name,
  $1::timestamptz,
  c.max_attempts,
  c.job_key,
  c.priority,
  null::text[],
  c.job_key_mode
) as j
""",
            known_crontabs=(
                f"select identifier, known_since, last_execution from {s}._private_known_crontabs"
            ),
        )
