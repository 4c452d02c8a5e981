"""What metrics and tracing cost: drain throughput with them off and on, side by side.

Usage::

    python -m stress.ops_overhead                 # throwaway PostgreSQL, 100,000 jobs, 3 reps
    python -m stress.ops_overhead --jobs 5000 --reps 1   # smoke run
    python -m stress.ops_overhead --configs off,metrics --work-ms 1 --dsn postgresql://...

Each run gets ``--jobs`` jobs added in bulk to the scratch database (no-op jobs, or jobs
that spend ``--work-ms`` of CPU), the table vacuumed, analyzed and checkpointed (autovacuum
is off on it: each run truncates it), then one pool (concurrency 10) drains them; the time
runs from the first job's start to the last job's start, like ``stress.bench``'s
throughput. Drains long enough that the fixed costs (the first scrape, its database read)
are not most of them. Every run is a fresh interpreter (an OpenTelemetry tracer provider
can be installed once per process) that first drains a small warm-up queue.
Configurations (``--configs``), interleaved rep by rep so load drifts hit them alike:

- ``off``: no metrics port, no tracing;
- ``metrics-unscraped``: ``metrics_port`` with prometheus_client, nobody scraping it;
- ``metrics``: ``metrics_port`` with prometheus_client, ``/metrics`` scraped every second
  over HTTP by another process, as Prometheus does (the database gauges read at every 5 s
  refresh);
- ``tracing-api``: ``tracing=True`` with only opentelemetry-api (no SDK installed: what
  a pool pays for the option alone);
- ``tracing-sdk``: ``tracing=True`` with opentelemetry-sdk's ``BatchSpanProcessor`` and
  an exporter that drops the spans (every job's span recorded and processed, no network);
- ``tracing-sampled``: the same SDK sampling 1 % of new traces
  (``ParentBased(TraceIdRatioBased(0.01))``);
- ``both``: ``metrics`` and ``tracing-sdk``.

Prints a markdown table: median jobs/s, its ratio to ``off``'s median and the median of
the per-rep ratios to the same rep's ``off``, the worker's CPU µs per job, and the
observer's own cost per job measured alone (a job's start and end through the same
observer the pool builds, best of several repeats: a figure the machine's load hardly
moves, unlike the drain) with its share of ``off``'s CPU per job (docs/performance.md
quotes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any

import trio

import kongtask
from kongtask._migrate import migrate
from kongtask._pg import open_database

CONCURRENCY = 10
#: CPU each job spends in its handler (``--work-ms``; 0: no-op jobs)
WORK_SECONDS = 0.0
WARM_UP_JOBS = 2000
CONFIGS = (
    "off",
    "metrics-unscraped",
    "metrics",
    "tracing-api",
    "tracing-sdk",
    "tracing-sampled",
    "both",
)
LABELS = {
    "off": "off",
    "metrics-unscraped": "metrics, not scraped",
    "metrics": "metrics (scraped every second)",
    "tracing-api": "tracing, opentelemetry-api only (no SDK)",
    "tracing-sdk": "tracing, SDK recording every span",
    "tracing-sampled": "tracing, SDK sampling 1 %",
    "both": "metrics and tracing (SDK, every span)",
}


def _install_tracer_provider(ratio: float) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class DropExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    trace.set_tracer_provider(provider)


# A scraper's loop, run in a process of its own as Prometheus is (the pool's process pays
# for answering each scrape, not for making it); it imports nothing else, to start fast.
SCRAPER = """
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
while True:
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    time.sleep(1.0)
"""


async def _drain(dsn: str, jobs: int, config: str) -> tuple[float, float]:
    async with open_database(dsn, max_size=1) as db:
        await db.execute("truncate graphile_worker._private_jobs")
        await db.execute(
            "select graphile_worker.add_jobs(array_agg(('noop', null, null, null, null, null,"
            " null, null)::graphile_worker.job_spec)) from generate_series(1, $1)",
            jobs,
        )
        # Quiet the server before the drain, so that what differs between runs is the
        # pool: statistics of the new rows (a plan made for the table as it was before the
        # bulk add can stall a 100,000-job drain for tens of seconds until autovacuum
        # analyzes it), their visibility map set now (with autovacuum off on this table it
        # cannot start in the middle of a drain), and their pages written out.
        await db.execute("vacuum analyze graphile_worker._private_jobs")
        await db.execute("checkpoint")
    count = 0
    first = last = cpu_first = cpu_last = 0.0
    done = trio.Event()

    async def noop(job: kongtask.Job, ctx: Any) -> None:
        nonlocal count, first, last, cpu_first, cpu_last
        if WORK_SECONDS:
            until = time.perf_counter() + WORK_SECONDS
            while time.perf_counter() < until:
                pass
        if count == 0:
            first, cpu_first = time.perf_counter(), time.process_time()
        count += 1
        if count == jobs:
            last, cpu_last = time.perf_counter(), time.process_time()
            done.set()

    options: dict[str, Any] = {}
    if config.startswith("metrics") or config == "both":
        options.update(metrics_port=0, metrics_host="127.0.0.1")
    if config.startswith("tracing") or config == "both":
        options["tracing"] = True
    async with (
        kongtask.open_worker(dsn, {"noop": noop}, concurrency=CONCURRENCY, **options) as worker,
        trio.open_nursery() as nursery,
    ):
        if worker.metrics_port and config != "metrics-unscraped":
            command = [sys.executable, "-c", SCRAPER, str(worker.metrics_port)]
            nursery.start_soon(partial(trio.run_process, command, check=False))
        await done.wait()
        nursery.cancel_scope.cancel()
    return (count - 1) / (last - first), (cpu_last - cpu_first) * 1e6 / count


async def _one(dsn: str, jobs: int, config: str) -> tuple[float, float]:
    await _drain(dsn, min(jobs, WARM_UP_JOBS), config)  # imports, caches, statements
    return await _drain(dsn, jobs, config)


def _observer_cost(config: str) -> float:
    """µs per job of what the pool's observer does for ``config`` (a job's start and
    end, on a job built from a claimed row as the worker builds it), alone: the best of
    a few repeats, so the machine's load matters far less than in the drain."""
    from opentelemetry import trace

    from kongtask._job import Job
    from kongtask._metrics import PoolMetrics
    from kongtask._observe import JobObserver, combine
    from kongtask._tracing import JobTracer

    metrics = PoolMetrics() if config.startswith("metrics") or config == "both" else None
    tracer = JobTracer() if config.startswith("tracing") or config == "both" else None
    observer: JobObserver | None = combine(metrics, tracer)
    now_us = int(time.time() * 1e6)
    row = {
        "id": 1, "queue_name": None, "payload": "{}", "flags": None, "priority": 0,
        "attempts": 1, "max_attempts": 25, "key": None, "last_error": None,
        "locked_by": "pool-x", "revision": 0, "run_at_us": now_us, "created_at_us": now_us,
        "updated_at_us": now_us, "locked_at_us": now_us,
    }  # fmt: skip
    # rounds well under BatchSpanProcessor's queue (2048), flushed between repeats: the
    # steady state of a pool whose exporter keeps up, not a queue that overflows
    rounds = 500
    flush = getattr(trace.get_tracer_provider(), "force_flush", lambda: True)

    def run() -> float:
        flush()
        started = time.perf_counter()
        for _ in range(rounds):
            job = Job.from_claim(row, "noop")
            if observer is not None:
                observer.job_ended(job, observer.job_started(job), None, "")
        return time.perf_counter() - started

    best = min(run() for _ in range(40))
    return best * 1e6 / rounds


