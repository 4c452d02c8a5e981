"""``kongtask run --processes N``: a supervisor of real worker processes.

Rules: real PostgreSQL, real child processes and real signals; every wait is bounded by
``fail_after``; the backoff schedule is checked on trio's MockClock.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from test_worker import assert_clean, wait_until

from kongtask._fleet import Fleet, FleetStatistics, combine_exit_codes
from kongtask._pg import Database

S = "graphile_worker"
J = f"{S}._private_jobs"

TASKS_MODULE = """
import os
import trio

async def where(job, ctx):
    pid = os.getpid()

    async def record(conn):
        await conn.execute("insert into fleet_pids values ($1)", pid)

    async def processes(conn):
        return await conn.fetchval("select count(distinct pid) from fleet_pids")

    await ctx.with_connection(record)
    # hold this process's only slot until another process has run a job too
    with trio.fail_after(60):
        while await ctx.with_connection(processes) < 2:
            await trio.sleep(0.02)

tasks = {"where": where}
"""


@pytest.fixture
async def fleet_db(tdb: Database) -> Database:
    """``tdb`` with the table the fleet's handlers write their process ids to."""
    await tdb.execute("create table fleet_pids(pid int)")
    return tdb


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "fleet_tasks.py").write_text(TASKS_MODULE)
    return tmp_path


class Supervisor:
    """A ``kongtask run --processes N`` process whose stderr is read as it comes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stderr = ""

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            self.stderr += chunk.decode(errors="replace")

    def started_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"process \d+ started \(pid (\d+)\)", self.stderr)]


async def start_fleet(
    nursery: trio.Nursery,
    dsn: str,
    project: Path,
    *extra: str,
    processes: int = 2,
    env: dict[str, str] | None = None,
) -> Supervisor:
    argv = [sys.executable, "-m", "kongtask", "run", "-c", dsn, "--tasks", "fleet_tasks"]
    argv += ["-j", "1", "--batch-size", "1", *extra]
    if env is None:
        argv += ["--processes", str(processes)]
    proc = await trio.lowlevel.open_process(
        argv,
        cwd=project,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    supervisor = Supervisor(proc)
    nursery.start_soon(supervisor.read_stderr)
    return supervisor


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_processes_share_the_queue_restart_after_a_crash_and_stop_on_sigterm(
    fleet_db: Database, worker_dsn: str, project: Path
) -> None:
    await fleet_db.execute(f"select {S}.add_job('where') from generate_series(1, 2)")
    async with trio.open_nursery() as nursery:
        fleet = await start_fleet(nursery, worker_dsn, project)
        # each child holds its only slot until the other ran a job: both must be working
        await wait_until(lambda: fleet_db.fetchval(f"select count(*) = 0 from {J}"), limit=60)
        job_pids = {r["pid"] for r in await fleet_db.fetch("select pid from fleet_pids")}
        assert len(job_pids) == 2
        assert fleet.proc.pid not in job_pids
        assert job_pids == set(fleet.started_pids())

        crashed = sorted(job_pids)[0]
        os.kill(crashed, signal.SIGKILL)
        await wait_until(lambda: len(fleet.started_pids()) == 3, limit=60)
        replacement = fleet.started_pids()[2]
        assert replacement not in job_pids
        assert "exited with status -9; restarting it" in fleet.stderr
        # the replacement is a working member of the pool
        await fleet_db.execute("truncate fleet_pids")
        await fleet_db.execute(f"select {S}.add_job('where') from generate_series(1, 2)")
        await wait_until(lambda: fleet_db.fetchval(f"select count(*) = 0 from {J}"), limit=60)
        pids_now = {r["pid"] for r in await fleet_db.fetch("select pid from fleet_pids")}
        assert replacement in pids_now

        fleet.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            code = await fleet.proc.wait()
        assert code == 0, fleet.stderr
        survivors = [pid for pid in fleet.started_pids() if alive(pid)]
        assert survivors == []
    await assert_clean(fleet_db)


async def test_a_breaking_migration_stops_every_process_and_exits_57(
    fleet_db: Database, worker_dsn: str, project: Path
) -> None:
    await fleet_db.execute(f"select {S}.add_job('where') from generate_series(1, 2)")
    async with trio.open_nursery() as nursery:
        fleet = await start_fleet(nursery, worker_dsn, project)
        await wait_until(lambda: fleet_db.fetchval(f"select count(*) = 0 from {J}"), limit=60)
        await fleet_db.execute(
            """select pg_notify('worker:migrate', '{"migrationNumber":21,"breaking":true}')"""
        )
        with trio.fail_after(30):
            code = await fleet.proc.wait()
        assert code == 57, fleet.stderr
        assert [pid for pid in fleet.started_pids() if alive(pid)] == []
        assert len(fleet.started_pids()) == 2  # not restarted
    await assert_clean(fleet_db)


async def test_once_fleet_from_the_environment_exits_0_when_the_queue_is_empty(
    fleet_db: Database, worker_dsn: str, project: Path
) -> None:
    await fleet_db.execute(f"select {S}.add_job('where') from generate_series(1, 2)")
    async with trio.open_nursery() as nursery:
        # KONGTASK_PROCESSES reaches the children too: their --processes 1 must win
        env = {"KONGTASK_PROCESSES": "2"}
        fleet = await start_fleet(nursery, worker_dsn, project, "--once", env=env)
        with trio.fail_after(60):
            code = await fleet.proc.wait()
        assert code == 0, fleet.stderr
        assert len(fleet.started_pids()) == 2
    assert await fleet_db.fetchval(f"select count(*) from {J}") == 0
    await assert_clean(fleet_db)


class RecordingFleet(Fleet):
    """Records on the (mock) clock when each child starts and exits."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.events: list[tuple[str, float]] = []
        self.five_started = trio.Event()

    async def _run_child(self, slot: int) -> int:
        self.events.append(("start", trio.current_time()))
        if sum(1 for kind, _ in self.events if kind == "start") == 5:
            self.five_started.set()
        code = await super()._run_child(slot)
        self.events.append(("exit", trio.current_time()))
        return code


