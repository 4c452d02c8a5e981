"""Plans and timings of the inspection API on a 1,000,000-job table.

Usage::

    python -m stress.inspect_plans                 # throwaway PostgreSQL
    python -m stress.inspect_plans --dsn postgresql://...   # a scratch database there
    python -m stress.inspect_plans --rows 200000 --plans    # also print every plan

The table gets ``--rows`` jobs spread over 10 tasks and 50 named queues (half the jobs
have none): 70 % ready, 10 % scheduled, 5 % retrying, 5 % permanently failed, 10 % in
queues whose row is locked, and 200 running jobs of 4 pools. Each statement of the API is
run through :class:`kongtask.Client` ``--reps`` times; the median and the plan's top node
are printed as a markdown table (docs/operations.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any

import trio

import kongtask
from kongtask._inspect import list_jobs_statement
from kongtask._migrate import migrate
from kongtask._pg import open_database

S = "graphile_worker"

FILL = f"""
insert into {S}._private_tasks (identifier)
  select 'task_' || i from generate_series(0, 9) as i;
insert into {S}._private_job_queues (queue_name, locked_at, locked_by)
  select 'queue_' || i, case when i < 5 then now() end,
         case when i < 5 then 'pool-00000000000000000' || (i % 4) end
  from generate_series(0, 49) as i;
insert into {S}._private_jobs
  (job_queue_id, task_id, payload, priority, run_at, attempts, max_attempts, last_error, key)
select
  case when i % 2 = 0 then (select id from {S}._private_job_queues
                            where queue_name = 'queue_' || ((i / 2) % 50)) end,
  (select id from {S}._private_tasks where identifier = 'task_' || (i % 10)),
  '{{}}'::json, 0,
  case when i % 20 in (1, 2) then now() + interval '1 hour'   -- scheduled
       when i % 20 = 3 then now() + interval '10 minutes'    -- retrying
       else now() - (i || ' milliseconds')::interval end,
  case when i % 20 = 3 then 1 when i % 20 = 4 then 25 else 0 end,
  25,
  case when i % 20 in (3, 4) then 'boom' end,
  case when i % 1000 = 7 then 'key-' || i end
from generate_series(1, $1::int) as i;
update {S}._private_jobs set locked_at = now(), locked_by = 'pool-00000000000000000' || (id % 4)
  where id in (select id from {S}._private_jobs where job_queue_id is null limit 200);
analyze {S}._private_jobs;
analyze {S}._private_job_queues;
"""


async def _fill(dsn: str, rows: int) -> None:
    async with open_database(dsn, max_size=1) as db:
        await migrate(db, S)

        async def unit(conn: Any) -> None:
            for statement in FILL.split(";\n"):
                if statement.strip():
                    args = (rows,) if "$1" in statement else ()
                    await conn.execute(statement, *args)

        await db.with_own_connection(unit)


async def _measure(dsn: str, reps: int, show_plans: bool) -> list[tuple[str, float, str]]:
    results: list[tuple[str, float, str]] = []
    async with kongtask.open_client(dsn) as client:
        queries = client._inspect
        first = await client.list_jobs(limit=1)
        middle_id = first[0].job.id + 500_000 if first else 0
        cases: list[tuple[str, Callable[[], Awaitable[object]], str, tuple[object, ...]]] = []

        def listing(name: str, **kw: Any) -> None:
            kw.setdefault("limit", 100)
            query, args = list_jobs_statement(
                queries,
                **{
                    k: kw.get(k)
                    for k in ("tasks", "queues", "states", "key", "min_id", "max_id", "after_id")
                },
                limit=kw["limit"],
                descending=kw.get("descending", False),
            )
            cases.append((name, lambda: client.list_jobs(**kw), query, tuple(args)))

        cases.append(("queue_counts", client.queue_counts, queries.counts, ()))
        cases.append(("oldest_ready_age", client.oldest_ready_age, queries.oldest_ready, ()))
        cases.append(("list_pools", client.list_pools, queries.pools, ()))
        listing("list_jobs (first page)")
        listing("list_jobs after_id (page mid-table)", after_id=middle_id)
        listing("list_jobs descending (newest)", descending=True)
        listing("list_jobs tasks=task_3", tasks="task_3", after_id=middle_id)
        listing("list_jobs key=…", key="key-7007")
        listing("list_jobs states=running", states="running")
        listing("list_jobs states=permanently_failed", states="permanently_failed")
        for name, call, query, args in cases:
            await call()  # warm: prepared statement, caches
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                await call()
                times.append(time.perf_counter() - start)
            plan_rows = await client._db.fetch("explain (analyze, buffers) " + query, *args)
            plan = [r[0] for r in plan_rows]
            if show_plans:
                print(f"-- {name}\n" + "\n".join(plan) + "\n", file=sys.stderr)
            results.append((name, statistics.median(times) * 1000, plan[0].split("  (")[0]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--plans", action="store_true", help="print every plan on stderr")
    args = parser.parse_args()
    from kongtask.testing._postgres import dsn_with_database, provide_postgres, run_sync_sql

    with ExitStack() as stack:
        server_dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
        name = f"inspect_plans_{os.getpid()}"
        run_sync_sql(server_dsn, f'create database "{name}"')
        try:
            dsn = dsn_with_database(server_dsn, name)
            trio.run(_fill, dsn, args.rows)
            results = trio.run(_measure, dsn, args.reps, args.plans)
        finally:
            run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')
    print(f"{args.rows:,} jobs, median of {args.reps}\n")
    print("| call | median ms | plan top node |\n| --- | ---: | --- |")
    for call_name, ms, top in results:
        print(f"| {call_name} | {ms:.1f} | {top.strip()} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
