"""kongtask runner for the side-by-side benchmark: the same protocol as ``gw_runner.cjs``.

    python -m stress.peers.kt_runner MODE DSN N [OPTIONS_JSON]

``OPTIONS_JSON`` holds extra ``open_worker`` keyword arguments (``{}`` = library defaults
apart from ``concurrency=10``). Reports JSON lines on the file descriptor ``$BENCH_FD``. In
``throughput`` mode it reports ``drained`` when the last job starts and keeps the worker
running until a line (or EOF) arrives on stdin, so that the harness can watch the last
completion commit.
Set ``BENCH_PROFILE=path`` to write a pyinstrument profile of the throughput drain.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Any

import trio

import kongtask

# kongtask loads its trio parts on first use: load them here, outside every timed window,
# as the graphile-worker runner's require() does
from kongtask import open_worker

CONCURRENCY = 10

# The library logs each job's start and end at INFO, and a program that configures no
# logging gets them on stderr; the graphile-worker runner gets a no-op logger, so this
# one keeps kongtask's logs off as well (warnings still count as configured logging).
logging.getLogger("kongtask").addHandler(logging.NullHandler())
logging.getLogger("kongtask").setLevel(logging.WARNING)


def emit(obj: dict[str, Any]) -> None:
    os.write(int(os.environ.get("BENCH_FD", "1")), (json.dumps(obj) + "\n").encode())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def throughput(dsn: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    count = 0
    first = cpu_first = last = cpu_last = 0.0
    done = trio.Event()

    async def noop(job: kongtask.Job, ctx: Any) -> None:
        nonlocal count, first, cpu_first, last, cpu_last
        if count == 0:
            first = time.time()
            cpu_first = time.process_time()
        count += 1
        if count == n:
            last = time.time()
            cpu_last = time.process_time()
            done.set()

    profiler = None
    t_start = time.time()
    async with open_worker(dsn, {"noop": noop}, concurrency=CONCURRENCY, **options):
        emit({"event": "ready", "t": time.time()})
        if os.environ.get("BENCH_PROFILE"):
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled", interval=0.0005)
            profiler.start()
        await done.wait()
        if profiler is not None:
            profiler.stop()
        rss = rss_mb()
        emit({"event": "drained", "t_start": t_start, "first": first, "last": last})
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    if profiler is not None:
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        await trio.Path(os.environ["BENCH_PROFILE"]).write_text(text)
    return {
        "n": count,
        "t_start": t_start,
        "first": first,
        "last": last,
        "elapsed_s": last - first,
        "jobs_per_s": (count - 1) / (last - first),
        "cpu_us_per_job": (cpu_last - cpu_first) * 1e6 / count,
        "rss_mb": rss,
        "peak_rss_mb": peak_rss_mb(),
    }


async def latency(dsn: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    lat: list[float] = []
    done = trio.Event()

    async def noop(job: kongtask.Job, ctx: Any) -> None:
        start = time.time()
        t = job.payload.get("t") if isinstance(job.payload, dict) else None
        if not isinstance(t, float) or t < start - 600:  # the adder's warm-up job
            return
        lat.append((start - t) * 1000)
        if len(lat) == n:
            done.set()

    async with open_worker(dsn, {"noop": noop}, concurrency=CONCURRENCY, **options):
        emit({"event": "ready", "t": time.time()})
        await done.wait()
        rss = rss_mb()
    return {"latencies_ms": lat, "rss_mb": rss, "peak_rss_mb": peak_rss_mb()}


async def startup(dsn: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    first = 0.0
    done = trio.Event()

    async def noop(job: kongtask.Job, ctx: Any) -> None:
        nonlocal first
        first = first or time.time()
        done.set()

    async with kongtask.open_client(dsn) as client:
        await client.add_jobs([])  # warm the client's connection
        t0 = time.time()
        worker_cm = open_worker(dsn, {"noop": noop}, concurrency=CONCURRENCY, **options)
        await worker_cm.__aenter__()
        ready = time.time()
        try:
            await client.add_job("noop", {})
            await done.wait()
            await trio.sleep(0.3)  # let the completion land; the queue is empty again
        finally:
            s0 = time.time()
            await worker_cm.__aexit__(None, None, None)
            s1 = time.time()
    return {
        "ready_ms": (ready - t0) * 1000,
        "first_job_ms": (first - t0) * 1000,
        "shutdown_ms": (s1 - s0) * 1000,
    }


async def enqueue(dsn: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    single: list[float] = []
    async with kongtask.open_client(dsn) as client:
        await client.add_jobs([])
        for i in range(300):
            t = time.perf_counter()
            await client.add_job("noop", {"i": i})
            single.append((time.perf_counter() - t) * 1000)
        t0 = time.perf_counter()
        for done in range(0, n, 1000):
            k = min(1000, n - done)
            await client.add_jobs([kongtask.JobSpec("noop", {"i": i}) for i in range(k)])
        elapsed = time.perf_counter() - t0
    return {"add_job_ms": single, "bulk_jobs_per_s": n / elapsed}


MODES = {"throughput": throughput, "latency": latency, "startup": startup, "enqueue": enqueue}


def main(argv: list[str]) -> None:
    mode, dsn, n, *rest = argv
    options = json.loads(rest[0]) if rest else {}
    result = trio.run(MODES[mode], dsn, int(n), options)
    emit({"event": "result", **result})


if __name__ == "__main__":
    main(sys.argv[1:])
