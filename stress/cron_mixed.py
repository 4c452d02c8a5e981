"""Cron across a mixed fleet: three kongtask schedulers and one Node graphile-worker 0.18.

Usage::

    python stress/cron_mixed.py [--dsn POSTGRES_URL] [--boundaries 2]

Starts a throwaway PostgreSQL (unless ``--dsn`` names a server to create a scratch
database on), migrates it with graphile-worker 0.18.0 from npm, then runs one shared
crontab in four processes: three ``kongtask`` scheduler processes (each its own pool)
and one Node ``graphile-worker`` (with no task handlers, so the jobs stay in the table
to be counted). Some identifiers are seeded in ``known_crontabs`` as if they last ran
30 minutes ago, so every process also races through the same backfill window at start.

It waits for ``--boundaries`` real minute boundaries after the last process started
(about 2-3 minutes), stops everything and checks, for every item and every minute from
the backfill window to the last boundary: exactly one job where the pattern matches,
none where it does not, ``_cron.ts`` equal to ``run_at`` in JavaScript ISO format, and
``backfilled`` true exactly before the processes started. It prints the counts (with how
many jobs each kongtask process added; Node added the rest) and exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CRONTAB = """\
# shared by every process in this stress run
* * * * * every
* * * * * every_opts ?queue=cron-q&priority=2&max=5 {kind: 'opts', n: [1.0, 2.5]}
*/2 * * * * even
* * * * * filled ?fill=5m {filled: true}
*/3 * * * * filled3 ?id=filled_every3&fill=12m
0 0 1 1 * yearly ?fill=1h
""" + "".join(
    # Many identifiers per minute, listed out of alphabetical order: more row locks taken
    # per statement, so processes contend on every tick.
    f"* * * * * bulk_{n:02d} ?id=b{n:02d}{' {n: ' + str(n) + '}' if n % 2 else ''}\n"
    for n in (7, 3, 11, 0, 9, 1, 5, 10, 2, 8, 4, 6)
)
SEEDED = ("filled", "filled_every3", "yearly")  # last ran 30 minutes ago
MINUTE = timedelta(minutes=1)


def _child(dsn: str, name: str) -> None:
    """One kongtask scheduler process; prints how many jobs it added when stopped."""
    import trio

    from kongtask._cron import CronScheduler, PgCronBackend, crontab
    from kongtask._pg import open_database

    async def main() -> None:
        async with open_database(dsn, max_size=2) as db:
            backend = PgCronBackend(db, "graphile_worker")
            scheduler = CronScheduler(crontab(CRONTAB), backend)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(scheduler.run)
                    print(f"READY {name}", flush=True)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
            print(f"ADDED {name} {backend.jobs_added} restarts={scheduler.restarts}", flush=True)

    trio.run(main)


def _sql(dsn: str, query: str) -> list[tuple[object, ...]]:
    from kongtask.testing._postgres import run_sync_sql

    records = run_sync_sql(dsn, query)[0]
    assert isinstance(records, list)
    return [tuple(r) for r in records]


def _kill_if_running(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()


def _run(dsn: str, boundaries: int) -> int:
    from oracle import node_for, oracle_dir, oracle_migrate

    from kongtask._cron import crontab, format_ts
    from kongtask.testing._postgres import run_sync_sql

    items = crontab(CRONTAB)
    oracle_migrate(dsn, version="0.18.0")
    seeded_last = datetime.now(UTC).replace(second=0, microsecond=0) - 30 * MINUTE
    run_sync_sql(
        dsn,
        "insert into graphile_worker._private_known_crontabs values "
        + ",".join(
            f"('{i}', '{seeded_last.isoformat()}'::timestamptz - interval '2 hours', "
            f"'{seeded_last.isoformat()}')"
            for i in SEEDED
        ),
    )
    cli = oracle_dir("0.18.0") / "node_modules" / "graphile-worker" / "dist" / "cli.js"
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        (Path(tmp) / "tasks").mkdir()
        (Path(tmp) / "crontab").write_text(CRONTAB)
        t_first = datetime.now(UTC)
        for n in range(3):
            p = subprocess.Popen(
                [sys.executable, __file__, "--child", dsn, f"kongtask-{n + 1}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append((f"kongtask-{n + 1}", p))
        node = subprocess.Popen(
            [node_for("0.18.0"), str(cli), "-c", dsn, "--crontab", str(Path(tmp) / "crontab")],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(("node", node))
        for _, p in procs:
            stack.callback(_kill_if_running, p)
        for name, p in procs[:3]:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                print(f"{name} failed to start: {line!r}", file=sys.stderr)
                return 1
        t_started = datetime.now(UTC)
        last = t_started.replace(second=0, microsecond=0) + boundaries * MINUTE
        print(
            f"4 processes started {format_ts(t_first)} .. {format_ts(t_started)}; "
            f"waiting for {boundaries} minute boundaries (until {format_ts(last)} + 5 s)",
            flush=True,
        )
        while datetime.now(UTC) < last + timedelta(seconds=5):
            time.sleep(0.5)
            for name, p in procs:
                if p.poll() is not None:
                    print(f"{name} exited early with {p.returncode}", file=sys.stderr)
                    return 1
        added: dict[str, str] = {}
        for _name, p in procs:
            p.send_signal(signal.SIGTERM)
        for name, p in procs:
            out, _ = p.communicate(timeout=30)
            if name == "node":
                continue
            for line in out.splitlines():
                if line.startswith("ADDED"):
                    added[name] = line.split(" ", 2)[2]

    rows = _sql(
        dsn,
        "select t.identifier, j.run_at, j.payload::text from graphile_worker._private_jobs j "
        "join graphile_worker._private_tasks t on t.id = j.task_id",
    )
    # A process's start time decides whether a minute near it is backfilled or live, and
    # where its backfill window begins. The kongtask processes started between t_first
    # and t_started, so minutes inside those spans may go either way (Node may start a
    # little later, but only ever covers a subset of what kongtask covers). Everywhere
    # else the expectation is exact. Duplicates are never allowed.
    counts: Counter[tuple[str, datetime]] = Counter()
    violations: list[str] = []
    for task, run_at, payload_text in rows:
        assert isinstance(task, str)
        assert isinstance(run_at, datetime)
        counts[(task, run_at)] += 1
        cron = json.loads(str(payload_text)).get("_cron", {})
        if cron.get("ts") != format_ts(run_at):
            violations.append(f"{task} {format_ts(run_at)}: _cron.ts is {cron.get('ts')!r}")
        if run_at < t_first and cron.get("backfilled") is not True:
            violations.append(f"{task} {format_ts(run_at)}: not marked backfilled")
        if run_at > t_started + timedelta(seconds=10) and cron.get("backfilled") is not False:
            violations.append(f"{task} {format_ts(run_at)}: live minute marked backfilled")
    print(
        f"{'identifier':<16}{'expected':>9}{'either':>7}{'jobs':>6}{'dupes':>7}{'missing':>9}{'extra':>7}"
    )
    total_expected = 0
    for item in items:
        spans = [(t_first, t_started)]
        if item.cron_id in SEEDED:
            # Backfill after the last run (30 minutes ago), at most `fill` back.
            if t_first - item.fill > seeded_last:
                lo = t_first - item.fill
                spans.append((t_first - item.fill, t_started - item.fill + MINUTE))
            else:
                lo = seeded_last
        else:
            lo = t_first  # registered now: live minutes only
        minute = lo.replace(second=0, microsecond=0)
        expected: set[datetime] = set()
        maybe: set[datetime] = set()
        while minute <= last:
            if minute > lo and item.matches(minute):
                if any(a <= minute <= b for a, b in spans):
                    maybe.add(minute)
                else:
                    expected.add(minute)
            minute += MINUTE
        got = {ts for (task, ts) in counts if task == item.task}
        dupes = sum(1 for (task, _ts), c in counts.items() if task == item.task and c > 1)
        missing = expected - got
        extra = got - expected - maybe
        total_expected += len(expected)
        print(
            f"{item.cron_id:<16}{len(expected):>9}{len(maybe):>7}{len(got):>6}{dupes:>7}"
            f"{len(missing):>9}{len(extra):>7}"
        )
        if dupes:
            violations.append(f"{item.cron_id}: {dupes} minutes with more than one job")
        if missing:
            violations.append(f"{item.cron_id}: missing {sorted(format_ts(t) for t in missing)}")
        if extra:
            violations.append(f"{item.cron_id}: unexpected {sorted(format_ts(t) for t in extra)}")
    kong_total = sum(int(v.split()[0]) for v in added.values()) if added else 0
    print(f"total jobs {len(rows)} (expected {total_expected}, plus 'either' minutes)")
    for name in sorted(added):
        print(f"  {name} added {added[name]}")
    print(f"  node added {len(rows) - kong_total}")
    live_minutes = sorted({ts for (_task, ts) in counts if ts > t_first})
    print(f"live minutes covered: {[format_ts(t) for t in live_minutes]}")
    if violations:
        print("VIOLATIONS:\n  " + "\n  ".join(violations))
        return 1
    print("OK: exactly one job per item per minute")
    return 0


def main() -> int:
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--boundaries", type=int, default=2, help="minute boundaries to wait for")
    args = parser.parse_args()
    from kongtask.testing._postgres import dsn_with_database, provide_postgres, run_sync_sql

    with ExitStack() as stack:
        server_dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
        name = f"cron_mixed_{os.getpid()}"
        run_sync_sql(server_dsn, f'create database "{name}"')
        try:
            return _run(dsn_with_database(server_dsn, name), args.boundaries)
        finally:
            run_sync_sql(server_dsn, f'drop database if exists "{name}" with (force)')


if __name__ == "__main__":
    sys.exit(main())
