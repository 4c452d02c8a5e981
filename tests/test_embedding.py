"""kongtask inside an application: open_worker installs the schema and handles stop
signals, ``trio.run(kongtask.main)`` is the whole command, ``kongtask.migrate`` is public.

Rules: a real PostgreSQL; signals go to real child processes; waits are bounded by
``trio.fail_after`` and follow what the child prints, never a sleep.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

import kongtask
from kongtask._migrate import latest_known_migration
from kongtask._pg import Database, open_database

S = "graphile_worker"
J = f"{S}.jobs"  # the view: it names the task

# A program that embeds a pool the way the README does. `slow` jobs either finish soon
# after the pool starts stopping (the work a graceful shutdown waits for) or never.
EMBEDDED_PROGRAM = """
import sys
import trio
import kongtask

dsn, grace = sys.argv[1], float(sys.argv[2])
pools = []

async def slow(job, ctx):
    print("RUNNING", job.id, flush=True)
    if job.payload.get("finish_when_stopping"):
        while not pools[0].stopping:
            await trio.sleep(0.01)
        await trio.sleep(0.1)  # the rest of its work, inside the grace period
        print("FINISHED", job.id, flush=True)
    else:
        await trio.sleep_forever()

async def other(job, ctx):
    print("OTHER RAN", job.id, flush=True)

async def main():
    async with kongtask.open_worker(dsn, {"slow": slow, "other": other}, grace=grace) as w:
        pools.append(w)
        print("READY", flush=True)
        await trio.sleep_forever()
    print("BLOCK ENDED", flush=True)

trio.run(main)
"""


async def _rows(db: Database) -> dict[int, tuple[str, int, str | None, str | None]]:
    rows = await db.fetch(f"select id, task_identifier, attempts, locked_by, last_error from {J}")
    return {
        r["id"]: (r["task_identifier"], r["attempts"], r["locked_by"], r["last_error"])
        for r in rows
    }


class Child:
    """A child process whose stdout (as lines) and stderr are read as they come."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self._err = b""
        self._closed = 0  # streams read to their end
        self._news = trio.Event()

    @property
    def err(self) -> str:
        return self._err.decode(errors="replace")

    def _tell(self) -> None:
        self._news.set()
        self._news = trio.Event()

    async def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buffer = b""
        async for chunk in self.proc.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.out.extend(line.decode(errors="replace") for line in lines)
            self._tell()
        self._closed += 1
        self._tell()

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            self._err += chunk
            self._tell()
        self._closed += 1
        self._tell()

    async def wait_for(self, text: str, *, in_stderr: bool = False) -> None:
        while not (text in self.err if in_stderr else any(text in line for line in self.out)):
            if self._closed == 2:
                pytest.fail(f"the child ended before {text!r}: {self.out} {self.err}")
            await self._news.wait()


@asynccontextmanager
async def open_child(tmp_path: Path, source: str, *args: str) -> AsyncIterator[Child]:
    """Run the Python program ``source``; a child still running at the end is killed."""
    program = tmp_path / "program.py"
    program.write_text(source)
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(program), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    child = Child(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child.read_stdout)
            nursery.start_soon(child.read_stderr)
            yield child
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


# --- signals ---------------------------------------------------------------------------


async def _add(db: Database, task: str, payload: str = "{}", priority: int = 0) -> int:
    job_id: int = await db.fetchval(
        f"select id from {S}.add_job($1, $2::json, priority => $3)", task, payload, priority
    )
    return job_id


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_lets_the_running_job_finish_and_returns_the_rest(
    kongtask_blank_dsn: str, tmp_path: Path, signum: signal.Signals
) -> None:
    with trio.fail_after(90):
        # a blank database: the embedded pool installs the schema itself
        async with open_child(tmp_path, EMBEDDED_PROGRAM, kongtask_blank_dsn, "60") as child:
            await child.wait_for("READY")
            async with open_database(kongtask_blank_dsn) as db:
                slow = await _add(db, "slow", '{"finish_when_stopping": true}', priority=-1)
                others = [await _add(db, "other") for _ in range(3)]
                await child.wait_for(f"RUNNING {slow}")
                child.proc.send_signal(signum)
                code = await child.proc.wait()
                rows = await _rows(db)
    assert code == 0, child.err
    assert "Traceback" not in child.err
    assert f"{signum.name}: stopping gracefully" in child.err
    # the running job finished within the grace period, and the block ended
    assert child.out[-2:] == [f"FINISHED {slow}", "BLOCK ENDED"]
    assert slow not in rows
    # nothing else started; every other job is back, unlocked, its attempt given back
    assert not [line for line in child.out if line.startswith("OTHER RAN")]
    assert rows == {job_id: ("other", 0, None, None) for job_id in others}


