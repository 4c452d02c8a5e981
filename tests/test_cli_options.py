"""``kongtask run`` options that had no test, each observed through a real process and
the database: --schema-only, --crontab (and the default ./crontab), --no-prepared-statements,
--forbidden-flags, --batch-size, -m/--max-pool-size; and ``kongtask --version``.

Rules: real processes and PostgreSQL; waits are polls under an absolute ``fail_after``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from test_cli_run import kongtask_argv
from test_worker import wait_until

from kongtask._liveness import is_marked_pool_id
from kongtask._pg import Database, open_database
from kongtask._version import __version__

S = "graphile_worker"
J = f"{S}._private_jobs"

TASKS = """
import trio

async def report(job, ctx):
    async def facts(conn):
        await conn.execute("select pg_sleep(0.2)")  # hold the connection a moment
        prepared = await conn.fetchval("select count(*) from pg_prepared_statements")
        pid = await conn.fetchval("select pg_backend_pid()")
        return prepared, pid
    prepared, pid = await ctx.with_connection(facts)
    print(f"ran {job.id} pool={ctx.pool_id} locked_at={job.locked_at.isoformat()} "
          f"prepared={prepared} backend={pid} flags={sorted(job.flags or [])}", flush=True)

tasks = {"report": report}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "report_tasks.py").write_text(TASKS)
    return tmp_path


async def run_once(project: Path, dsn: str, *options: str) -> list[dict[str, str]]:
    """``kongtask run --once`` with ``options``; one dict per job run (its printed facts)."""
    with trio.fail_after(60):
        proc = await trio.run_process(
            kongtask_argv("run", "-c", dsn, "--tasks", "report_tasks", "--once", *options),
            cwd=project,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    runs = []
    for line in proc.stdout.decode().splitlines():
        if line.startswith("ran "):
            runs.append(dict(part.split("=", 1) for part in line.split()[2:]))
    return runs


async def add(db: Database, count: int, flags: str = "null") -> None:
    for _ in range(count):
        await db.execute(f"select {S}.add_job('report', flags => {flags})")


async def test_version_prints_the_package_version() -> None:
    proc = await trio.run_process(kongtask_argv("--version"), capture_stdout=True)
    assert proc.stdout.decode().strip() == f"kongtask {__version__}"


async def test_schema_only_migrates_and_runs_nothing(
    kongtask_blank_dsn: str, project: Path
) -> None:
    with trio.fail_after(60):
        proc = await trio.run_process(
            # no --tasks: --schema-only needs none, as it starts no worker
            kongtask_argv("run", "-c", kongtask_blank_dsn, "--schema-only"),
            cwd=project,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    async with open_database(kongtask_blank_dsn) as db:
        assert await db.fetchval(f"select count(*) from {S}.migrations") > 0
        assert await db.fetchval(f"select count(*) from {J}") == 0


async def test_forbidden_flags_are_skipped(tdb: Database, worker_dsn: str, project: Path) -> None:
    await add(tdb, 1, "array['a']")
    await add(tdb, 1, "array['c']")
    await add(tdb, 1, "array['z']")
    await add(tdb, 1)
    runs = await run_once(project, worker_dsn, "--forbidden-flags", "a,b", "--forbidden-flags", "c")
    assert sorted(r["flags"] for r in runs) == ["['z']", "[]"]
    left = await tdb.fetch(f"select flags::text from {J} order by id")
    assert [r["flags"] for r in left] == ['{"a": true}', '{"c": true}']


async def test_batch_size_limits_each_claim(tdb: Database, worker_dsn: str, project: Path) -> None:
    await add(tdb, 4)
    runs = await run_once(project, worker_dsn, "-j", "4", "--batch-size", "1")
    assert len(runs) == 4
    # each claim statement stamps its own locked_at: four claims of one job each
    assert len({r["locked_at"] for r in runs}) == 4
    await add(tdb, 4)
    runs = await run_once(project, worker_dsn, "-j", "4")
    assert len({r["locked_at"] for r in runs}) < 4  # the default claims several at once


async def test_max_pool_size_bounds_the_handlers_connections(
    tdb: Database, worker_dsn: str, project: Path
) -> None:
    await add(tdb, 8)
    runs = await run_once(project, worker_dsn, "-j", "8", "-m", "2")
    assert len(runs) == 8
    assert len({r["backend"] for r in runs}) <= 2


async def test_no_prepared_statements(tdb: Database, worker_dsn: str, project: Path) -> None:
    await add(tdb, 1)
    (run,) = await run_once(project, worker_dsn, "--no-prepared-statements")
    assert run["prepared"] == "0"
    # pgBouncer mode: no session lock, so the pool id is not a marked (lock-holding) one
    assert not is_marked_pool_id(run["pool"])
    await add(tdb, 1)
    (run,) = await run_once(project, worker_dsn)
    assert is_marked_pool_id(run["pool"])


@pytest.mark.parametrize("where", ["--crontab", "./crontab"])
async def test_crontab_file_is_scheduled(
    tdb: Database, worker_dsn: str, project: Path, where: str
) -> None:
    options: list[str] = []
    if where == "--crontab":
        (project / "my.crontab").write_text("* * * * * report ?id=from_option\n")
        options = ["--crontab", "my.crontab"]
        identifier = "from_option"
    else:
        (project / "crontab").write_text("* * * * * report ?id=from_default\n")
        identifier = "from_default"
    proc = await trio.lowlevel.open_process(
        kongtask_argv("run", "-c", worker_dsn, "--tasks", "report_tasks", *options),
        cwd=project,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:

        async def registered() -> bool:
            return bool(
                await tdb.fetchval(
                    f"select count(*) from {S}._private_known_crontabs where identifier = $1",
                    identifier,
                )
            )

        await wait_until(registered, limit=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
