"""How long each dashboard page takes over real HTTP on a 1,000,000-job table.

Usage::

    python -m stress.dashboard_pages                  # throwaway PostgreSQL
    python -m stress.dashboard_pages --dsn postgresql://...   # a scratch database there
    python -m stress.dashboard_pages --rows 200000 --reps 9
    python -m stress.dashboard_pages --filled postgresql://.../db  # a table filled before

The table is filled as in :mod:`stress.inspect_plans` (10 tasks, 50 queues, every state).
The dashboard is served as ``kongtask dashboard`` serves it (hypercorn on trio, with its
background snapshots and shared LISTEN) on a loopback port. While the pages are timed, a
viewer keeps the overview and pools pages open (one request each a second), so their
snapshots are taken again every 2 s and the timed requests compete with those scans, as
they would with someone watching. Each page is fetched ``--reps`` times after one
warm-up; the median and worst wall-clock times of the whole request (query, rendering,
HTTP) are printed as a markdown table (docs/dashboard.md quotes it), then the time the
background reads themselves take (no request waits on them). The goal is under 300 ms per
page.
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

import httpx
import trio

from kongtask._cli_dashboard import open_dashboard, serve_dashboard
from stress.inspect_plans import _fill

GOAL_MS = 300.0


async def _timed(call: Callable[[], Awaitable[Any]], reps: int) -> tuple[float, float]:
    await call()  # warm: prepared statements
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


async def _measure(dsn: str, reps: int) -> tuple[list[tuple[str, float, float]], list[Any]]:
    results = []
    async with open_dashboard(dsn) as app, trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve_dashboard, app, "127.0.0.1", 0)
        first = await app.client.list_jobs(limit=1)
        last = await app.client.list_jobs(limit=1, descending=True)
        newest = last[0].job.id
        middle = (first[0].job.id + newest) // 2
        (failed,) = await app.client.list_jobs(states="permanently_failed", limit=1)
        pages = [
            "/",
            "/jobs",
            f"/jobs?after={middle}",
            "/jobs?task=task_3",
            "/jobs?state=ready",
            "/jobs?state=scheduled",
            "/jobs?state=retrying",
            "/jobs?state=permanently_failed",
            "/jobs?state=waiting_on_queue",
            "/jobs?state=running",
            "/jobs?task=task_3&state=permanently_failed",
            "/jobs?queue=queue_7",
            "/jobs?key=key-7007",
            f"/jobs/{failed.job.id}",
            f"/confirm?action=retry&id={failed.job.id}",
            f"/confirm?action=retry&task=task_3&max_id={newest}",
            f"/confirm?action=fail&task=task_3&state=retrying&max_id={newest}",
            f"/confirm?action=retry&state=permanently_failed&max_id={newest}",
            "/pools",
            "/cron",
        ]
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:

            async def viewer() -> None:
                while True:
                    (await http.get("/")).raise_for_status()
                    (await http.get("/pools")).raise_for_status()
                    await trio.sleep(1)

            nursery.start_soon(viewer)
            for page in pages:

                async def get(page: str = page) -> None:
                    (await http.get(page)).raise_for_status()

                results.append((page, *await _timed(get, reps)))
            snapshots = app._snapshots
            background = [
                ("overview snapshot (background)", *await _timed(snapshots.overview_now, reps)),
                ("pools snapshot (background)", *await _timed(snapshots.pools_now, reps)),
            ]
        nursery.cancel_scope.cancel()
    return results, background


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--filled", help="a database already filled by this script's fill")
    args = parser.parse_args()
    from kongtask.testing._postgres import dsn_with_database, provide_postgres, run_sync_sql

    if args.filled:
        results, background = trio.run(_measure, args.filled, args.reps)
    else:
        with ExitStack() as stack:
            server_dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
            name = f"dashboard_pages_{os.getpid()}"
            run_sync_sql(server_dsn, f'create database "{name}"')
            try:
                dsn = dsn_with_database(server_dsn, name)
                trio.run(_fill, dsn, args.rows)
                results, background = trio.run(_measure, dsn, args.reps)
            finally:
                run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')
    rows = "a table filled before" if args.filled else f"{args.rows:,} jobs"
    print(f"{rows}, {args.reps} requests per page after a warm-up, overview and pools viewed\n")
    print("| page | median ms | worst ms |\n| --- | ---: | ---: |")
    slow = 0
    for page, median, worst in results:
        print(f"| `{page}` | {median:.0f} | {worst:.0f} |")
        slow += median > GOAL_MS
    print("\n| background read (no request waits on it) | median ms | worst ms |")
    print("| --- | ---: | ---: |")
    for name, median, worst in background:
        print(f"| {name} | {median:.0f} | {worst:.0f} |")
    print(f"\n{slow} page(s) over the {GOAL_MS:.0f} ms goal (median)")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
