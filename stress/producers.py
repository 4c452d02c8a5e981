"""Producer benchmark: kongtask's producers beside graphile-worker 0.18's addJob/addJobs.

    python -m stress.producers [--dsn DSN] [--reps 3] [--jobs 20000]

Every system runs in its own process on a fresh database (``stress.peers.harness``), on
one PostgreSQL server (a throwaway local cluster with fsync on unless ``--dsn``), and
reports the same two figures:

- single add: 300 ``add_job`` calls in a row, one at a time, each its own transaction
  (autocommit), on one open connection; p50 and p99 of the round trip in ms;
- bulk: ``--jobs`` jobs added with ``add_jobs`` in chunks of 1,000; jobs/s.

Systems: graphile-worker 0.18 (``utils.addJob``/``addJobs`` on its pool), kongtask's
asyncio producer on an asyncpg connection (``kongtask.aio``), its sync producer on a
psycopg 3 connection (``kongtask.add_job_sync``), and the trio client for reference. The
table gives the median of ``--reps`` runs of each figure.

The runner half (``--runner asyncpg|psycopg DSN N``) is what the benchmark spawns.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

from stress.peers.harness import (
    Bench,
    System,
    Unavailable,
    graphile_worker,
    kongtask_system,
    load_average,
    provide_server,
)

SINGLES = 300  # as graphile-worker's runner (stress/peers/gw_runner.cjs)
CHUNK = 1000


def _emit(obj: dict[str, Any]) -> None:
    os.write(int(os.environ.get("BENCH_FD", "1")), (json.dumps(obj) + "\n").encode())


async def _asyncpg_run(dsn: str, n: int) -> dict[str, Any]:
    import asyncpg

    import kongtask
    import kongtask.aio

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("select 1")
        single = []
        for i in range(SINGLES):
            t = time.perf_counter()
            await kongtask.aio.add_job(conn, "noop", {"i": i})
            single.append((time.perf_counter() - t) * 1000)
        t0 = time.perf_counter()
        for done in range(0, n, CHUNK):
            specs = [kongtask.JobSpec("noop", {"i": i}) for i in range(min(CHUNK, n - done))]
            await kongtask.aio.add_jobs(conn, specs)
        elapsed = time.perf_counter() - t0
    finally:
        await conn.close()
    return {"add_job_ms": single, "bulk_jobs_per_s": n / elapsed}


def _psycopg_run(dsn: str, n: int) -> dict[str, Any]:
    import psycopg

    import kongtask

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select 1")
        single = []
        for i in range(SINGLES):
            t = time.perf_counter()
            kongtask.add_job_sync(conn, "noop", {"i": i})
            single.append((time.perf_counter() - t) * 1000)
        t0 = time.perf_counter()
        for done in range(0, n, CHUNK):
            specs = [kongtask.JobSpec("noop", {"i": i}) for i in range(min(CHUNK, n - done))]
            kongtask.add_jobs_sync(conn, specs)
        elapsed = time.perf_counter() - t0
    return {"add_job_ms": single, "bulk_jobs_per_s": n / elapsed}


def _runner(flavour: str, dsn: str, n: int) -> None:
    result = asyncio.run(_asyncpg_run(dsn, n)) if flavour == "asyncpg" else _psycopg_run(dsn, n)
    # what the producers promise: no trio at run time
    result["trio_loaded"] = "trio" in sys.modules
    _emit({"event": "result", **result})


def _producer_system(flavour: str, label: str, migrate_from: System) -> System:
    def command(mode: str, dsn: str, n: int) -> tuple[list[str], dict[str, str]]:
        assert mode == "enqueue"
        return [sys.executable, "-m", "stress.producers", "--runner", flavour, dsn, str(n)], {}

    return System(
        f"kt-{flavour}", label, "graphile", command, migrate_from.migrate, version="this tree"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.producers", description=__doc__)
    p.add_argument("--dsn", help="a superuser DSN (default: a throwaway cluster, fsync on)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--jobs", type=int, default=20000, help="jobs per bulk run")
    p.add_argument("--runner", nargs=3, metavar=("FLAVOUR", "DSN", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runner:
        flavour, dsn, n = args.runner
        _runner(flavour, dsn, int(n))
        return 0

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    client = kongtask_system("kt-client", "kongtask trio client (reference)", {})
    systems: list[System] = []
    try:
        gw = graphile_worker("defaults")
        systems.append(dataclasses.replace(gw, label="graphile-worker 0.18 addJob/addJobs"))
    except Unavailable as exc:
        say(f"skipping graphile-worker: {exc}")
    systems += [
        _producer_system("asyncpg", "kongtask.aio on asyncpg (asyncio)", client),
        _producer_system("psycopg", "kongtask.add_job_sync on psycopg 3 (sync)", client),
        client,
    ]
    runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in systems}
    with provide_server(args.dsn) as server:
        bench = Bench(server, say)
        try:
            say(f"server: {server.describe()}")
            for rep in range(args.reps):
                for system in systems:  # interleaved, so drift hits every system alike
                    result = bench.run(system, "enqueue", args.jobs)
                    if result.get("trio_loaded"):
                        raise SystemExit(f"{system.key} loaded trio")
                    runs[system.key].append(result)
                    say(
                        f"rep {rep + 1} {system.key}: p50 {result['add_job_p50_ms']:.3f} ms, "
                        f"p99 {result['add_job_p99_ms']:.3f} ms, "
                        f"bulk {result['bulk_jobs_per_s']:,.0f} jobs/s"
                    )
        finally:
            bench.close()
    print(_table(systems, runs))
    print(json.dumps({"load_average": load_average(), "runs": runs}))
    return 0


def _table(systems: list[System], runs: dict[str, list[dict[str, Any]]]) -> str:
    def median(key: str, field: str) -> float:
        return float(statistics.median(r[field] for r in runs[key]))

    gw = "gw" if "gw" in runs else None
    lines = [
        "| system | single add p50 (ms) | single add p99 (ms) | add_jobs, 1,000-job chunks "
        "(jobs/s) | bulk vs graphile-worker |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in systems:
        bulk = median(s.key, "bulk_jobs_per_s")
        ratio = f"{bulk / median(gw, 'bulk_jobs_per_s'):.2f}x" if gw else "—"
        lines.append(
            f"| {s.label} | {median(s.key, 'add_job_p50_ms'):.2f} | "
            f"{median(s.key, 'add_job_p99_ms'):.2f} | {bulk:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
