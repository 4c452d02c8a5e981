"""Chaos scenarios: prove that kongtask loses no job when things break.

Usage (each scenario starts its own throwaway PostgreSQL on loopback and stops it)::

    python stress/chaos.py kill     [--rounds 100] [--jobs-per-round 40]
    python stress/chaos.py restart  [--restarts 6] [--jobs 3000]
    python stress/chaos.py cut      [--cuts 20] [--jobs 3000]
    python stress/chaos.py faults
    python stress/chaos.py poison   [--jobs 3000] [--per-kind 5] [--restarts 6]
    python stress/chaos.py soak     [--jobs 1000000]
    python stress/chaos.py all      (every scenario with moderate sizes)

Every scenario prints one summary line of counts (jobs added, completed, run more than
once with the reasons, lost) and exits non-zero if a job was lost or left behind.

How runs are counted: workers are real ``kongtask run`` processes whose tasks are the
handlers at the bottom of this file (``--tasks chaos:TASKS``). A handler appends
``S``/``E`` lines (start, end; job number; pid; time) to a ledger file with ``O_APPEND``
writes, which survive ``kill -9`` and need no database. Afterwards:

- *completed*: numbers with an ``E`` line, once the jobs table is empty;
- *run more than once*: numbers with two ``S`` lines or more, each extra run explained by
  what happened to the run before it: in flight when its process was SIGKILLed, finished
  but its completion never reached the database (cut connection, restart), or
  interrupted by a shutdown;
- *lost*: added but never completed and no longer in the table. Must be 0.
- *left*: still in the table when the drain timed out (stuck). Must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from kongtask.testing import TcpProxy

HERE = Path(__file__).resolve().parent
LEDGER_ENV = "KONGTASK_CHAOS_LEDGER"

# --------------------------------------------------------------------------------------
# The tasks of the worker processes (imported as `chaos` by `kongtask run --tasks
# chaos:TASKS`; keep this part free of side effects and cheap to import).

_ledger_fd: int | None = None


def _ledger(kind: str, n: int) -> None:
    global _ledger_fd
    if _ledger_fd is None:
        _ledger_fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    # One write() of a short line with O_APPEND is atomic: lines never interleave, and
    # the kernel keeps them when the process is SIGKILLed.
    os.write(_ledger_fd, f"{kind} {n} {os.getpid()} {time.time():.6f}\n".encode())


async def chaos_job(job: Any, ctx: Any) -> None:
    """Record the start, hold the slot for ``ms`` milliseconds, record the end."""
    n = int(job.payload["n"])
    _ledger("S", n)
    await trio.sleep(job.payload.get("ms", 20) / 1000)
    _ledger("E", n)


async def soak_job(job: Any, ctx: Any) -> None:
    """No work; record the end only (1,000,000 of these must stay cheap)."""
    _ledger("E", int(job.payload["n"]))


class ChaosPoison(BaseException):
    """A user subclass of ``BaseException`` (the ``poison`` scenario)."""


def _poison_exception(kind: str) -> BaseException:
    import asyncio

    made: dict[str, Callable[[], BaseException]] = {
        "asyncio_cancelled": lambda: asyncio.CancelledError("from asyncio code"),
        "keyboard_interrupt": lambda: KeyboardInterrupt("from the handler"),
        "generator_exit": lambda: GeneratorExit("from the handler"),
        "user_base": lambda: ChaosPoison("a user BaseException"),
        "system_exit": lambda: SystemExit(3),
        "base_group": lambda: BaseExceptionGroup(
            "mixed", [KeyboardInterrupt("in a group"), asyncio.CancelledError("in a group")]
        ),
    }
    return made[kind]()


async def poison_job(job: Any, ctx: Any) -> None:
    """Record the start, then raise what ``kind`` says (never an ordinary Exception)."""
    kind = job.payload["kind"]
    _ledger("S", int(job.payload["n"]))
    await trio.lowlevel.checkpoint()
    if kind == "stale_cancelled":
        # a real trio.Cancelled, kept from a scope that has ended, raised again
        with trio.CancelScope() as inner:
            inner.cancel()
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled as exc:
                stale = exc
        raise stale
    if kind == "nursery_child":

        async def child() -> None:
            await trio.lowlevel.checkpoint()
            raise _poison_exception("asyncio_cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            nursery.start_soon(trio.sleep_forever)
    raise _poison_exception(kind)


def poison_sync_job(job: Any, ctx: Any) -> None:
    """The same in a worker thread (a plain function)."""
    _ledger("S", int(job.payload["n"]))
    raise _poison_exception(job.payload["kind"])


TASKS = {"chaos": chaos_job, "soak": soak_job, "poison": poison_job, "poison_sync": poison_sync_job}

# --------------------------------------------------------------------------------------
# The driver.


@dataclass
class Ledger:
    starts: dict[int, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    ends: dict[int, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def read(cls, path: Path) -> Ledger:
        ledger = cls()
        if not path.exists():
            return ledger
        with path.open() as f:
            for line in f:
                parts = line.split()
                if len(parts) != 4:
                    continue  # a torn last line cannot happen with O_APPEND; be lenient
                kind, n, pid, t = parts[0], int(parts[1]), int(parts[2]), float(parts[3])
                (ledger.starts if kind == "S" else ledger.ends)[n].append((pid, t))
        return ledger


@dataclass
class Outcome:
    scenario: str
    added: int
    completed: int
    more_than_once: int
    reasons: Counter[str]
    lost: int
    left: int
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.left == 0

    def line(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "-"
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (
            f"[{self.scenario}] added={self.added} completed={self.completed} "
            f"ran_more_than_once={self.more_than_once} ({why}) lost={self.lost} "
            f"left={self.left}{extra} -> {'OK' if self.ok else 'FAIL'}"
        )


def analyse(
    scenario: str, added: set[int], ledger: Ledger, remaining: set[int], killed: set[int]
) -> Outcome:
    """Count completions, duplicates (with reasons) and losses of the jobs ``added``."""
    completed = {n for n in added if ledger.ends.get(n)}
    reasons: Counter[str] = Counter()
    more = 0
    for n in added:
        starts = sorted(ledger.starts.get(n, []), key=lambda s: s[1])
        if len(starts) < 2:
            continue
        more += 1
        ends = ledger.ends.get(n, [])
        for pid, t in starts[:-1]:
            finished = any(epid == pid and et >= t for epid, et in ends)
            if pid in killed:
                # Completions are written in batches: a job can finish and still be
                # unrecorded when the process dies.
                why = "finished, outcome unwritten at kill" if finished else "running at kill"
            else:
                why = "finished, completion lost" if finished else "interrupted"
            reasons[why] += 1
    lost = {n for n in added if n not in completed and n not in remaining}
    return Outcome(scenario, len(added), len(completed), more, reasons, len(lost), len(remaining))


class Env:
    """One scenario's world: a throwaway cluster, a migrated database, worker processes."""

    def __init__(self, name: str, *, settings: dict[str, str] | None = None) -> None:
        from kongtask.testing._postgres import LocalCluster, find_pg_bindir

        bindir = find_pg_bindir()
        if bindir is None:
            raise SystemExit("chaos: no PostgreSQL binaries (initdb, pg_ctl) found")
        self.name = name
        self.cluster = LocalCluster(bindir, settings=settings)
        self.dir = Path(tempfile.mkdtemp(prefix=f"kongtask-chaos-{name}-"))
        self.ledger_path = self.dir / "ledger"
        self.ledger_path.touch(mode=0o666)
        self.dsn = ""
        self.procs: list[trio.Process] = []
        self.killed: set[int] = set()
        self._logs: dict[int, Path] = {}

    async def __aenter__(self) -> Env:
        from kongtask._migrate import migrate_sync

        # Both block, and migrate_sync runs its own asyncio loop: keep them off trio's thread.
        self.dsn = await trio.to_thread.run_sync(self.cluster.start)
        await trio.to_thread.run_sync(migrate_sync, self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.cluster.stop)

    @property
    def port(self) -> int:
        return int(self.cluster.port)

    async def start_worker(
        self, *args: str, dsn: str | None = None, concurrency: int = 8
    ) -> trio.Process:
        """Start ``kongtask run`` with this file's tasks; its output goes to a log file."""
        index = len(self.procs)
        log = self.dir / f"worker-{index}.log"
        env = {
            **os.environ,
            LEDGER_ENV: str(self.ledger_path),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [
            sys.executable,
            "-c",
            "import sys, trio, kongtask; sys.exit(trio.run(kongtask.main))",
            "--log-level",
            "WARNING",
            "run",
            "-c",
            dsn or self.dsn,
            "--tasks",
            "chaos:TASKS",
            "-j",
            str(concurrency),
            *args,
        ]
        with log.open("wb") as out:
            proc = await trio.lowlevel.open_process(
                cmd, stdout=out, stderr=subprocess_stdout(), env=env
            )
        self.procs.append(proc)
        self._logs[proc.pid] = log
        return proc

    def finish(self, out: Outcome) -> Outcome:
        """Delete the logs and the ledger of a passing scenario; point at them otherwise."""
        if out.ok:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            out.extra["logs"] = str(self.dir)
        return out

    def log_tail(self, proc: trio.Process, lines: int = 15) -> str:
        text = self._logs[proc.pid].read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def kill(self, proc: trio.Process) -> None:
        self.killed.add(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def stop(self, proc: trio.Process, *, grace: float = 30) -> int:
        """SIGTERM, then wait for a clean exit (SIGKILL after ``grace`` seconds)."""
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await proc.wait()
        await self.kill(proc)
        return -9


def subprocess_stdout() -> int:
    import subprocess

    return subprocess.STDOUT


@contextlib.asynccontextmanager
async def open_db(dsn: str) -> AsyncIterator[Any]:
    from kongtask._pg import open_database

    async with open_database(dsn, max_size=4) as db:
        yield db


async def add_numbered(
    db: Any, numbers: Sequence[int], *, ms: tuple[int, int] = (5, 60), queues: int = 3
) -> None:
    """Add one ``chaos`` job per number (about one in five in a named queue).

    Each job has the key ``n<number>``, so re-adding a batch after an error whose
    outcome is unknown does not create a second job.
    """
    from kongtask import JobSpec
    from kongtask._client import Client

    client = Client(db, "graphile_worker")
    specs = [
        JobSpec(
            "chaos",
            {"n": n, "ms": random.randint(*ms)},
            queue_name=f"q{n % queues}" if queues and n % 5 == 0 else None,
            job_key=f"n{n}",
            max_attempts=25,
        )
        for n in numbers
    ]
    await client.add_jobs(specs)


async def add_with_retry(db: Any, numbers: Sequence[int]) -> None:
    """:func:`add_numbered`, retried with backoff while the database is unreachable."""
    delay = 0.05
    while True:
        try:
            await add_numbered(db, numbers)
            return
        except Exception as exc:  # server restarting, connection reset: try again
            if "duplicate" in str(exc):
                raise
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def remaining_numbers(db: Any) -> set[int]:
    rows = await db.fetch(
        "select (payload->>'n')::int as n from graphile_worker._private_jobs "
        "where payload->>'n' is not null"
    )
    return {r["n"] for r in rows}


async def count_jobs(db: Any) -> int:
    n: int = await db.fetchval("select count(*) from graphile_worker._private_jobs")
    return n


async def drain(db: Any, seconds: float) -> set[int]:
    """Wait until the jobs table is empty (or ``seconds`` pass); return what is left."""
    with trio.move_on_after(seconds):
        while True:
            try:
                if await count_jobs(db) == 0:
                    return set()
            except Exception:  # the server may be coming back up
                pass
            await trio.sleep(0.2)
    return await remaining_numbers(db)


async def wait_for_start(env: Env, pid: int, seconds: float) -> bool:
    """Wait until the worker ``pid`` has started a job (per the ledger)."""
    needle = f" {pid} ".encode()
    with trio.move_on_after(seconds):
        while True:
            if needle in env.ledger_path.read_bytes()[-200_000:]:
                return True
            await trio.sleep(0.02)
    return False


# --- scenario: kill -9 ----------------------------------------------------------------


async def scenario_kill(rounds: int, per_round: int) -> Outcome:
    """SIGKILL a worker at a random moment of each round; the next one takes over."""
    async with Env("kill") as env:
        async with open_db(env.dsn) as db:
            added: set[int] = set()
            next_n = 0
            t0 = time.monotonic()
            for _ in range(rounds):
                batch = list(range(next_n, next_n + per_round))
                next_n += per_round
                await add_numbered(db, batch)
                added.update(batch)
                proc = await env.start_worker()
                await wait_for_start(env, proc.pid, 20)
                await trio.sleep(random.uniform(0, 0.6))
                await env.kill(proc)
            kill_phase = time.monotonic() - t0
            # The last worker drains: it must release the dead pools' jobs itself
            # (fast recovery), so the drain takes seconds, not four hours.
            t1 = time.monotonic()
            final = await env.start_worker()
            left = await drain(db, 120)
            drain_time = time.monotonic() - t1
            code = await env.stop(final)
        out = analyse("kill -9", added, Ledger.read(env.ledger_path), left, env.killed)
        out.extra.update(
            rounds=rounds,
            kill_phase_s=round(kill_phase, 1),
            final_drain_s=round(drain_time, 1),
            final_exit=code,
        )
        if code != 0:
            print(env.log_tail(final))
        return env.finish(out)


# --- scenario: Postgres restart -------------------------------------------------------


async def crash_a_backend(dsn: str) -> None:
    """SIGKILL one client backend: the postmaster then ends every session and runs crash
    recovery without restarting itself (``pg_postmaster_start_time()`` does not change)."""
    from kongtask.testing._postgres import run_sync_sql, wait_for_server

    await trio.to_thread.run_sync(wait_for_server, dsn, 60.0)  # maybe still recovering
    rows = await trio.to_thread.run_sync(
        run_sync_sql,
        dsn,
        "select pid from pg_stat_activity where backend_type = 'client backend' "
        "and pid <> pg_backend_pid() order by backend_start limit 1",
    )
    records: Any = rows[0]
    if records:
        os.kill(int(records[0]["pid"]), signal.SIGKILL)


async def scenario_restart(restarts: int, jobs: int) -> Outcome:
    """``pg_ctl restart -m fast`` / ``-m immediate`` and a backend crash under two workers."""
    # Durable settings: the test clusters run with fsync and synchronous_commit off, and
    # an immediate shutdown then forgets commits it already acknowledged. That would be
    # PostgreSQL losing jobs, not kongtask.
    durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    async with Env("restart", settings=durable) as env:
        workers = [await env.start_worker(concurrency=4) for _ in range(2)]
        added: set[int] = set()
        modes: list[str] = []
        async with open_db(env.dsn) as db, trio.open_nursery() as nursery:
            done_adding = trio.Event()

            async def adder() -> None:
                batch = 20
                for start in range(0, jobs, batch):
                    numbers = list(range(start, min(start + batch, jobs)))
                    await add_with_retry(db, numbers)
                    added.update(numbers)
                    await trio.sleep(0.05)
                done_adding.set()

            nursery.start_soon(adder)
            # Restart only once both workers run jobs: a worker that cannot reach the
            # database while *starting* exits with a one-line error, as graphile-worker.
            for w in workers:
                if not await wait_for_start(env, w.pid, 60):
                    raise SystemExit(f"worker {w.pid} did not start:\n{env.log_tail(w)}")
            for i in range(restarts):
                await trio.sleep(random.uniform(1.0, 3.0))
                mode = ("fast", "immediate", "crash")[i % 3]
                modes.append(mode)
                if mode == "crash":
                    await crash_a_backend(env.dsn)
                    continue
                cluster = env.cluster
                result = await trio.to_thread.run_sync(
                    functools.partial(
                        cluster._run,
                        "pg_ctl",
                        "-D",
                        str(cluster.data),
                        "-l",
                        str(cluster.logfile),
                        "-m",
                        mode,
                        "-w",
                        "-t",
                        "60",
                        "restart",
                    )
                )
                if result.returncode != 0:
                    raise SystemExit(f"pg_ctl restart -m {mode} failed: {result.stderr}")
            await done_adding.wait()
        from kongtask.testing._postgres import wait_for_server

        await trio.to_thread.run_sync(wait_for_server, env.dsn, 60.0)  # after a crash
        async with open_db(env.dsn) as db:
            left = await drain(db, 180)
        alive = [w.returncode is None for w in workers]
        codes = [await env.stop(w) for w in workers]
        for w, code in zip(workers, codes, strict=True):
            if code != 0:
                print(env.log_tail(w))
        out = analyse("pg restart", added, Ledger.read(env.ledger_path), left, env.killed)
        out.extra.update(restarts="/".join(modes), workers_alive=all(alive), exit_codes=codes)
        if not all(alive) or any(codes):
            out.left = out.left or -1  # a crashed CLI fails the scenario
        return env.finish(out)


# --- scenario: cut connections through a TCP proxy ------------------------------------


async def scenario_cut(cuts: int, jobs: int) -> Outcome:
    """Two workers reach Postgres through a proxy that drops, stalls and refuses."""
    async with Env("cut") as env:
        added: set[int] = set()
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy(env.port)
            await nursery.start(proxy.serve)
            via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
            workers = [await env.start_worker(dsn=via_proxy, concurrency=4) for _ in range(2)]
            async with open_db(env.dsn) as db:
                done_adding = trio.Event()

                async def adder() -> None:
                    batch = 20
                    for start in range(0, jobs, batch):
                        numbers = list(range(start, min(start + batch, jobs)))
                        await add_with_retry(db, numbers)
                        added.update(numbers)
                        await trio.sleep(0.05)
                    done_adding.set()

                nursery.start_soon(adder)
                for w in workers:
                    if not await wait_for_start(env, w.pid, 60):
                        raise SystemExit(f"worker {w.pid} did not start:\n{env.log_tail(w)}")
                for _ in range(cuts):
                    await trio.sleep(random.uniform(0.5, 2.0))
                    fault = random.choice(["drop", "drop", "stall", "refuse"])
                    if fault == "drop":
                        proxy.drop_all()
                    elif fault == "stall":
                        await proxy.stall(random.uniform(0.5, 4.0))
                    else:
                        proxy.drop_all()
                        await proxy.refuse(random.uniform(0.5, 3.0))
                await done_adding.wait()
                left = await drain(db, 180)
            alive = [w.returncode is None for w in workers]
            codes = [await env.stop(w) for w in workers]
            nursery.cancel_scope.cancel()
        for w, code in zip(workers, codes, strict=True):
            if code != 0:
                print(env.log_tail(w))
        out = analyse("cut connection", added, Ledger.read(env.ledger_path), left, env.killed)
        out.extra.update(faults=dict(proxy.counts), workers_alive=all(alive), exit_codes=codes)
        if not all(alive) or any(codes):
            out.left = out.left or -1
        return env.finish(out)


# --- scenario: handler faults ---------------------------------------------------------


class _Garbage:
    """What a sloppy handler might return: not None, not a list, not JSON."""

    def __repr__(self) -> str:
        raise RuntimeError("even repr() fails")


async def _raise(job: Any, ctx: Any) -> None:
    raise ValueError("boom")


async def _raise_empty(job: Any, ctx: Any) -> None:
    raise RuntimeError()


async def _hang(job: Any, ctx: Any) -> None:
    await trio.sleep_forever()


async def _block_loop(job: Any, ctx: Any) -> None:
    time.sleep(1.0)  # noqa: ASYNC251  (the fault under test: it blocks the event loop)


def _block_thread(job: Any, ctx: Any) -> None:
    time.sleep(1.5)  # a plain function in its worker thread, past its 0.3 s timeout


async def _nursery_leak(job: Any, ctx: Any) -> None:
    async def fail(text: str) -> None:
        raise KeyError(text)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail, "first child")
        nursery.start_soon(fail, "second child")


async def _return_garbage(job: Any, ctx: Any) -> object:
    return _Garbage()


async def _batch_wrong_length(job: Any, ctx: Any) -> object:
    return [None]  # for a payload of three elements: counted as success (as upstream)


async def _batch_partial(job: Any, ctx: Any) -> object:
    return [None, ValueError("element two failed"), None]


async def _system_exit(job: Any, ctx: Any) -> None:
    raise SystemExit(3)  # a handler calling sys.exit(): must not take the pool down


async def _ok(job: Any, ctx: Any) -> None:
    return None


# name -> (handler, timeout, payload, expected final state, text expected in last_error)
FAULTS: dict[str, tuple[Any, float | None, object, str, str]] = {
    "raise": (_raise, None, {}, "failed", "boom"),
    "raise_empty": (_raise_empty, None, {}, "failed", "Non error or error without message"),
    "hang_past_timeout": (_hang, 0.3, {}, "failed", "timed out after 0.3 s"),
    "block_event_loop": (_block_loop, None, {}, "completed", ""),
    "block_thread_past_timeout": (_block_thread, 0.3, {}, "failed", "timed out after 0.3 s"),
    "nursery_leak": (_nursery_leak, None, {}, "failed", "child"),
    "return_garbage": (_return_garbage, None, {}, "completed", ""),
    "batch_wrong_length": (_batch_wrong_length, None, [1, 2, 3], "completed", ""),
    "batch_partial": (_batch_partial, None, [1, 2, 3], "failed", "Batch failures:"),
    "system_exit": (_system_exit, None, {}, "failed", ""),
}


async def scenario_faults() -> Outcome:
    """Faulty handlers in one pool: each job ends in the right state, the pool survives."""
    from kongtask import open_worker, task
    from kongtask._client import Client

    async with Env("faults") as env:
        tasks: dict[str, Any] = {
            name: task(handler, timeout=timeout)
            for name, (handler, timeout, _, _, _) in FAULTS.items()
        }
        tasks["ok"] = _ok
        async with open_db(env.dsn) as db:
            client = Client(db, "graphile_worker")
            ids: dict[str, int] = {}
            for name, (_, _, payload, _, _) in FAULTS.items():
                job = await client.add_job(name, payload, max_attempts=1)
                ids[name] = job.id
            survived = True
            try:
                async with open_worker(env.dsn, tasks, concurrency=4, poll_interval=0.2) as w:
                    with trio.fail_after(60):
                        while True:
                            n = await db.fetchval(
                                "select count(*) from graphile_worker._private_jobs "
                                "where locked_at is not null or attempts < max_attempts"
                            )
                            if n == 0:
                                break
                            await trio.sleep(0.1)
                    # The pool still runs an ordinary job afterwards.
                    ok = await w.add_job("ok", {})
                    ids["ok_afterwards"] = ok.id
                    with trio.fail_after(20):
                        while True:
                            if not await db.fetchval(
                                "select count(*) from graphile_worker._private_jobs where id = $1",
                                ok.id,
                            ):
                                break
                            await trio.sleep(0.05)
            except BaseException as exc:  # the pool must not die: report how it did
                survived = False
                print(f"  faults: the pool died: {exc!r}")
            rows = {
                r["id"]: r
                for r in await db.fetch(
                    "select id, attempts, max_attempts, last_error, locked_by, payload::text "
                    "from graphile_worker._private_jobs"
                )
            }
        wrong = 0
        for name, (_, _, _, expected, text) in [
            *FAULTS.items(),
            ("ok_afterwards", (None, None, None, "completed", "")),
        ]:
            if name not in ids:
                wrong += 1
                print(f"  faults: {name:<26} never added: the pool had died")
                continue
            row = rows.get(ids[name])
            if row is None:
                got, detail = "completed", ""
            elif row["locked_by"] is None and row["attempts"] >= row["max_attempts"]:
                got, detail = "failed", (row["last_error"] or "").split("\n")[0]
                if name == "batch_partial" and row["payload"] != "[2]":
                    got = f"failed with payload {row['payload']}"
            else:
                got, detail = "pending", repr(dict(row))
            last_error = (row["last_error"] if row is not None else None) or ""
            good = got == expected and (not text or text in last_error)
            wrong += not good
            print(f"  faults: {name:<26} {got:<10} {'ok' if good else 'WRONG'}  {detail[:70]}")
        out = Outcome("handler faults", len(ids), len(ids) - wrong, 0, Counter(), 0, 0)
        out.extra.update(wrong_state=wrong, pool_survived=survived)
        out.left = wrong + (not survived)
        return env.finish(out)


# --- scenario: soak -------------------------------------------------------------------

# --- scenario: poison jobs -------------------------------------------------------------

# kind -> how last_error must begin; async handlers take every kind, threads the first six
POISON_KINDS: dict[str, str] = {
    "asyncio_cancelled": "CancelledError: from asyncio code",
    "keyboard_interrupt": "KeyboardInterrupt: from the handler",
    "generator_exit": "GeneratorExit: from the handler",
    "user_base": "ChaosPoison: a user BaseException",
    "system_exit": "the handler raised SystemExit(3)",
    "base_group": "BaseExceptionGroup: mixed (2 sub-exceptions)",
    "stale_cancelled": "Cancelled",
    "nursery_child": "BaseExceptionGroup: ",
}
SYNC_POISON_KINDS = (
    "asyncio_cancelled",
    "keyboard_interrupt",
    "generator_exit",
    "user_base",
    "system_exit",
    "base_group",
)
#: Numbers of poison jobs start here (ordinary ``chaos`` jobs count from 0).
POISON_BASE = 10_000_000


async def scenario_poison(
    jobs: int, per_kind: int, restarts: int, max_attempts: int = 3
) -> Outcome:
    """Handlers that raise every kind of ``BaseException`` among ordinary jobs, while
    worker processes are stopped (SIGTERM) and killed (SIGKILL) and replaced."""
    from kongtask import JobSpec
    from kongtask._client import Client

    async with Env("poison") as env:
        poison: dict[int, tuple[str, str]] = {}  # number -> (task, kind)
        for task_name, kinds in (
            ("poison", list(POISON_KINDS)),
            ("poison_sync", SYNC_POISON_KINDS),
        ):
            for kind in kinds:
                for _ in range(per_kind):
                    poison[POISON_BASE + len(poison)] = (task_name, kind)
        workers = [await env.start_worker(concurrency=4) for _ in range(2)]
        exited_alone: list[tuple[int, int | None]] = []
        stops: Counter[str] = Counter()
        stop_codes: list[int] = []
        added: set[int] = set()
        async with open_db(env.dsn) as db:
            client = Client(db, "graphile_worker")
            async with trio.open_nursery() as nursery:
                done_adding = trio.Event()

                async def adder() -> None:
                    # ordinary jobs in batches, the poison jobs spread among them
                    pending = list(poison.items())
                    random.shuffle(pending)
                    batch = 50
                    batches = max(1, (jobs + batch - 1) // batch)
                    share = (len(pending) + batches - 1) // batches
                    for start in range(0, jobs, batch):
                        numbers = list(range(start, min(start + batch, jobs)))
                        await add_numbered(db, numbers)
                        added.update(numbers)
                        mine, pending[:share] = pending[:share], []
                        if mine:
                            await client.add_jobs(
                                [
                                    JobSpec(
                                        task_name,
                                        {"n": n, "kind": kind},
                                        job_key=f"p{n}",
                                        max_attempts=max_attempts,
                                    )
                                    for n, (task_name, kind) in mine
                                ]
                            )
                        await trio.sleep(0.05)
                    done_adding.set()

                nursery.start_soon(adder)
                for w in workers:
                    if not await wait_for_start(env, w.pid, 60):
                        raise SystemExit(f"worker {w.pid} did not start:\n{env.log_tail(w)}")
                for i in range(restarts):
                    await trio.sleep(random.uniform(1.0, 3.0))
                    for w in workers:
                        if w.returncode is not None:
                            exited_alone.append((w.pid, w.returncode))
                            print(env.log_tail(w))
                    index = i % len(workers)
                    if i % 2 == 0:
                        stops["sigterm"] += 1
                        stop_codes.append(await env.stop(workers[index]))
                    else:
                        stops["sigkill"] += 1
                        await env.kill(workers[index])
                    workers[index] = await env.start_worker(concurrency=4)
                await done_adding.wait()

            # done: no job still runnable (the poison jobs stay, permanently failed)
            left_numbers: set[int] = set()
            with trio.move_on_after(240):
                while True:
                    pending = await db.fetchval(
                        "select count(*) from graphile_worker._private_jobs "
                        "where attempts < max_attempts or locked_by is not null"
                    )
                    if pending == 0:
                        break
                    await trio.sleep(0.2)
            rows = await db.fetch(
                "select (payload->>'n')::int as n, attempts, max_attempts, locked_by, last_error "
                "from graphile_worker._private_jobs"
            )
        for w in workers:
            if w.returncode is not None:
                exited_alone.append((w.pid, w.returncode))
                print(env.log_tail(w))
        final_codes = [await env.stop(w) for w in workers]
        by_number = {r["n"]: r for r in rows}
        left_numbers = {n for n in by_number if n < POISON_BASE}
        ledger = Ledger.read(env.ledger_path)
        out = analyse("poison", added, ledger, left_numbers, env.killed)
        wrong: Counter[str] = Counter()
        for n, (task_name, kind) in poison.items():
            row = by_number.get(n)
            expected = POISON_KINDS[kind]
            if row is None:
                wrong[f"{task_name}/{kind}: gone"] += 1
            elif row["locked_by"] is not None or row["attempts"] != max_attempts:
                wrong[f"{task_name}/{kind}: not permanently failed"] += 1
            elif not (row["last_error"] or "").startswith(expected):
                wrong[f"{task_name}/{kind}: last_error {row['last_error'][:60]!r}"] += 1
        for what, count in sorted(wrong.items()):
            print(f"  poison: {count} x {what}")
        runs = sum(len(ledger.starts.get(n, [])) for n in poison)
        out.extra.update(
            poison_jobs=len(poison),
            poison_failed_permanently=len(poison) - sum(wrong.values()),
            poison_runs=runs,
            restarts=dict(stops),
            sigterm_exit_codes=stop_codes,
            exited_on_their_own=len(exited_alone),
            final_exit_codes=final_codes,
        )
        if wrong or exited_alone or any(stop_codes) or any(final_codes):
            out.left = out.left or -1  # fails the scenario
        return env.finish(out)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def scenario_soak(jobs: int, sample_every: float = 10.0) -> Outcome:
    """``jobs`` no-op jobs through one worker; its RSS sampled every ``sample_every`` s."""
    from kongtask import JobSpec
    from kongtask._client import Client

    async with Env("soak") as env:
        async with open_db(env.dsn) as db:
            client = Client(db, "graphile_worker")
            worker = await env.start_worker(concurrency=10)
            samples: list[tuple[float, int, int]] = []  # (t, done, rss KiB)
            # The first sample is taken once the worker runs jobs, not while it imports.
            await client.add_jobs([JobSpec("soak", {"n": -1})])
            if not await wait_for_start(env, worker.pid, 60):
                raise SystemExit(f"the soak worker did not start:\n{env.log_tail(worker)}")
            t0 = time.monotonic()
            done = 0
            added = 0

            ledger_offset = 0

            def count_done() -> int:
                # One ledger line per finished job: count the new lines since last time.
                nonlocal ledger_offset, done
                with env.ledger_path.open("rb") as f:
                    f.seek(ledger_offset)
                    chunk = f.read()
                cut = chunk.rfind(b"\n") + 1
                ledger_offset += cut
                done += chunk.count(b"\n", 0, cut)
                return done

            async def sampler() -> None:
                while True:
                    count_done()
                    samples.append((time.monotonic() - t0, done, rss_kib(worker.pid)))
                    t, d, r = samples[-1]
                    print(f"  soak t={t:6.0f}s done={d:>8} rss={r / 1024:7.1f} MiB", flush=True)
                    await trio.sleep(sample_every)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler)
                chunk = 10_000
                while added < jobs:
                    # Keep the backlog bounded so the table stays a realistic size.
                    if added - count_done() > 200_000:
                        await trio.sleep(0.5)
                        continue
                    numbers = range(added, min(added + chunk, jobs))
                    await client.add_jobs([JobSpec("soak", {"n": n}) for n in numbers])
                    added += len(numbers)
                left_numbers = await drain(db, 600)
                elapsed = time.monotonic() - t0
                samples.append((elapsed, count_done(), rss_kib(worker.pid)))
                nursery.cancel_scope.cancel()
            code = await env.stop(worker)
        # The ledger holds one E line per run: duplicates would show as repeated numbers.
        counts: Counter[int] = Counter()
        with env.ledger_path.open() as f:
            for line in f:
                counts[int(line.split()[1])] += 1
        completed = sum(1 for n in range(jobs) if counts[n])
        more = sum(1 for n in range(jobs) if counts[n] > 1)
        lost = sum(1 for n in range(jobs) if not counts[n] and n not in left_numbers)
        rss = [r for _, _, r in samples]
        after = [r for _, d, r in samples if d >= min(100_000, jobs // 10)]
        base = after[0] if after else rss[0]
        out = Outcome("soak", jobs, completed, more, Counter(), lost, len(left_numbers))
        out.extra.update(
            seconds=round(elapsed, 1),
            jobs_per_s=round(jobs / elapsed),
            rss_start_mib=round(rss[0] / 1024, 1),
            rss_end_mib=round(rss[-1] / 1024, 1),
            rss_max_mib=round(max(rss) / 1024, 1),
            rss_growth_after_100k_mib=round((max(after or rss) - base) / 1024, 1),
            samples=len(samples),
            exit=code,
        )
        if code != 0:
            print(env.log_tail(worker))
        return env.finish(out)


# --- main -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    sub = parser.add_subparsers(dest="scenario", required=True)
    kill = sub.add_parser("kill", help="kill -9 a worker mid-batch, N rounds")
    kill.add_argument("--rounds", type=int, default=100)
    kill.add_argument("--jobs-per-round", type=int, default=40)
    restart = sub.add_parser(
        "restart", help="pg_ctl restart -m fast / immediate, and a crashed backend"
    )
    restart.add_argument("--restarts", type=int, default=6)
    restart.add_argument("--jobs", type=int, default=3000)
    cut = sub.add_parser("cut", help="drop, stall and refuse connections (TCP proxy)")
    cut.add_argument("--cuts", type=int, default=20)
    cut.add_argument("--jobs", type=int, default=3000)
    sub.add_parser("faults", help="handlers that raise, hang, block, leak, return garbage")
    poison = sub.add_parser(
        "poison", help="handlers raising every kind of BaseException, with pool restarts"
    )
    poison.add_argument("--jobs", type=int, default=3000)
    poison.add_argument("--per-kind", type=int, default=5, help="poison jobs per kind")
    poison.add_argument("--restarts", type=int, default=6)
    poison.add_argument("--max-attempts", type=int, default=3)
    soak = sub.add_parser("soak", help="many jobs through one worker, RSS sampled")
    soak.add_argument("--jobs", type=int, default=1_000_000)
    soak.add_argument("--sample-every", type=float, default=10.0)
    sub.add_parser("all", help="every scenario, moderate sizes")
    return parser


async def run(args: argparse.Namespace) -> list[Outcome]:
    name = args.scenario
    if name == "kill":
        return [await scenario_kill(args.rounds, args.jobs_per_round)]
    if name == "restart":
        return [await scenario_restart(args.restarts, args.jobs)]
    if name == "cut":
        return [await scenario_cut(args.cuts, args.jobs)]
    if name == "faults":
        return [await scenario_faults()]
    if name == "soak":
        return [await scenario_soak(args.jobs, args.sample_every)]
    if name == "poison":
        return [await scenario_poison(args.jobs, args.per_kind, args.restarts, args.max_attempts)]
    outcomes = []
    scenarios: list[Callable[[], Awaitable[Outcome]]] = [
        functools.partial(scenario_kill, 30, 40),
        functools.partial(scenario_restart, 6, 3000),
        functools.partial(scenario_cut, 20, 3000),
        scenario_faults,
        functools.partial(scenario_poison, 3000, 5, 6),
        functools.partial(scenario_soak, 200_000),
    ]
    for scenario in scenarios:
        outcome = await scenario()
        print(outcome.line(), flush=True)
        outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    # asyncpg logs a full traceback each time its pool fails to reconnect, which is
    # what this script makes happen on purpose.
    logging.getLogger("asyncpg.pool").setLevel(logging.CRITICAL)
    seed = args.seed if args.seed is not None else int(time.time())
    random.seed(seed)
    print(f"chaos: scenario {args.scenario}, seed {seed}", flush=True)
    outcomes = trio.run(run, args)
    if args.scenario != "all":
        for outcome in outcomes:
            print(outcome.line(), flush=True)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