async def test_a_crash_loop_backs_off_exponentially_up_to_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    fleet = RecordingFleet(crash, 1, initial_backoff=1.0, max_backoff=4.0, healthy_after=1e9)
    async with trio.open_nursery() as nursery:
        result: list[int] = []

        async def run() -> None:
            result.append(await fleet.run())

        nursery.start_soon(run)
        # no fail_after here: the mock clock would jump to its deadline while a real
        # child runs; each child exits at once, so five starts come after four delays
        await fleet.five_started.wait()
        fleet.stop_nowait()
    starts = [t for kind, t in fleet.events if kind == "start"]
    exits = [t for kind, t in fleet.events if kind == "exit"]
    gaps = [round(start - exit, 6) for exit, start in zip(exits, starts[1:], strict=False)]
    assert gaps == [1.0, 2.0, 4.0, 4.0]
    assert fleet.statistics().restarts == 4
    # the fifth child was asked to stop before it could crash: a clean stop
    assert result == [0]


async def test_a_child_that_ran_healthy_after_restarts_from_the_first_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    # every run counts as healthy (healthy_after=0): no crash loop, no doubling
    fleet = RecordingFleet(crash, 1, initial_backoff=1.0, max_backoff=4.0, healthy_after=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.run)
        await fleet.five_started.wait()
        fleet.stop_nowait()
    starts = [t for kind, t in fleet.events if kind == "start"]
    exits = [t for kind, t in fleet.events if kind == "exit"]
    gaps = [round(start - exit, 6) for exit, start in zip(exits, starts[1:], strict=False)]
    assert gaps == [1.0, 1.0, 1.0, 1.0]


def test_exit_status_rules() -> None:
    assert combine_exit_codes([0, 0], stop_requested=True) == 0
    assert combine_exit_codes([0, -signal.SIGTERM], stop_requested=True) == 0
    assert combine_exit_codes([0, -signal.SIGTERM], stop_requested=False) == 128 + 15
    assert combine_exit_codes([1, 57], stop_requested=True) == 57
    assert combine_exit_codes([0, 2], stop_requested=True) == 2


async def test_one_child_exiting_57_stops_the_others() -> None:
    # child 0 reports a breaking migration; child 1 would run for ten minutes
    script = (
        "import os, sys, time\n"
        "if os.environ['KONGTASK_FLEET_PROCESS'] == '0':\n"
        "    sys.exit(57)\n"
        "time.sleep(600)\n"
    )
    fleet = Fleet([sys.executable, "-c", script], 2)
    with trio.fail_after(30):
        code = await fleet.run()
    assert code == 57
    assert fleet.statistics() == FleetStatistics(started=2, restarts=0, running=0)
