"""How long each dashboard page takes over real HTTP on a 1,000,000-job table.

Usage::

    python -m stress.dashboard_pages                  # throwaway PostgreSQL
    python -m stress.dashboard_pages --dsn postgresql://...   # a scratch database there
    python -m stress.dashboard_pages --rows 200000 --reps 9

The table is filled as in :mod:`stress.inspect_plans` (10 tasks, 50 queues, every state).
The dashboard is served by hypercorn on trio on a loopback port; each page is fetched
``--reps`` times after one warm-up, and the median and worst wall-clock times of the whole
request (query, rendering, HTTP) are printed as a markdown table (docs/dashboard.md
quotes it). The goal is under 300 ms per page. The overview is timed twice: taking its
snapshot (what the first viewer every 2 s pays) and showing a snapshot.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack

import httpx
import trio

from kongtask._cli_dashboard import open_dashboard, serve_dashboard
from kongtask._dashboard import OVERVIEW_MAX_AGE
from stress.inspect_plans import _fill

GOAL_MS = 300.0


async def _measure(dsn: str, reps: int) -> list[tuple[str, float, float]]:
    results = []
    async with open_dashboard(dsn) as app, trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve_dashboard, app, "127.0.0.1", 0)
        first = await app.client.list_jobs(limit=1)
        last = await app.client.list_jobs(limit=1, descending=True)
        middle = (first[0].job.id + last[0].job.id) // 2
        (failed,) = await app.client.list_jobs(states="permanently_failed", limit=1)
        pages = [
            "/ (snapshot taken on the request)",
            "/",
            "/jobs",
            f"/jobs?after={middle}",
            "/jobs?task=task_3",
            "/jobs?state=permanently_failed",
            "/jobs?task=task_3&state=permanently_failed",
            "/jobs?queue=queue_7",
            "/jobs?key=key-7007",
            "/jobs?state=running",
            f"/jobs/{failed.job.id}",
            f"/confirm?action=retry&id={failed.job.id}",
            f"/confirm?action=fail&task=task_3&state=retrying&max_id={last[0].job.id}",
            "/pools",
            "/cron",
        ]
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for page in pages:
                path = page.split(" ")[0]
                # the first row times the overview's counting; the others see its snapshot
                app.overview_max_age = 0.0 if " " in page else OVERVIEW_MAX_AGE
                (await http.get(path)).raise_for_status()  # warm: prepared statements
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    (await http.get(path)).raise_for_status()
                    times.append((time.perf_counter() - start) * 1000)
                results.append((page, statistics.median(times), max(times)))
        nursery.cancel_scope.cancel()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    from kongtask.testing._postgres import dsn_with_database, provide_postgres, run_sync_sql

    with ExitStack() as stack:
        server_dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
        name = f"dashboard_pages_{os.getpid()}"
        run_sync_sql(server_dsn, f'create database "{name}"')
        try:
            dsn = dsn_with_database(server_dsn, name)
            trio.run(_fill, dsn, args.rows)
            results = trio.run(_measure, dsn, args.reps)
        finally:
            run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')
    print(f"{args.rows:,} jobs, {args.reps} requests per page after a warm-up\n")
    print("| page | median ms | worst ms |\n| --- | ---: | ---: |")
    slow = 0
    for page, median, worst in results:
        print(f"| `{page}` | {median:.0f} | {worst:.0f} |")
        slow += median > GOAL_MS
    print(f"\n{slow} page(s) over the {GOAL_MS:.0f} ms goal (median)")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
