"""Python side of the peer benchmark: job adders and the pgqueuer / procrastinate runners.

For pgqueuer and procrastinate it runs in the peers' own virtualenv (see ``provision.py``),
never in kongtask's, so the project's dependencies stay untouched; for graphile-worker's
schema it needs only asyncpg and runs in the benchmark's interpreter. It imports nothing
from kongtask and runs plain asyncio.

    python py_side.py install SYSTEM DSN
    python py_side.py bulk SYSTEM DSN N [raw]      # enqueue N no-op jobs (not timed);
                                                   # ANALYZE after unless raw
    python py_side.py bulk-future graphile DSN N   # the same, run_at tomorrow
    python py_side.py pace SYSTEM DSN N INTERVAL   # N jobs, INTERVAL s apart, payload {"t": epoch}
    python py_side.py run SYSTEM MODE DSN N        # pgqueuer|procrastinate; MODE: see gw_runner

SYSTEM ``graphile`` means any worker on graphile-worker's schema (graphile-worker, kongtask):
jobs go in through the SQL function ``graphile_worker.add_job(s)``.
Runners report one JSON line per event on the file descriptor named by ``$BENCH_FD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

CONCURRENCY = 10
# pgqueuer: a per-entrypoint limit stalls its fetch loop until the next NOTIFY or
# dequeue_timeout when it is reached; 0 (its default) means batches of batch_size=10.
PGQ_LIMIT = int(os.environ.get("BENCH_PGQ_LIMIT", "0"))


def emit(obj: dict[str, Any]) -> None:
    fd = int(os.environ.get("BENCH_FD", "1"))
    os.write(fd, (json.dumps(obj) + "\n").encode())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- adders

GW_BULK = """
select count(*) from {schema}.add_jobs(array(
  select json_populate_record(null::{schema}.job_spec,
                              json_build_object('identifier', 'noop', 'payload', '{{}}'::json))
  from generate_series(1, $1)))
"""


GW_BULK_FUTURE = """
select count(*) from {schema}.add_jobs(array(
  select json_populate_record(null::{schema}.job_spec,
                              json_build_object('identifier', 'noop', 'payload', '{{}}'::json,
                                                'run_at', now() + interval '1 day'))
  from generate_series(1, $1)))
"""


async def graphile_bulk(
    dsn: str, n: int, schema: str = "graphile_worker", *, future: bool = False, analyze: bool = True
) -> None:
    import asyncpg

    query = (GW_BULK_FUTURE if future else GW_BULK).format(schema=schema)
    conn = await asyncpg.connect(dsn)
    try:
        done = 0
        while done < n:
            k = min(5000, n - done)
            await conn.fetchval(query, k)
            done += k
        if analyze:
            await conn.execute(f"analyze {schema}._private_jobs")
    finally:
        await conn.close()


async def pace(system: str, dsn: str, n: int, interval: float) -> None:
    """Add ``n`` jobs ``interval`` seconds apart, each carrying its add time in ``t``."""
    add: Callable[[float], Awaitable[object]]
    closers: list[Callable[[], Awaitable[object]]] = []
    if system == "graphile":
        import asyncpg

        conn = await asyncpg.connect(dsn)
        closers.append(conn.close)
        stmt = await conn.prepare("select graphile_worker.add_job('noop', $1::json)")

        async def add(t: float) -> object:
            return await stmt.fetchval(json.dumps({"t": t}))

    elif system == "pgqueuer":
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        closers.append(conn.close)
        queries = Queries(AsyncpgDriver(conn))

        async def add(t: float) -> object:
            return await queries.enqueue("noop", json.dumps({"t": t}).encode())

    elif system == "procrastinate":
        app = make_procrastinate(dsn, None)
        await app.open_async()
        closers.append(app.close_async)
        task = app.tasks["noop"]

        async def add(t: float) -> object:
            return await task.defer_async(t=t)

    else:
        raise SystemExit(f"unknown system {system}")
    try:
        await add(time.time() - 3600)  # warm-up job: handlers ignore an add time this old
        start = time.monotonic()
        for i in range(n):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await add(time.time())
    finally:
        for close in closers:
            await close()


async def bulk(system: str, dsn: str, n: int, *, analyze: bool = True) -> None:
    if system == "graphile":
        await graphile_bulk(dsn, n, analyze=analyze)
    elif system == "pgqueuer":
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        try:
            queries = Queries(AsyncpgDriver(conn))
            done = 0
            while done < n:
                k = min(5000, n - done)
                await queries.enqueue(["noop"] * k, [b"{}"] * k, [0] * k)
                done += k
            if analyze:
                await conn.execute("analyze")
        finally:
            await conn.close()
    elif system == "procrastinate":
        app = make_procrastinate(dsn, None)
        async with app.open_async():
            task = app.tasks["noop"]
            done = 0
            while done < n:
                k = min(5000, n - done)
                await task.batch_defer_async(*([{}] * k))
                done += k
            if analyze:
                await app.connector.execute_query_async("analyze")
    else:
        raise SystemExit(f"unknown system {system}")


async def install(system: str, dsn: str) -> None:
    if system == "pgqueuer":
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
    elif system == "procrastinate":
        app = make_procrastinate(dsn, None)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
    else:
        raise SystemExit(f"install: unknown system {system}")


# ---------------------------------------------------------------------------- runners


class Probe:
    """What a no-op handler records: counts, first/last times, CPU, add-to-start latency."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self.last = 0.0
        self.cpu_last = 0.0
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def throughput_hit(self) -> None:
        if self.count == 0:
            self.first = time.time()
            self.cpu_first = time.process_time()
        self.count += 1
        if self.count == self.n:
            self.last = time.time()
            self.cpu_last = time.process_time()
            self.done.set()

    def latency_hit(self, t: float | None) -> None:
        start = time.time()
        if t is None or t < start - 600:  # the adder's warm-up job
            return
        self.latencies.append((start - t) * 1000)
        if len(self.latencies) == self.n:
            self.done.set()

    def startup_hit(self) -> None:
        if not self.first:
            self.first = time.time()
        self.done.set()


