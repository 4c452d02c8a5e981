"""What metrics and tracing cost: drain throughput with them off and on, side by side.

Usage::

    python -m stress.ops_overhead                  # throwaway PostgreSQL, 20,000 jobs, 3 reps
    python -m stress.ops_overhead --jobs 5000 --reps 1   # smoke run
    python -m stress.ops_overhead --dsn postgresql://...

Each run gets a fresh database with ``--jobs`` no-op jobs added in bulk, then one pool
(concurrency 10) drains them; the time runs from the first job's start to the last job's
start, like ``stress.bench``'s throughput. Configurations, interleaved rep by rep so load
drifts hit them alike:

- ``off``: no metrics port, no tracing;
- ``events``: an ``on_event`` callback that does nothing (the floor of any consumer of
  the lifecycle events, which metrics and tracing are);
- ``metrics``: ``metrics_port`` with prometheus_client, ``/metrics`` scraped every second
  over HTTP (the database gauges read at every 5 s refresh);
- ``tracing``: ``tracing=True`` with opentelemetry-sdk's ``BatchSpanProcessor`` and an
  exporter that drops the spans (so the SDK does all its work, but no network);
- ``both``.

Prints a markdown table: median jobs/s, CPU µs per job, and the ratio to ``off``
(docs/performance.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import trio

import kongtask
from kongtask._migrate import migrate
from kongtask._pg import open_database

CONCURRENCY = 10
CONFIGS = ("off", "events", "metrics", "tracing", "both")


def _install_tracer_provider() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    trace.set_tracer_provider(provider)


def _scrape(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        response.read()


async def _one(dsn: str, jobs: int, config: str) -> tuple[float, float]:
    async with open_database(dsn, max_size=1) as db:
        await db.execute("truncate graphile_worker._private_jobs")
        await db.execute(
            "select graphile_worker.add_jobs(array_agg(('noop', null, null, null, null, null,"
            " null, null)::graphile_worker.job_spec)) from generate_series(1, $1)",
            jobs,
        )
    count = 0
    first = last = cpu_first = cpu_last = 0.0
    done = trio.Event()

    async def noop(job: kongtask.Job, ctx: Any) -> None:
        nonlocal count, first, last, cpu_first, cpu_last
        if count == 0:
            first, cpu_first = time.perf_counter(), time.process_time()
        count += 1
        if count == jobs:
            last, cpu_last = time.perf_counter(), time.process_time()
            done.set()

    options: dict[str, Any] = {}
    if config in ("metrics", "both"):
        options.update(metrics_port=0, metrics_host="127.0.0.1")
    if config in ("tracing", "both"):
        options["tracing"] = True
    if config == "events":
        options["on_event"] = lambda event: None
    async with (
        kongtask.open_worker(dsn, {"noop": noop}, concurrency=CONCURRENCY, **options) as worker,
        trio.open_nursery() as nursery,
    ):
        if worker.metrics_port:
            port = worker.metrics_port

            async def scraper() -> None:
                while True:
                    await trio.to_thread.run_sync(_scrape, port)
                    await trio.sleep(1.0)

            nursery.start_soon(scraper)
        await done.wait()
        nursery.cancel_scope.cancel()
    return (count - 1) / (last - first), (cpu_last - cpu_first) * 1e6 / count


async def _run(dsn: str, jobs: int, reps: int) -> dict[str, list[tuple[float, float]]]:
    async with open_database(dsn, max_size=1) as db:
        await migrate(db, "graphile_worker")
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
    await _one(dsn, min(jobs, 2000), "off")  # warm-up: caches, prepared statements
    for rep in range(reps):
        order = CONFIGS if rep % 2 == 0 else tuple(reversed(CONFIGS))
        for config in order:
            results[config].append(await _one(dsn, jobs, config))
            rate, cpu = results[config][-1]
            print(f"rep {rep + 1} {config:8s} {rate:8.0f} jobs/s {cpu:6.0f} µs/job", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    _install_tracer_provider()
    from kongtask.testing._postgres import dsn_with_database, provide_postgres, run_sync_sql

    with ExitStack() as stack:
        server_dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
        name = f"ops_overhead_{os.getpid()}"
        run_sync_sql(server_dsn, f'create database "{name}"')
        try:
            results = trio.run(_run, dsn_with_database(server_dsn, name), args.jobs, args.reps)
        finally:
            run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')
    base = statistics.median(r for r, _ in results["off"])
    print(f"\n{args.jobs:,} no-op jobs, concurrency {CONCURRENCY}, median of {args.reps}\n")
    print("| configuration | jobs/s | CPU µs/job | throughput vs off |")
    print("| --- | ---: | ---: | ---: |")
    for config in CONFIGS:
        rate = statistics.median(r for r, _ in results[config])
        cpu = statistics.median(c for _, c in results[config])
        print(f"| {config} | {rate:,.0f} | {cpu:,.0f} | {rate / base:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