async def test_a_second_signal_cancels_the_running_job_at_once(
    kongtask_blank_dsn: str, tmp_path: Path
) -> None:
    with trio.fail_after(90):  # far less than the 600 s grace the first signal gives
        async with open_child(tmp_path, EMBEDDED_PROGRAM, kongtask_blank_dsn, "600") as child:
            await child.wait_for("READY")
            async with open_database(kongtask_blank_dsn) as db:
                forever = await _add(db, "slow")
                await child.wait_for(f"RUNNING {forever}")
                child.proc.send_signal(signal.SIGINT)
                await child.wait_for("SIGINT: stopping gracefully", in_stderr=True)
                child.proc.send_signal(signal.SIGTERM)
                code = await child.proc.wait()
                rows = await _rows(db)
    assert code == 0, child.err
    assert "SIGTERM: stopping at once" in child.err
    assert "Traceback" not in child.err
    assert child.out[-1] == "BLOCK ENDED"
    # cancelled, failed with the shutdown message (it retries later), unlocked
    assert rows == {forever: ("slow", 1, None, "Worker pool is shutting down gracefully")}


async def test_handle_signals_false_leaves_signals_to_the_application(
    kongtask_dsn: str,
) -> None:
    async def noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        pass

    before = signal.getsignal(signal.SIGTERM)
    async with kongtask.open_worker(kongtask_dsn, {"t": noop}, handle_signals=False):
        assert signal.getsignal(signal.SIGTERM) is before
        async with kongtask.open_worker(kongtask_dsn, {"t": noop}) as inner:
            assert signal.getsignal(signal.SIGTERM) is not before
        assert signal.getsignal(signal.SIGTERM) is before
    assert inner.statistics().completed == 0


async def test_overlapping_pools_keep_signals_until_the_last_one_stops(
    kongtask_dsn: str,
) -> None:
    # pools that start and stop in any order: one handler, put back after the last
    async def noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        pass

    before = signal.getsignal(signal.SIGINT)
    started = [trio.Event(), trio.Event()]
    leave = [trio.Event(), trio.Event()]
    left = [trio.Event(), trio.Event()]

    async def pool(n: int) -> None:
        async with kongtask.open_worker(kongtask_dsn, {"t": noop}):
            started[n].set()
            await leave[n].wait()
        left[n].set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool, 0)
            await started[0].wait()
            nursery.start_soon(pool, 1)
            await started[1].wait()
            handler = signal.getsignal(signal.SIGINT)
            assert handler is not before
            leave[0].set()  # the first pool stops first
            await left[0].wait()
            assert signal.getsignal(signal.SIGINT) is handler  # the second still listens
            leave[1].set()
    assert signal.getsignal(signal.SIGINT) is before


# --- open_worker installs the schema; kongtask.migrate; JobCancelled ------------------------


