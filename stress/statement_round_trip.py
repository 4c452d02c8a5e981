"""One small statement's time, direct and through pgBouncer, with and without a statement cache.

    python -m stress.statement_round_trip            # throwaway cluster and pgBouncer
    python -m stress.statement_round_trip --runs 5000

Runs one statement with a ``bigint[]`` and a ``text`` parameter ``--runs`` times on one
connection (after 200 unmeasured runs) and prints µs per statement for: asyncpg with its
statement cache (direct only: pgBouncer in transaction mode cannot keep prepared
statements), asyncpg without it (two round trips per statement), and kongtask's dedicated
connection without it (the statement's description kept: one round trip).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Awaitable, Callable

import asyncpg
import trio

from kongtask._pg import open_database
from kongtask.testing._pgbouncer import provide_pgbouncer
from kongtask.testing._postgres import run_sync_sql
from stress.fleet import fresh_database, fsync_cluster

QUERY = (
    "select id from graphile_worker._private_jobs where id = any($1::bigint[]) and locked_by = $2"
)


async def per_statement(runs: int, run: Callable[[], Awaitable[object]]) -> float:
    for _ in range(200):
        await run()
    start = time.perf_counter()
    for _ in range(runs):
        await run()
    return (time.perf_counter() - start) / runs * 1e6


async def measure(dsn: str, runs: int, *, cache: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    async with open_database(dsn, min_size=0, max_size=1, prepared_statements=cache) as db:
        conn = await db.connect()
        try:
            if cache:
                results["asyncpg, statement cache"] = await per_statement(
                    runs, lambda: db.run(conn.fetch, QUERY, [1, 2], "pool-x")
                )
                return results
            # the same connection through asyncpg's own fetch: two round trips
            results["asyncpg, no cache"] = await per_statement(
                runs, lambda: db.run(asyncpg.Connection.fetch, conn, QUERY, [1, 2], "pool-x")
            )
            results["kongtask dedicated, no cache (description kept)"] = await per_statement(
                runs, lambda: db.run(conn.fetch, QUERY, [1, 2], "pool-x")
            )
        finally:
            await db.close_connection(conn)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2000)
    args = p.parse_args()
    with fsync_cluster() as server, provide_pgbouncer(server) as bouncer:
        direct = fresh_database(server, "round_trip", 0)
        run_sync_sql(direct, "select 1")
        routes = {"direct": direct, "pgbouncer": bouncer.dsn_for(direct)}
        print("| route | connection | µs per statement |")
        print("| --- | --- | ---: |")
        for rep in range(2):
            for route, dsn in routes.items():
                for cache in (True, False) if route == "direct" else (False,):
                    results = trio.run(functools.partial(measure, dsn, args.runs, cache=cache))
                    for label, micros in results.items():
                        print(f"| {route} (rep {rep}) | {label} | {micros:.0f} |", flush=True)


if __name__ == "__main__":
    main()