def _child(dsn: str, jobs: int, config: str, work_ms: float) -> int:
    """One measured run in this (fresh) interpreter; prints ``[jobs/s, CPU µs/job,
    observer µs/job]`` (the last includes building the job; ``off`` is that baseline)."""
    # as the throughput benchmark's runner: kongtask's per-job INFO lines would otherwise
    # go to stderr (open_worker's fallback) and their cost would hide the observers'
    logging.getLogger("kongtask").addHandler(logging.NullHandler())
    logging.getLogger("kongtask").setLevel(logging.WARNING)
    global WORK_SECONDS
    WORK_SECONDS = work_ms / 1000
    if config in ("tracing-sdk", "both"):
        _install_tracer_provider(1.0)
    elif config == "tracing-sampled":
        _install_tracer_provider(0.01)
    rate, cpu = trio.run(_one, dsn, jobs, config)
    print(json.dumps([rate, cpu, _observer_cost(config)]))
    return 0


def _run_in_child(dsn: str, jobs: int, config: str, work_ms: float) -> tuple[float, float, float]:
    command = [sys.executable, "-m", "stress.ops_overhead", "--child", config]
    done = subprocess.run(
        [*command, "--dsn", dsn, "--jobs", str(jobs), "--work-ms", str(work_ms)],
        capture_output=True,
        text=True,
        check=True,
    )
    rate, cpu, observer = json.loads(done.stdout.strip().splitlines()[-1])
    return float(rate), float(cpu), float(observer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--work-ms", type=float, default=0.0, help="CPU milliseconds each job spends (default 0)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated configurations to run (default: all of {', '.join(CONFIGS)})",
    )
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.dsn, args.jobs, args.child, args.work_ms)
    from kongtask.testing._postgres import dsn_with_database, provide_postgres, run_sync_sql

    configs = tuple(args.configs.split(","))
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "off" not in configs:
        parser.error(f"--configs: 'off' and any of {', '.join(CONFIGS)}, not {unknown}")
    results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in configs}
    with ExitStack() as stack:
        server_dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
        name = f"ops_overhead_{os.getpid()}"
        run_sync_sql(server_dsn, f'create database "{name}"')
        try:
            dsn = dsn_with_database(server_dsn, name)
            trio.run(_migrate, dsn)
            for rep in range(args.reps):
                order = configs if rep % 2 == 0 else tuple(reversed(configs))
                for config in order:
                    rate, cpu, observer = _run_in_child(dsn, args.jobs, config, args.work_ms)
                    results[config].append((rate, cpu, observer))
                    print(
                        f"rep {rep + 1} {config:16s} {rate:8.0f} jobs/s {cpu:6.0f} µs/job, "
                        f"observer alone {observer:6.2f} µs/job"
                    )
                    sys.stdout.flush()
        finally:
            run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')

    def median(config: str, column: int) -> float:
        return statistics.median(row[column] for row in results[config])

    def paired(config: str) -> float:
        """The median over reps of the rate against the same rep's ``off`` (the runs of a
        rep are next to each other, so a slow spell of the machine hits both)."""
        pairs = zip(results[config], results["off"], strict=True)
        return statistics.median(row[0] / off[0] for row, off in pairs)

    base_rate, base_cpu, base_observer = (median("off", i) for i in range(3))
    kind = f"jobs of {args.work_ms:g} ms CPU" if args.work_ms else "no-op jobs"
    print(f"\n{args.jobs:,} {kind}, concurrency {CONCURRENCY}, median of {args.reps}\n")
    print(
        "| configuration | jobs/s | vs off (medians) | vs off (paired) | worker CPU µs/job "
        "| observer alone µs/job | observer / off CPU |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for config in configs:
        rate, cpu = median(config, 0), median(config, 1)
        observer = max(0.0, median(config, 2) - base_observer)
        print(
            f"| {LABELS[config]} | {rate:,.0f} | {rate / base_rate:.1%} "
            f"| {paired(config):.1%} | {cpu:,.0f} | {observer:.2f} | {observer / base_cpu:.1%} |"
        )
    return 0


async def _migrate(dsn: str) -> None:
    async with open_database(dsn, max_size=1) as db:
        await migrate(db, "graphile_worker")
        # each run truncates the table: nothing for autovacuum to do but compete with it
        await db.execute(
            "alter table graphile_worker._private_jobs set (autovacuum_enabled = false)"
        )


if __name__ == "__main__":
    sys.exit(main())
