"""The side-by-side benchmark behind ``python -m stress.bench``.

kongtask (defaults and tuned) against graphile-worker 0.18 (defaults and its
high-throughput settings) and, when installed in the peers' virtualenv, pgqueuer and
procrastinate: every system on a fresh database of the same server, each scenario
``--reps`` times with the systems interleaved, medians [min-max] and ratios printed as
markdown, everything else as JSON. ``--check`` exits 1 when a target of issue 5 fails in
this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import (
    FLAT,
    REPO,
    Bench,
    System,
    kongtask_system,
    load_average,
    node_version,
    peer_systems,
    provide_server,
)
from .report import (
    Results,
    drain_scenario,
    flat_baseline,
    markdown,
    ratio,
    run_matrix,
    stat,
    summary,
)

#: kongtask's tuned settings: bigger claims (more jobs locked per pool, less fairness
#: between pools) -- see docs/performance.md
KONGTASK_TUNED: dict[str, Any] = {"batch_size": 2000}

ALL_SYSTEMS = ("kongtask", "kongtask-tuned", "gw", "gw-ht", "pgqueuer", "procrastinate")

#: issue 17's targets for what a user waits for (start -> last commit), per backlog
DRAIN_TARGETS = {20_000: 1.5, 100_000: 2.5}


def kongtask_systems(
    keys: list[str], base_src: str | None = None, src: str | None = None
) -> list[System]:
    out = []
    if base_src:
        out.append(
            kongtask_system("kongtask-base", f"kongtask defaults from {base_src}", {}, src=base_src)
        )
    if "kongtask" in keys:
        out.append(kongtask_system("kongtask", "kongtask defaults", {}, src=src))
    if "kongtask-tuned" in keys:
        opts = ", ".join(f"{k}={v}" for k, v in KONGTASK_TUNED.items())
        out.append(
            kongtask_system("kongtask-tuned", f"kongtask tuned ({opts})", KONGTASK_TUNED, src=src)
        )
    return out


# ------------------------------------------------------------------------------ checks


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not measured in this run
    detail: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[self.ok]
        return f"- {mark} {self.name}: {self.detail}"


def checks(results: Results, systems: list[System]) -> list[Check]:
    keys = {s.key for s in systems}
    out: list[Check] = []

    def tp(key: str) -> Any:
        return stat(results, key, "throughput", "jobs_per_s")

    def have(*ks: str) -> bool:
        return all(k in keys and tp(k).n for k in ks)

    kt_best = max(
        (k for k in ("kongtask", "kongtask-tuned") if have(k)),
        key=lambda k: tp(k).median,
        default=None,
    )
    gw_variants = [k for k in ("gw-ht", "gw-ht-quiet", "gw") if have(k)]
    gw_best = max(gw_variants, key=lambda k: tp(k).median, default=None)

    def ratio_check(name: str, a: str | None, b: str | None, want: float) -> None:
        if a is None or b is None:
            out.append(Check(name, None, "not measured"))
            return
        r = ratio(tp(a), tp(b))
        out.append(
            Check(
                name,
                r >= want,
                f"{r:.2f}x ({a} {tp(a).median:,.0f} vs {b} {tp(b).median:,.0f} jobs/s; want >= "
                f"{want}x)",
            )
        )

    ratio_check("throughput >= 1.5x graphile-worker's best setting", kt_best, gw_best, 1.5)
    for backlog, want in DRAIN_TARGETS.items():
        sc = drain_scenario(backlog)

        def committed(key: str, sc: str = sc) -> Any:
            return stat(results, key, sc, "committed_jobs_per_s")

        name = f"start -> last commit at {backlog:,} jobs >= {want}x graphile-worker ht"
        kt = [k for k in ("kongtask", "kongtask-tuned") if k in keys and committed(k).n]
        if not kt or not ("gw-ht" in keys and committed("gw-ht").n):
            out.append(Check(name, None, "not measured"))
            continue
        details = []
        for k in kt:
            r = ratio(committed(k), committed("gw-ht"))
            details.append(f"{k} {r:.2f}x ({committed(k).median:,.0f} jobs/s)")
        best_ratio = max(ratio(committed(k), committed("gw-ht")) for k in kt)
        details.append(f"gw-ht {committed('gw-ht').median:,.0f} jobs/s")
        out.append(Check(name, best_ratio >= want, "; ".join(details)))
    ratio_check("throughput >= 5x pgqueuer", kt_best, "pgqueuer" if have("pgqueuer") else None, 5)
    ratio_check(
        "defaults >= 3x graphile-worker defaults",
        "kongtask" if have("kongtask") else None,
        "gw" if have("gw") else None,
        3,
    )

    def lat(key: str, m: str) -> Any:
        return stat(results, key, "latency", m)

    gw_lat = [k for k in ("gw", "gw-ht") if k in keys and lat(k, "latency_p50_ms").n]
    if "kongtask" in keys and lat("kongtask", "latency_p50_ms").n and gw_lat:
        best = min(gw_lat, key=lambda k: lat(k, "latency_p50_ms").median)
        a, b = lat("kongtask", "latency_p50_ms").median, lat(best, "latency_p50_ms").median
        out.append(
            Check("latency p50 <= graphile-worker's", a <= b, f"{a:.2f} ms vs {best} {b:.2f} ms")
        )
    else:
        out.append(Check("latency p50 <= graphile-worker's", None, "not measured"))
    for key in ("kongtask", "kongtask-tuned"):
        if key in keys and lat(key, "latency_p99_ms").n:
            p99 = lat(key, "latency_p99_ms").median
            out.append(Check(f"{key} latency p99 <= 10 ms", p99 <= 10, f"{p99:.2f} ms"))
    for key in ("kongtask", "kongtask-tuned"):
        if key not in keys:
            continue
        rss = [
            stat(results, key, sc, "peak_rss_mb")
            for sc in ("throughput", "latency")
            if stat(results, key, sc, "peak_rss_mb").n
        ]
        if rss:
            worst = max(s.median for s in rss)
            out.append(Check(f"{key} worker RSS <= 60 MB", worst <= 60, f"peak {worst:.0f} MB"))
    if "kongtask" in keys and stat(results, "kongtask", "startup", "first_job_ms").n:
        first = stat(results, "kongtask", "startup", "first_job_ms").median
        stop = stat(results, "kongtask", "startup", "shutdown_ms").median
        out.append(Check("start -> first job <= 100 ms", first <= 100, f"{first:.0f} ms"))
        out.append(Check("shutdown (idle) <= 100 ms", stop <= 100, f"{stop:.0f} ms"))
    for scenario, want, what in (
        ("flat_1m", 0.8, "1,000,000 waiting rows: within 20% of the 20,000 case"),
        ("flat_future", 0.9, "100,000 future rows: within 10% of the empty-table rate"),
    ):
        for key in ("kongtask", "kongtask-tuned"):
            s = stat(results, key, scenario, "jobs_per_s")
            if key in keys and s.n:
                empty = flat_baseline(results, key)
                r = ratio(s, empty)
                out.append(
                    Check(
                        f"{key} flat cost, {what}",
                        r >= want,
                        f"{s.median:,.0f} vs {empty.median:,.0f} jobs/s = {r:.2f}",
                    )
                )
    return out


# ------------------------------------------------------------------------------ context


def versions(systems: list[System]) -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    import importlib.metadata as md

    for dist in ("trio", "trio-asyncio", "asyncpg"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "?"
    for s in systems:
        out[s.key] = s.version
    out["node"] = node_version()
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "kongtask"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        out["kongtask_git"] = rev + ("+dirty" if dirty else "")
    except OSError:
        pass
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


# --------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.bench", description=__doc__)
    p.add_argument(
        "--dsn",
        help="superuser DSN of a server to use (default: a throwaway local cluster with fsync on)",
    )
    p.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma list of {', '.join(ALL_SYSTEMS)}, gw-ht-quiet",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--jobs", type=int, default=20_000, help="throughput scenario size")
    p.add_argument("--latency-jobs", type=int, default=500)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between latency adds")
    p.add_argument(
        "--scenarios",
        default="throughput,latency,startup,enqueue,drain",
        help="comma list of throughput, latency, startup, enqueue, drain (the start -> "
        "last commit drains, one per --backlogs size)",
    )
    p.add_argument(
        "--backlogs",
        default="20000,100000",
        help="comma list of backlog sizes for the drain scenario (default: %(default)s)",
    )
    p.add_argument(
        "--million",
        action="store_true",
        help="also drain a 1,000,000-job backlog (slow: minutes per system and rep)",
    )
    p.add_argument(
        "--flat",
        action="store_true",
        help="also the flat-cost scenarios for kongtask (1,000,000 waiting rows; "
        "100,000 future rows): slow",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2,000 jobs (throughput and drain), 100 latency samples, 1 rep",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument(
        "--kongtask-src",
        metavar="DIR",
        help="import kongtask from DIR (a folder holding a kongtask package) instead of "
        "this repository, for both kongtask systems",
    )
    p.add_argument(
        "--base-src",
        metavar="DIR",
        help="also run kongtask (defaults) imported from DIR, e.g. a checkout of an "
        "older commit, to measure a change side by side",
    )
    p.add_argument("--json", metavar="PATH", help="also write the JSON report here")
    args = p.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    if args.quick:
        args.jobs, args.latency_jobs, args.reps, args.backlogs = 2000, 100, 1, "2000"
    backlogs = [int(b) for b in args.backlogs.split(",") if b.strip()]
    if args.million:
        backlogs.append(1_000_000)
    systems = kongtask_systems(keys, args.base_src, args.kongtask_src) + peer_systems(
        [k for k in keys if not k.startswith("kongtask")], say
    )
    sizes = {
        "throughput": args.jobs,
        "latency": args.latency_jobs,
        "startup": 1,
        "enqueue": min(args.jobs, 5000),  # a rate; 5 chunks of 1,000 are plenty
    }
    scenarios: dict[str, int] = {}
    for k in (k.strip() for k in args.scenarios.split(",")):
        if k == "drain":
            scenarios.update((drain_scenario(b), b) for b in backlogs)
        elif k:
            scenarios[k] = sizes[k]
    load_before = load_average()
    started = time.time()
    with provide_server(args.dsn) as server:
        bench = Bench(server, say)
        try:
            server_info = server.describe()
            say(f"server: {server_info}")
            say(f"load average before: {load_before}")
            results = run_matrix(bench, systems, scenarios, args.reps, say)
            if args.flat:
                flat_systems = [s for s in systems if s.key.startswith("kongtask")]
                flat = run_matrix(
                    bench, flat_systems, dict.fromkeys(FLAT, args.jobs), args.reps, say
                )
                for key, per in flat.items():
                    results[key].update(per)
        finally:
            bench.close()
    base = next((k for k in ("gw-ht", "gw") if any(s.key == k for s in systems)), None)
    table = markdown(results, systems, base)
    verdicts = checks(results, systems)
    report = {
        "command": " ".join(["python -m stress.bench", *(argv or sys.argv[1:])]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "server": server_info,
        "versions": versions(systems),
        "reps": args.reps,
        "sizes": scenarios,
        "summary": summary(results, systems),
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in verdicts],
        "raw": results,
    }
    print(table)
    print()
    print(
        f"{report['machine']['cpus']} CPUs ({report['machine']['cpu']}); load average "
        f"{load_before[0]:.2f} before, {report['load_average']['after'][0]:.2f} after; "
        f"PostgreSQL {server_info['settings'].get('server_version', '?')} "
        f"fsync={server_info['settings'].get('fsync')} "
        f"synchronous_commit={server_info['settings'].get('synchronous_commit')}; "
        f"medians of {args.reps} rep(s) [min-max]"
    )
    print()
    print("\n".join(c.line() for c in verdicts))
    print()
    print(json.dumps({k: v for k, v in report.items() if k != "raw"}, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.check and any(c.ok is False for c in verdicts):
        return 1
    return 0