async def test_pools_starting_together_install_the_schema_once(kongtask_blank_dsn: str) -> None:
    ran = trio.Event()

    async def hello(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.set()

    ready = 0
    all_ready = trio.Event()

    async def pool() -> None:
        nonlocal ready
        async with kongtask.open_worker(kongtask_blank_dsn, {"hello": hello}) as worker:
            ready += 1
            if ready == 3:
                all_ready.set()
            await all_ready.wait()
            await ran.wait()
            assert worker.exit_code is None

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(pool)
            await all_ready.wait()
            await kongtask.add_job("hello", dsn=kongtask_blank_dsn)
    async with open_database(kongtask_blank_dsn) as db:
        ids = [r["id"] for r in await db.fetch(f"select id from {S}.migrations order by id")]
        assert ids == list(range(1, latest_known_migration() + 1))
        assert await db.fetchval(f"select count(*) from {J}") == 0


async def test_migrate_is_public_and_idempotent(kongtask_blank_dsn: str) -> None:
    await kongtask.migrate(kongtask_blank_dsn, schema="app_jobs")
    await kongtask.migrate(kongtask_blank_dsn, schema="app_jobs")  # nothing to do
    async with open_database(kongtask_blank_dsn) as db:
        count = await db.fetchval("select count(*) from app_jobs.migrations")
        assert count == latest_known_migration()
        await db.execute("insert into app_jobs.migrations (id, breaking) values (999, true)")
    with pytest.raises(kongtask.SchemaTooNewError, match="breaking migration 999"):
        await kongtask.migrate(kongtask_blank_dsn, schema="app_jobs")


async def test_job_cancelled_is_public_and_is_the_error_of_a_cancelled_job(
    kongtask_dsn: str,
) -> None:
    errors: list[object] = []
    failed = trio.Event()

    async def cancels_itself(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ctx.cancel_scope.cancel()
        await trio.sleep_forever()

    def on_event(event: kongtask.Event) -> None:
        if event.name == "job:error":
            errors.append(event["error"])
            failed.set()

    with trio.fail_after(30):
        async with kongtask.open_worker(
            kongtask_dsn, {"c": cancels_itself}, on_event=on_event
        ) as worker:
            await worker.add_job("c")
            await failed.wait()
    [error] = errors
    assert isinstance(error, kongtask.JobCancelled)
    assert str(error) == "Job was cancelled"


# --- trio.run(kongtask.main) is the command ------------------------------------------------

AS_LIBRARY = [sys.executable, "-c", "import trio, kongtask; trio.run(kongtask.main)"]
AS_COMMAND = [sys.executable, "-c", "import kongtask._cli as c; c.run_cli()"]


def _without_timestamps(text: str) -> list[str]:
    # "2026-01-02 03:04:05,678 INFO ...": the first two words differ between runs
    return [line.split(" ", 2)[-1] if line[:2] == "20" else line for line in text.splitlines()]


@pytest.mark.parametrize(
    ("case", "status"),
    [("migrate", 0), ("unreachable", 1), ("usage", 2), ("no verb", 2), ("too new", 57)],
)
async def test_trio_run_main_exits_as_the_command_does(
    kongtask_database_factory: Callable[..., str], case: str, status: int
) -> None:
    async def database(*, migrated: bool) -> str:
        make = partial(kongtask_database_factory, migrated=migrated)
        return await trio.to_thread.run_sync(make)

    async def argv() -> list[str]:
        if case == "migrate":
            return ["migrate", "-c", await database(migrated=False)]
        if case == "unreachable":
            return ["add", "-c", "postgresql://postgres@127.0.0.1:1/x", "t"]
        if case == "usage":
            return ["unlock"]
        if case == "no verb":
            return []
        dsn = await database(migrated=True)
        async with open_database(dsn) as db:
            await db.execute(f"insert into {S}.migrations (id, breaking) values (21, true)")
        return ["migrate", "-c", dsn]

    results = []
    for program in (AS_LIBRARY, AS_COMMAND):
        with trio.fail_after(60):
            proc = await trio.run_process(
                [*program, *await argv()], capture_stdout=True, capture_stderr=True, check=False
            )
        results.append((proc.returncode, proc.stdout.decode(), proc.stderr.decode()))
    (code, out, err), command = results
    assert code == status, err
    assert (code, out, _without_timestamps(err)) == (
        command[0],
        command[1],
        _without_timestamps(command[2]),
    )
    assert "Traceback" not in err
    if case == "migrate":
        assert out == "Schema 'graphile_worker' is up to date\n"
        assert "INFO kongtask.migrate: applied migration 000001" in err


HOST_LOGGING = """
import logging, sys, trio, kongtask
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("HOST %(name)s: %(message)s"))
logging.getLogger("kongtask").addHandler(handler)
logging.getLogger("kongtask").setLevel(logging.INFO)
trio.run(kongtask.main)
"""


async def test_main_leaves_the_hosts_logging_alone(kongtask_blank_dsn: str) -> None:
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-c", HOST_LOGGING, "migrate", "-c", kongtask_blank_dsn],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "HOST kongtask.migrate: applied migration 000001" in out
    assert err == ""  # no handler of kongtask's own besides the host's


def _docs_signal_recipe() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "worker.md").read_text()
    section = text[text.index("## Signals") : text.index("## Logging")]
    return section[section.index("```python\n") + 10 : section.index("```\n", 1)]


RECIPE_SETUP = """
import functools
import sys
import trio
import kongtask

dsn = sys.argv[1]
# a grace far longer than the test, so only the second signal can end the running job
kongtask.open_worker = functools.partial(kongtask.open_worker, grace=600)

async def slow(job, ctx):
    print("RUNNING", job.id, flush=True)
    await trio.sleep_forever()

tasks = {"slow": slow}
"""


async def test_the_docs_recipe_for_applications_that_own_signals(
    kongtask_dsn: str, tmp_path: Path
) -> None:
    source = RECIPE_SETUP + _docs_signal_recipe() + "\ntrio.run(main)\n"
    async with open_database(kongtask_dsn) as db:
        forever = await _add(db, "slow")
        with trio.fail_after(60):
            async with open_child(tmp_path, source, kongtask_dsn) as child:
                await child.wait_for(f"RUNNING {forever}")
                child.proc.send_signal(signal.SIGTERM)  # graceful: the job keeps running
                await child.wait_for("shutting down (grace", in_stderr=True)
                child.proc.send_signal(signal.SIGTERM)  # at once
                code = await child.proc.wait()
        rows = await _rows(db)
    assert code == 0, child.err
    assert "Traceback" not in child.err
    assert "forceful shutdown" in child.err
    assert rows == {forever: ("slow", 1, None, "Worker pool is shutting down gracefully")}


# --- logging and threads ---------------------------------------------------------------


async def _noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    pass


async def test_a_configured_program_keeps_its_logging(kongtask_dsn: str) -> None:
    # pytest's handlers on the root logger are a configuration kongtask must leave alone
    assert logging.getLogger().handlers
    kongtask_logger = logging.getLogger("kongtask")
    before = (list(kongtask_logger.handlers), kongtask_logger.level)
    async with kongtask.open_worker(kongtask_dsn, {"t": _noop}):
        assert (list(kongtask_logger.handlers), kongtask_logger.level) == before


UNCONFIGURED = """
import logging, sys, trio, kongtask

def state(logger=logging.getLogger("kongtask")):
    return len(logger.handlers), logging.getLevelName(logger.level)

async def main():
    async with kongtask.open_worker(sys.argv[1], {"t": lambda job, ctx: None}):
        async with kongtask.open_worker(sys.argv[1], {"t": lambda job, ctx: None}):
            print("two pools", *state(), flush=True)
        print("one pool", *state(), flush=True)
    print("after", *state(), flush=True)
    logging.getLogger("kongtask").info("not shown: no pool runs")

trio.run(main)
"""


async def test_the_fallback_handler_lives_as_long_as_the_pools(kongtask_dsn: str) -> None:
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-c", UNCONFIGURED, kongtask_dsn],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.decode().splitlines() == [
        "two pools 1 INFO",  # one handler for both pools
        "one pool 1 INFO",
        "after 0 NOTSET",
    ]
    assert "not shown" not in err


async def test_a_pool_outside_the_main_thread_leaves_signals_alone(kongtask_dsn: str) -> None:
    main_handler = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    async def in_thread() -> None:
        async with kongtask.open_worker(kongtask_dsn, {"t": _noop}):
            seen.append(signal.getsignal(signal.SIGTERM))

    with trio.fail_after(60):
        await trio.to_thread.run_sync(trio.run, in_thread)
    assert seen == [main_handler]
