"""``kongtask run --processes N`` and pgBouncer, measured end to end.

    python -m stress.fleet                       # 1 and 2 processes, direct and via pgBouncer
    python -m stress.fleet --jobs 50000 --reps 3 --processes 1,2 --routes direct,pgbouncer

Each run: a fresh database on a throwaway fsync-on cluster, ``--jobs`` no-op jobs
enqueued in one statement (no ``ANALYZE``), then ``kongtask run --once --processes N -j C``
as a real command. A watcher connection reads the lowest job id left every 2 ms (one
step of the primary key's index, ~0.25 ms; a ``count(*)`` would scan the table, ~5 ms
for 50,000 rows, and take a core of the machine the drain runs on); the rate is
``jobs / (time the table became empty - time its first job went)``, so start-up
(interpreter, imports, connections, migration check) is left out; the time from spawn to
exit is logged too. ``direct-unprepared`` runs the pgBouncer settings
(``--no-prepared-statements``) on a direct connection, which tells pgBouncer's own cost
from that of the settings it needs. Routes: ``direct`` to PostgreSQL, or ``pgbouncer`` (transaction
pooling, ``--no-prepared-statements``). The routes and process counts are interleaved
within each rep; medians are printed as markdown. ``--base-src DIR`` also runs the
kongtask found in ``DIR`` (a checkout) beside this one in every rep (``--kongtask-src``
sets this one's). Through pgBouncer, its CPU time per job is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from kongtask._migrate import migrate_sync
from kongtask.testing._pgbouncer import provide_pgbouncer
from kongtask.testing._postgres import LocalCluster, dsn_with_database, find_pg_bindir, run_sync_sql

TASKS = "async def noop(job, ctx):\n    return None\n\ntasks = {'noop': noop}\n"


@contextmanager
def fsync_cluster() -> Iterator[str]:
    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries")
    cluster = LocalCluster(
        bindir, settings={"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    )
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def fresh_database(server_dsn: str, name: str, jobs: int) -> str:
    run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')
    run_sync_sql(server_dsn, f'create database "{name}"')
    dsn = dsn_with_database(server_dsn, name)
    migrate_sync(dsn)
    if jobs:
        run_sync_sql(
            dsn,
            "select count(*) from graphile_worker.add_jobs(array(select "
            "row('noop', '{}'::json, null, null, null, null, null, null)"
            f"::graphile_worker.job_spec from generate_series(1, {jobs})))",
        )
    return dsn


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_rate(
    dsn: str,
    direct_dsn: str,
    jobs: int,
    processes: int,
    concurrency: int,
    bounced: bool,
    cwd: Path,
    src: str | None = None,
) -> tuple[float, float]:
    """(jobs/s from the first completion to the last, seconds from spawn to exit)."""
    import psycopg

    argv = [sys.executable, "-m", "kongtask", "--log-level", "WARNING", "run", "-c", dsn]
    argv += ["--tasks", "fleet_bench_tasks", "--once", "-j", str(concurrency)]
    argv += ["--processes", str(processes)]
    if bounced:
        argv.append("--no-prepared-statements")
    first = last = None
    lowest_left = "select id from graphile_worker._private_jobs order by id limit 1"
    with psycopg.connect(direct_dsn, autocommit=True) as watcher:
        row = watcher.execute(lowest_left).fetchone()
        first_id = row[0] if row else None
        started = time.perf_counter()
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([src, str(cwd)])
        proc = subprocess.Popen(argv, cwd=cwd, stderr=subprocess.PIPE, text=True, env=env)
        while last is None:
            # the jobs were added in one statement and are claimed in id order, so the
            # first completion takes the lowest id with it
            row = watcher.execute(lowest_left).fetchone()
            now = time.perf_counter()
            if first is None and (row is None or row[0] != first_id):
                first = now
            if row is None:
                last = now
            elif proc.poll() is not None:
                break
            time.sleep(0.002)
        _, err = proc.communicate()
        elapsed = time.perf_counter() - started
    if proc.returncode != 0 or first is None or last is None:
        raise SystemExit(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    return jobs / max(last - first, 1e-9), elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--processes", default="1,2", help="comma list of process counts")
    p.add_argument(
        "--routes",
        default="direct,pgbouncer",
        help="comma list of direct, pgbouncer, direct-unprepared (direct, but with "
        "--no-prepared-statements: pgBouncer's worker settings without pgBouncer)",
    )
    p.add_argument(
        "--kongtask-src", default=None, help="the checkout to measure (default: as imported)"
    )
    p.add_argument("--base-src", default=None, help="a second checkout, run beside it")
    args = p.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    routes = args.routes.split(",")
    sources: dict[str, str | None] = {"": args.kongtask_src}
    if args.base_src:
        sources = {"base ": args.base_src, **sources}
    results: dict[tuple[str, int], list[float]] = {}
    bouncer_cpu: dict[tuple[str, int], list[float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "fleet_bench_tasks.py").write_text(TASKS)
        server = stack.enter_context(fsync_cluster())
        bouncer = stack.enter_context(provide_pgbouncer(server)) if "pgbouncer" in routes else None
        for rep in range(args.reps):
            for route in routes:
                for n in counts:
                    for label, src in sources.items():
                        key = f"{label}{route}"
                        name = f"fleet_{rep}_{route}_{n}_{len(label)}"
                        direct = fresh_database(server, name, args.jobs)
                        dsn = direct
                        if route == "pgbouncer":
                            assert bouncer is not None
                            dsn = bouncer.dsn_for(direct)
                            cpu0 = cpu_seconds(bouncer.pid)
                        unprepared = route in ("pgbouncer", "direct-unprepared")
                        rate, elapsed = drain_rate(
                            dsn, direct, args.jobs, n, args.concurrency, unprepared, Path(tmp), src
                        )
                        results.setdefault((key, n), []).append(rate)
                        note = ""
                        if route == "pgbouncer":
                            assert bouncer is not None
                            per_job = (cpu_seconds(bouncer.pid) - cpu0) * 1e6 / args.jobs
                            bouncer_cpu.setdefault((key, n), []).append(per_job)
                            note = f", pgBouncer CPU {per_job:.0f} us/job"
                        print(
                            f"rep {rep} {key:14} processes {n}: {rate:,.0f} jobs/s "
                            f"(spawn to exit {elapsed:.2f} s{note})",
                            file=sys.stderr,
                            flush=True,
                        )
    load = os.getloadavg()
    print(
        f"\n{args.jobs:,} no-op jobs, -j {args.concurrency}, medians of {args.reps} "
        f"[min-max]; load average at the end {load[0]:.1f}\n"
    )
    print("| route | processes | jobs/s | x 1 process direct | pgBouncer CPU us/job |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (route, n), rates in results.items():
        label = route[: -len(route.split()[-1])]  # "base " or ""
        base = statistics.median(results.get((f"{label}direct", 1), [float("nan")]))
        median = statistics.median(rates)
        cpu = bouncer_cpu.get((route, n))
        print(
            f"| {route} | {n} | {median:,.0f} [{min(rates):,.0f}-{max(rates):,.0f}] "
            f"| {median / base:.2f}x | {f'{statistics.median(cpu):.0f}' if cpu else '-'} |"
        )


if __name__ == "__main__":
    main()