def make_procrastinate(dsn: str, probe_hit: Callable[[dict[str, Any]], None] | None) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    async def noop(**kwargs: Any) -> None:
        if probe_hit is not None:
            probe_hit(kwargs)

    app.task(name="noop")(noop)
    return app


async def run_pgqueuer(mode: str, dsn: str, probe: Probe) -> dict[str, Any]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    conn = await asyncpg.connect(dsn)
    side = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    async def noop(job: Any) -> None:
        if mode == "throughput":
            probe.throughput_hit()
        elif mode == "latency":
            probe.latency_hit(json.loads(job.payload).get("t"))
        else:
            probe.startup_hit()

    qm.entrypoint("noop", concurrency_limit=PGQ_LIMIT)(noop)

    t0 = time.time()
    task = asyncio.create_task(qm.run())
    return await drive(
        mode,
        probe,
        t0,
        ready=lambda: asyncio.sleep(0.5 if mode != "startup" else 0),
        add_one=lambda: Queries(AsyncpgDriver(side)).enqueue("noop", b"{}"),
        stop=lambda: stop_pgqueuer(qm, task),
        cleanup=[conn.close, side.close],
        worker=task,
    )


async def stop_pgqueuer(qm: Any, task: asyncio.Task[None]) -> None:
    qm.shutdown.set()
    await task


async def run_procrastinate(mode: str, dsn: str, probe: Probe) -> dict[str, Any]:
    def hit(kwargs: dict[str, Any]) -> None:
        if mode == "throughput":
            probe.throughput_hit()
        elif mode == "latency":
            probe.latency_hit(kwargs.get("t"))
        else:
            probe.startup_hit()

    app = make_procrastinate(dsn, hit)
    await app.open_async()
    t0 = time.time()
    task = asyncio.create_task(
        app.run_worker_async(concurrency=CONCURRENCY, install_signal_handlers=False)
    )

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return await drive(
        mode,
        probe,
        t0,
        ready=lambda: asyncio.sleep(0.5 if mode != "startup" else 0),
        add_one=lambda: app.tasks["noop"].defer_async(),
        stop=stop,
        cleanup=[app.close_async],
        worker=task,
    )


