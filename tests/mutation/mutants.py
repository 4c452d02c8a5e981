"""Mutation check: deliberate breakages of the worker's critical behaviours must fail tests.

Each mutant replaces one small, stable snippet (an anchor) of a copy of the ``kongtask``
package in a temporary folder, then runs the named fast tests against that copy (through
``PYTHONPATH``, which the tests' own subprocesses inherit). A mutant is *killed* when
those tests fail. The script prints one line per mutant and the kill count, and exits 1
when any mutant survives or cannot be applied: an anchor that is missing (or found more
often than expected) fails loudly, naming the mutant, because the code it breaks has
changed and the mutant must be updated with it.

Usage: ``python3 tests/mutation/mutants.py [--jobs 2] [--only NAME ...] [--list]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kongtask"
#: Longest a mutant's tests may run; a hang counts as a survivor (CI would hang too).
MUTANT_TIMEOUT = 300.0

WORKER_PROPS = (
    "tests/test_lifecycle_worker.py::test_hung_serial_queue_is_failed_and_its_sibling_kept"
)
PROMISES = "tests/test_promises.py"


@dataclass(frozen=True)
class Mutant:
    """One deliberate breakage.

    Attributes:
      name: what it breaks.
      path: the file, relative to the package.
      anchor: the exact text replaced.
      replacement: what replaces it.
      tests: pytest node ids that must fail.
      count: how many times ``anchor`` must occur (every occurrence is replaced).
    """

    name: str
    path: str
    anchor: str
    replacement: str
    tests: tuple[str, ...]
    count: int = 1


MUTANTS = (
    Mutant(
        "claim returns nothing",
        "_sql.py",
        "  order by f.priority asc, f.run_at asc\n  limit $3::int",
        "  order by f.priority asc, f.run_at asc\n  limit 0",
        (WORKER_PROPS,),
    ),
    Mutant(
        "a completion is dropped",
        "_worker/_completer.py",
        "            self._ok.append(write.job)\n",
        "            pass\n",
        (WORKER_PROPS,),
    ),
    Mutant(
        "the queue unlock is skipped on failure",
        "_sql.py",
        "select f.job_queue_id from failed f",
        "select null::int from failed f",
        (f"{PROMISES}::test_a_failed_job_unlocks_its_named_queue",),
    ),
    Mutant(
        "the attempt is not counted",
        "_sql.py",
        "set attempts = j.attempts + 1, locked_by = $1::text",
        "set attempts = j.attempts, locked_by = $1::text",
        (WORKER_PROPS,),
    ),
    Mutant(
        "unstarted jobs are not handed back at shutdown (attempt kept)",
        "_sql.py",
        "then greatest(0, j.attempts - 1)",
        "then j.attempts",
        ("tests/test_worker.py::test_unstarted_claimed_jobs_are_returned",),
        count=3,
    ),
    Mutant(
        "LISTEN is ignored",
        "_worker/_notifier.py",
        "            if parse_insert_count(payload) > 0:\n                self._wakeup.nudge()",
        "            if parse_insert_count(payload) > 0:\n                pass",
        ("tests/test_worker.py::test_notify_wakes_an_idle_worker",),
    ),
    Mutant(
        "the named-queue rule is dropped",
        "_sql.py",
        "  where r.rn = 1\n",
        "  where r.rn >= 1\n",
        (WORKER_PROPS,),
    ),
    Mutant(
        "the backoff is wrong",
        "_sql.py",
        "exp(least(j.attempts, 10))",
        "exp(least(j.attempts, 10) + 1)",
        ("tests/test_worker.py::test_failure_backoff_and_permanent_failure",),
    ),
    Mutant(
        "the local-queue TTL never fires",
        "_worker/_local_queue.py",
        "while held and held[0][1] <= limit:",
        "while False:",
        ("tests/test_worker.py::test_claimed_jobs_waiting_past_the_ttl_are_returned",),
    ),
    Mutant(
        "the shutdown grace is ignored",
        "_worker/_lifecycle.py",
        "scope = trio.CancelScope(deadline=self._grace_deadline)",
        "scope = trio.CancelScope(deadline=-math.inf)",
        (f"{PROMISES}::test_a_job_that_ends_within_the_grace_completes",),
    ),
    Mutant(
        "the dead-pool sweep never runs",
        "_liveness.py",
        "            release = await sweeper.check(db)\n",
        "            release = Release((), 0, 0)\n",
        ("tests/test_recovery.py::test_killed_worker_jobs_run_elsewhere_within_seconds",),
    ),
    Mutant(
        "a cron tick is doubled",
        "_cron/_scheduler.py",
        "                await self._backend.schedule(ts, due, False)\n",
        "                await self._backend.schedule(ts, due, False)\n"
        "                await self._backend.schedule(ts, due, False)\n",
        ("tests/test_cron_scheduler.py::test_fires_at_each_minute_boundary_plus_slack",),
    ),
)


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # "killed", "SURVIVED", "CANNOT APPLY", "ERROR"
    detail: str
    seconds: float


def apply(mutant: Mutant, package_copy: Path) -> str | None:
    """Apply ``mutant`` to the copy; the reason it cannot be applied, or ``None``."""
    target = package_copy / mutant.path
    if not target.exists():
        return f"{mutant.path} does not exist"
    text = target.read_text()
    found = text.count(mutant.anchor)
    if found != mutant.count:
        return (
            f"anchor {mutant.anchor!r} found {found} times in {mutant.path}, "
            f"expected {mutant.count}: update the mutant to the code"
        )
    target.write_text(text.replace(mutant.anchor, mutant.replacement))
    return None


def run(mutant: Mutant) -> Outcome:
    begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kongtask-mutant-") as folder:
        copy = Path(folder) / "kongtask"
        shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
        problem = apply(mutant, copy)
        if problem is not None:
            return Outcome(mutant, "CANNOT APPLY", problem, time.monotonic() - begin)
        env = {**os.environ, "PYTHONPATH": folder, "PYTHONDONTWRITEBYTECODE": "1"}
        # -P: the working directory (the repository, with the intact package) must not
        # come first on sys.path
        where = subprocess.run(
            [sys.executable, "-P", "-c", "import kongtask; print(kongtask.__file__)"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(folder):
            return Outcome(mutant, "ERROR", f"the mutated copy is not imported ({where!r})", 0.0)
        command = [
            sys.executable,
            "-P",
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--no-header",
            *mutant.tests,
        ]
        try:
            proc = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=MUTANT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return Outcome(
                mutant, "SURVIVED", f"tests hung past {MUTANT_TIMEOUT:.0f} s", MUTANT_TIMEOUT
            )
    seconds = time.monotonic() - begin
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode == 1:
        return Outcome(mutant, "killed", last, seconds)
    if proc.returncode == 0:
        return Outcome(mutant, "SURVIVED", last, seconds)
    return Outcome(
        mutant,
        "ERROR",
        f"pytest exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}",
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument("--only", nargs="*", default=None, help="mutant names to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0 if args.list else 2
    begin = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(run, chosen))
    for o in outcomes:
        print(f"{o.verdict:>12}  {o.mutant.name}  ({o.seconds:.0f} s)  {o.detail}")
    killed = sum(o.verdict == "killed" for o in outcomes)
    print(
        f"mutation check: {killed}/{len(outcomes)} mutants killed "
        f"in {time.monotonic() - begin:.0f} s"
    )
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
