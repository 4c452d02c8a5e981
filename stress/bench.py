"""Throughput and latency of a kongtask worker.

Usage::

    python -m stress.bench                 # throwaway PostgreSQL (fsync off, as the tests)
    python -m stress.bench --fsync         # throwaway PostgreSQL with fsync/synchronous_commit on
    python -m stress.bench --dsn postgresql://...   # an existing server (creates a scratch DB)

Prints:

- throughput: ``--jobs`` (20,000) no-op jobs bulk-enqueued in one statement, then drained
  by one pool with ``--concurrency`` (10); jobs/s from the pool's start to the last
  outcome written;
- latency: ``--latency-jobs`` (500) jobs added one by one ``--interval`` (20 ms) apart
  from a client in the same process while the pool idles; add-to-start p50/p95/p99 in ms
  (from just before ``add_job`` is called until the handler starts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator

import trio

import kongtask
from kongtask._migrate import migrate_sync
from kongtask.testing import provide_postgres, run_sync_sql
from kongtask.testing._postgres import LocalCluster, dsn_with_database, find_pg_bindir

FSYNC_ON = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@contextlib.contextmanager
def server_dsn(args: argparse.Namespace) -> Iterator[str]:
    if args.dsn:
        yield args.dsn
        return
    if args.fsync:
        bindir = find_pg_bindir()
        if bindir is None:
            sys.exit("--fsync needs local PostgreSQL binaries (initdb, pg_ctl)")
        cluster = LocalCluster(bindir, settings=FSYNC_ON)
        try:
            yield cluster.start()
        finally:
            cluster.stop()
        return
    with provide_postgres() as server:
        yield server.dsn


@contextlib.contextmanager
def scratch_database(dsn: str) -> Iterator[str]:
    name = f"kongtask_bench_{os.getpid()}"
    run_sync_sql(dsn, f'create database "{name}"')
    try:
        yield dsn_with_database(dsn, name)
    finally:
        run_sync_sql(dsn, f'drop database if exists "{name}" with (force)')


async def noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    return None


async def throughput(dsn: str, jobs: int, concurrency: int, batch_size: int) -> float:
    async with kongtask.open_client(dsn) as client:
        t0 = time.perf_counter()
        await client._db.execute(
            "select graphile_worker.add_jobs(array_agg(('noop', '{}'::json, null, null, null, "
            "null, null, null)::graphile_worker.job_spec)) from generate_series(1, $1)",
            jobs,
        )
        enqueue = time.perf_counter() - t0
        # Fresh bulk rows have no statistics until autovacuum analyzes the table (within
        # a minute); until then the planner sorts all 20,000 rows for every claim.
        # graphile-worker runs into the same, so both benches analyze first.
        await client._db.execute("analyze graphile_worker._private_jobs")
    print(f"enqueued {jobs} jobs in {enqueue:.2f} s ({jobs / enqueue:,.0f} jobs/s, one statement)")
    async with kongtask.open_worker(
        dsn, {"noop": noop}, concurrency=concurrency, batch_size=batch_size
    ) as worker:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        while worker.statistics().completed < jobs:  # noqa: ASYNC110  (cheap poll)
            await trio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    rate = jobs / elapsed
    print(
        f"throughput: {jobs} no-op jobs, concurrency {concurrency}: {elapsed:.2f} s "
        f"= {rate:,.0f} jobs/s (worker CPU {cpu / jobs * 1e6:.0f} us/job)"
    )
    return rate


async def latency(dsn: str, count: int, interval: float, concurrency: int) -> list[float]:
    added: dict[int, float] = {}
    started: dict[int, float] = {}
    all_started = trio.Event()

    async def record(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started[job.payload["i"]] = time.perf_counter()
        if len(started) == count:
            all_started.set()

    async with (
        kongtask.open_worker(dsn, {"lat": record}, concurrency=concurrency) as worker,
        kongtask.open_client(dsn) as client,
    ):
        await trio.sleep(0.5)  # let the pool settle into its idle wait
        next_at = time.perf_counter()
        for i in range(count):
            added[i] = time.perf_counter()
            await client.add_job("lat", {"i": i})
            next_at += interval
            await trio.sleep(max(0.0, next_at - time.perf_counter()))
        with trio.fail_after(30):
            await all_started.wait()
        del worker
    ms = sorted((started[i] - added[i]) * 1000 for i in range(count))
    q = statistics.quantiles(ms, n=100, method="inclusive")
    print(
        f"latency: {count} jobs {interval * 1000:.0f} ms apart, add-to-start "
        f"p50 {q[49]:.2f} ms, p95 {q[94]:.2f} ms, p99 {q[98]:.2f} ms (max {ms[-1]:.2f} ms)"
    )
    return ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stress.bench", description=__doc__)
    parser.add_argument("--dsn", help="an existing server (a scratch database is created)")
    parser.add_argument("--fsync", action="store_true", help="throwaway server with fsync on")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--latency-jobs", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between adds")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    with server_dsn(args) as dsn, scratch_database(dsn) as db_dsn:
        migrate_sync(db_dsn)
        mode = "fsync on" if args.fsync else ("given server" if args.dsn else "fsync off")
        print(f"kongtask {kongtask.__version__} bench ({mode})")
        if not args.skip_throughput:
            trio.run(throughput, db_dsn, args.jobs, args.concurrency, args.batch_size)
        if not args.skip_latency:
            trio.run(latency, db_dsn, args.latency_jobs, args.interval, args.concurrency)


if __name__ == "__main__":
    main()