async def drive(
    mode: str,
    probe: Probe,
    t0: float,
    *,
    ready: Callable[[], Awaitable[object]],
    add_one: Callable[[], Awaitable[object]],
    stop: Callable[[], Awaitable[object]],
    cleanup: list[Callable[[], Awaitable[object]]],
    worker: asyncio.Task[None],
) -> dict[str, Any]:
    """The scenario around a started worker; the same steps as gw_runner.cjs."""
    try:
        await ready()
        t_ready = time.time()
        emit({"event": "ready", "t": t_ready})
        if mode == "startup":
            await add_one()
        done = asyncio.create_task(probe.done.wait())
        await asyncio.wait([done, worker], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # the worker died: say why
            done.cancel()
            worker.result()
            raise RuntimeError("the worker stopped before the jobs ran")
        cpu_end = time.process_time()
        rss = rss_mb()
        if mode == "throughput":  # the harness watches the last commit, then says stop
            emit({"event": "drained", "t_start": t0, "first": probe.first, "last": probe.last})
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if mode == "startup":
            await asyncio.sleep(0.3)
        s0 = time.time()
        await stop()
        s1 = time.time()
    finally:
        for close in cleanup:
            await close()
    if mode == "throughput":
        return {
            "n": probe.count,
            "t_start": t0,
            "first": probe.first,
            "last": probe.last,
            "elapsed_s": probe.last - probe.first,
            "jobs_per_s": (probe.count - 1) / (probe.last - probe.first),
            "cpu_us_per_job": (cpu_end - probe.cpu_first) * 1e6 / probe.count,
            "rss_mb": rss,
            "peak_rss_mb": peak_rss_mb(),
        }
    if mode == "latency":
        return {"latencies_ms": probe.latencies, "rss_mb": rss, "peak_rss_mb": peak_rss_mb()}
    return {
        "ready_ms": None,  # no public "started" signal; first_job_ms is the measure
        "first_job_ms": (probe.first - t0) * 1000,
        "shutdown_ms": (s1 - s0) * 1000,
    }


async def enqueue_bench(system: str, dsn: str, n: int) -> dict[str, Any]:
    """Client-side enqueue: 300 single adds (round trip) and n jobs in bulk chunks of 1000."""
    single: list[float] = []
    if system == "pgqueuer":
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        queries = Queries(AsyncpgDriver(conn))
        try:
            for _ in range(300):
                t = time.perf_counter()
                await queries.enqueue("noop", b"{}")
                single.append((time.perf_counter() - t) * 1000)
            t0 = time.perf_counter()
            for done in range(0, n, 1000):
                k = min(1000, n - done)
                await queries.enqueue(["noop"] * k, [b"{}"] * k, [0] * k)
            elapsed = time.perf_counter() - t0
        finally:
            await conn.close()
    else:
        app = make_procrastinate(dsn, None)
        async with app.open_async():
            task = app.tasks["noop"]
            for _ in range(300):
                t = time.perf_counter()
                await task.defer_async()
                single.append((time.perf_counter() - t) * 1000)
            t0 = time.perf_counter()
            for done in range(0, n, 1000):
                k = min(1000, n - done)
                await task.batch_defer_async(*([{}] * k))
            elapsed = time.perf_counter() - t0
    return {"add_job_ms": single, "bulk_jobs_per_s": n / elapsed}


async def run(system: str, mode: str, dsn: str, n: int) -> None:
    if mode == "enqueue":
        result = await enqueue_bench(system, dsn, n)
    else:
        probe = Probe(n)
        runner = {"pgqueuer": run_pgqueuer, "procrastinate": run_procrastinate}[system]
        result = await runner(mode, dsn, probe)
    emit({"event": "result", **result})


def main(argv: list[str]) -> None:
    cmd, system, *rest = argv
    coro: Awaitable[None]
    if cmd == "install":
        coro = install(system, rest[0])
    elif cmd == "bulk":
        coro = bulk(system, rest[0], int(rest[1]), analyze=rest[2:] != ["raw"])
    elif cmd == "bulk-future":  # graphile schema only: run_at tomorrow
        coro = graphile_bulk(rest[0], int(rest[1]), future=True)
    elif cmd == "pace":
        coro = pace(system, rest[0], int(rest[1]), float(rest[2]))
    elif cmd == "run":
        coro = run(system, rest[0], rest[1], int(rest[2]))
    else:
        raise SystemExit(__doc__)
    asyncio.run(coro)


if __name__ == "__main__":
    main(sys.argv[1:])
