"""Running the scenario matrix and printing it: medians [min-max] and ratios."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .harness import Bench, System

Results = dict[str, dict[str, list[dict[str, Any]]]]  # system key -> scenario -> reps


def run_matrix(
    bench: Bench,
    systems: Sequence[System],
    scenarios: Mapping[str, int],
    reps: int,
    say: Callable[[str], None],
    setups: Mapping[str, Callable[[str], None]] | None = None,
) -> Results:
    """Every (scenario, system) once per rep; systems interleaved so noise hits all alike."""
    results: Results = {s.key: {sc: [] for sc in scenarios} for s in systems}
    for rep in range(1, reps + 1):
        for scenario, n in scenarios.items():
            for system in systems:
                try:
                    r = bench.run(system, scenario, n, setup=(setups or {}).get(scenario))
                except Exception as exc:  # one failing peer must not sink the run
                    say(f"  ! {system.key} {scenario} rep {rep}: {type(exc).__name__}: {exc}")
                    continue
                r["rep"] = rep
                results[system.key][scenario].append(r)
                say(f"  rep {rep} {scenario:<10} {system.key:<16} {brief(scenario, r)}")
    return results


def brief(scenario: str, r: Mapping[str, Any]) -> str:
    if scenario.startswith("drain_"):
        return (
            f"{r['committed_jobs_per_s']:>8.0f} jobs/s start -> last commit "
            f"({r['start_to_commit_s']:.2f} s; first start {r['start_to_first_ms']:.0f} ms, "
            f"last start -> commit {r['last_start_to_commit_ms']:.1f} ms)  "
            f"{r['jobs_per_s']:.0f} jobs/s first -> last start"
        )
    if scenario == "throughput" or scenario.startswith("flat"):
        return (
            f"{r['jobs_per_s']:>8.0f} jobs/s  cpu {r['cpu_us_per_job']:.0f} us/job  "
            f"server cpu {r.get('server_cpu_us_per_job', float('nan')):.0f} us/job  "
            f"rss {r['rss_mb']:.0f} MB (peak {r['peak_rss_mb']:.0f})"
        )
    if scenario == "latency":
        return (
            f"p50 {r['latency_p50_ms']:.1f}  p95 {r['latency_p95_ms']:.1f}  "
            f"p99 {r['latency_p99_ms']:.1f} ms  (n={r['latency_n']})"
        )
    if scenario == "startup":
        return f"first job {r['first_job_ms']:.0f} ms  shutdown {r['shutdown_ms']:.0f} ms"
    if scenario == "enqueue":
        return (
            f"add_job p50 {r['add_job_p50_ms']:.2f} ms  add_jobs {r['bulk_jobs_per_s']:.0f} jobs/s"
        )
    return str(r)


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    n: int

    def fmt(self, digits: int = 0) -> str:
        if self.n == 0:
            return "-"
        f = f"{{:,.{digits}f}}"
        if self.n == 1:
            return f.format(self.median)
        return f"{f.format(self.median)} [{f.format(self.low)}-{f.format(self.high)}]"


def stat(results: Results, key: str, scenario: str, metric: str) -> Stat:
    values = [
        float(r[metric])
        for r in results.get(key, {}).get(scenario, [])
        if r.get(metric) is not None
    ]
    if not values:
        return Stat(float("nan"), float("nan"), float("nan"), 0)
    return Stat(statistics.median(values), min(values), max(values), len(values))


def paired_ratio(results: Results, key: str, base: str, scenario: str, metric: str) -> Stat:
    """``key``'s metric over ``base``'s, rep by rep (the two ran minutes apart at most, so
    a slow phase of the machine hits both), as median [min-max]."""
    by_rep = {
        r.get("rep"): r[metric] for r in results.get(base, {}).get(scenario, []) if r.get(metric)
    }
    values = [
        float(r[metric]) / float(by_rep[r.get("rep")])
        for r in results.get(key, {}).get(scenario, [])
        if r.get(metric) is not None and r.get("rep") in by_rep
    ]
    if not values:
        return Stat(float("nan"), float("nan"), float("nan"), 0)
    return Stat(statistics.median(values), min(values), max(values), len(values))


def ratio(a: Stat, b: Stat) -> float:
    if a.n == 0 or b.n == 0 or b.median == 0:
        return float("nan")
    return a.median / b.median


DRAIN_METRICS = (
    "committed_jobs_per_s",
    "start_to_commit_s",
    "start_to_first_ms",
    "last_start_to_commit_ms",
    "jobs_per_s",
    "server_cpu_us_per_job",
)


def drain_scenario(backlog: int) -> str:
    return f"drain_{backlog}"


def summary(results: Results, systems: Sequence[System]) -> dict[str, Any]:
    """The medians as plain data (for JSON)."""
    metrics = {
        "throughput": (
            "jobs_per_s",
            "cpu_us_per_job",
            "server_cpu_us_per_job",
            "rss_mb",
            "peak_rss_mb",
        ),
        "latency": ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "rss_mb"),
        "startup": ("first_job_ms", "ready_ms", "shutdown_ms"),
        "enqueue": ("add_job_p50_ms", "add_job_p99_ms", "bulk_jobs_per_s"),
        "flat_empty": ("jobs_per_s",),
        "flat_1m": ("jobs_per_s",),
        "flat_future": ("jobs_per_s",),
    }
    drains = sorted({sc for per in results.values() for sc in per if sc.startswith("drain_")})
    for scenario in drains:
        metrics[scenario] = DRAIN_METRICS
    out: dict[str, Any] = {}
    for s in systems:
        per: dict[str, Any] = {"label": s.label, "version": s.version}
        for scenario, names in metrics.items():
            for m in names:
                st = stat(results, s.key, scenario, m)
                if st.n:
                    per[f"{scenario}.{m}"] = {
                        "median": st.median,
                        "min": st.low,
                        "max": st.high,
                        "n": st.n,
                    }
        out[s.key] = per
    return out


def markdown(
    results: Results,
    systems: Sequence[System],
    baseline: str | None,
) -> str:
    """Markdown tables, each when measured: the job path, start/stop and enqueue, the
    drains (start -> last commit), the flat cost."""
    base_tp = stat(results, baseline, "throughput", "jobs_per_s") if baseline else None
    lines: list[str] = []
    if any(results.get(s.key, {}).get(sc) for s in systems for sc in ("throughput", "latency")):
        lines += [
            "| system | throughput jobs/s | x " + (baseline or "-") + " | latency p50 ms | p95 ms |"
            " p99 ms | worker RSS MB | CPU us/job | server CPU us/job |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in systems:
            tp = stat(results, s.key, "throughput", "jobs_per_s")
            x = ratio(tp, base_tp) if base_tp else float("nan")
            xs = "-" if x != x else f"{x:.2f}x"  # NaN: no baseline in this run
            rss = max_stat(
                stat(results, s.key, "throughput", "rss_mb"),
                stat(results, s.key, "latency", "rss_mb"),
            )
            lines.append(
                f"| {s.label} | {tp.fmt()} | {xs} | "
                f"{stat(results, s.key, 'latency', 'latency_p50_ms').fmt(1)} | "
                f"{stat(results, s.key, 'latency', 'latency_p95_ms').fmt(1)} | "
                f"{stat(results, s.key, 'latency', 'latency_p99_ms').fmt(1)} | "
                f"{rss.fmt()} | {stat(results, s.key, 'throughput', 'cpu_us_per_job').fmt()} | "
                f"{stat(results, s.key, 'throughput', 'server_cpu_us_per_job').fmt()} |"
            )
    has_second = any(
        results.get(s.key, {}).get(sc) for s in systems for sc in ("startup", "enqueue")
    )
    if has_second:
        lines += [
            "",
            "| system | start -> first job ms | shutdown ms (idle) | add_job round trip ms p50 |"
            " add_jobs jobs/s (chunks of 1000) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for s in systems:
            lines.append(
                f"| {s.label} | {stat(results, s.key, 'startup', 'first_job_ms').fmt()} | "
                f"{stat(results, s.key, 'startup', 'shutdown_ms').fmt()} | "
                f"{stat(results, s.key, 'enqueue', 'add_job_p50_ms').fmt(2)} | "
                f"{stat(results, s.key, 'enqueue', 'bulk_jobs_per_s').fmt()} |"
            )
    drains = sorted(
        {sc for per in results.values() for sc, reps in per.items() if sc.startswith("drain_")},
        key=lambda sc: int(sc.removeprefix("drain_")),
    )
    if drains:
        lines += [
            "",
            "| backlog | system | start -> last commit jobs/s | x "
            + (baseline or "-")
            + " | x "
            + (baseline or "-")
            + " per rep | first -> last start jobs/s | start -> first job ms |"
            " last start -> commit ms | server CPU us/job |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for sc in drains:
            base = stat(results, baseline, sc, "committed_jobs_per_s") if baseline else None
            for s in systems:
                c = stat(results, s.key, sc, "committed_jobs_per_s")
                if not c.n:
                    continue
                x = ratio(c, base) if base else float("nan")
                xs = "-" if x != x else f"{x:.2f}x"
                per_rep = (
                    paired_ratio(results, s.key, baseline, sc, "committed_jobs_per_s")
                    if baseline
                    else Stat(float("nan"), float("nan"), float("nan"), 0)
                )
                lines.append(
                    f"| {int(sc.removeprefix('drain_')):,} | {s.label} | {c.fmt()} | {xs} | "
                    f"{per_rep.fmt(2)} | "
                    f"{stat(results, s.key, sc, 'jobs_per_s').fmt()} | "
                    f"{stat(results, s.key, sc, 'start_to_first_ms').fmt()} | "
                    f"{stat(results, s.key, sc, 'last_start_to_commit_ms').fmt(1)} | "
                    f"{stat(results, s.key, sc, 'server_cpu_us_per_job').fmt()} |"
                )
    flat = [s for s in systems if results.get(s.key, {}).get("flat_1m")]
    if flat:
        lines += [
            "",
            "| system | empty table jobs/s | 1,000,000 waiting | ratio |"
            " 100,000 future-scheduled | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in flat:
            tp = flat_baseline(results, s.key)
            big = stat(results, s.key, "flat_1m", "jobs_per_s")
            fut = stat(results, s.key, "flat_future", "jobs_per_s")
            lines.append(
                f"| {s.label} | {tp.fmt()} | {big.fmt()} | {ratio(big, tp):.2f} | "
                f"{fut.fmt()} | {ratio(fut, tp):.2f} |"
            )
    return "\n".join(lines).strip("\n")


def flat_baseline(results: Results, key: str) -> Stat:
    """The empty-table rate the flat-cost runs compare with: the one measured between
    them (``flat_empty``), else the throughput scenario's."""
    empty = stat(results, key, "flat_empty", "jobs_per_s")
    return empty if empty.n else stat(results, key, "throughput", "jobs_per_s")


def max_stat(a: Stat, b: Stat) -> Stat:
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    return a if a.median >= b.median else b
