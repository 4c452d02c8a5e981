"""``kongtask run`` as a real process: tasks module and directory, --once, signals, exit 57.

Rules: real PostgreSQL; the processes are waited for under absolute ``fail_after`` limits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from test_worker import assert_clean, wait_until

from kongtask._cli_run import load_task_directory
from kongtask._pg import Database
from kongtask.testing import PostgresServer, run_sync_sql

S = "graphile_worker"
J = f"{S}._private_jobs"

TASKS_MODULE = """
import trio

async def hello(job, ctx):
    ctx.logger.info("start")
    await trio.sleep(0.02)
    if job.payload.get("fail"):
        raise RuntimeError("asked to fail")
    ctx.logger.info("end")

async def forever(job, ctx):
    ctx.logger.info("start")
    await ctx.with_connection(mark)
    await trio.sleep_forever()

async def mark(conn):
    await conn.execute("create table running_now(x int)")

tasks = {"hello": hello, "forever": forever}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "my_tasks.py").write_text(TASKS_MODULE)
    nested = tmp_path / "taskdir" / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "c.py").write_text(
        "import trio\nasync def task(job, ctx):\n    await trio.sleep(0.02)\n"
    )
    (tmp_path / "taskdir" / "top.py").write_text("def handler(job, ctx):\n    return None\n")
    (tmp_path / "taskdir" / "_helper.py").write_text("x = 1\n")
    return tmp_path


def kongtask_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "import kongtask._cli as c; c.run_cli()", *args]


def test_task_directory_identifiers(project: Path) -> None:
    tasks = load_task_directory(project / "taskdir")
    assert sorted(tasks) == ["a/b/c", "top"]


async def test_run_once_with_module_and_directory(
    tdb: Database, worker_dsn: str, project: Path
) -> None:
    await tdb.execute(f"select {S}.add_job('hello') from generate_series(1, 5)")
    await tdb.execute(f"select {S}.add_job('a/b/c')")
    await tdb.execute(f"select {S}.add_job('top')")
    await tdb.execute(f"select {S}.add_job('hello', '{{\"fail\": true}}')")
    with trio.fail_after(60):
        proc = await trio.run_process(
            kongtask_argv(
                "run",
                "-c",
                worker_dsn,
                "--tasks",
                "my_tasks",
                "--task-directory",
                "taskdir",
                "--once",
                "-j",
                "3",
            ),
            cwd=project,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "completed hello" in err  # one log line per state change
    assert "failed (attempt 1 of 25" in err
    rows = await tdb.fetch(f"select last_error, attempts from {J}")
    assert len(rows) == 1
    assert rows[0]["last_error"].startswith("asked to fail")
    await assert_clean(tdb)


async def _run_until_job_runs(
    worker_dsn: str, project: Path, tdb: Database, grace: str = "0.5"
) -> trio.Process:
    await tdb.execute(f"select {S}.add_job('forever')")
    proc = await trio.lowlevel.open_process(
        kongtask_argv("run", "-c", worker_dsn, "--tasks", "my_tasks:tasks", "--grace", grace),
        cwd=project,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    async def running() -> bool:
        return bool(await tdb.fetchval("select to_regclass('running_now') is not null"))

    await wait_until(running, limit=30)
    return proc


async def test_sigterm_stops_gracefully_and_fails_the_running_job(
    tdb: Database, worker_dsn: str, project: Path
) -> None:
    proc = await _run_until_job_runs(worker_dsn, project, tdb)
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        code = await proc.wait()
    assert code == 0
    row = await tdb.fetchrow(f"select attempts, last_error, locked_by from {J}")
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (1, None)
    assert row["last_error"] == "Worker pool is shutting down gracefully"
    await assert_clean(tdb)


async def test_breaking_migration_exits_57(tdb: Database, worker_dsn: str, project: Path) -> None:
    proc = await _run_until_job_runs(worker_dsn, project, tdb)
    await tdb.execute(
        """select pg_notify('worker:migrate', '{"migrationNumber":21,"breaking":true}')"""
    )
    with trio.fail_after(20):
        code = await proc.wait()
    assert code == 57
    await assert_clean(tdb)


async def test_demo_runs_and_cleans_up(kongtask_server: PostgresServer) -> None:
    env = {**os.environ, "KONGTASK_TEST_DSN": kongtask_server.dsn}
    with trio.fail_after(60):
        proc = await trio.run_process(
            kongtask_argv("demo", "--jobs-count", "40"),
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "completed:          39 of 40" in out
    assert "broken (attempts 1/1)" in out
    left = await trio.to_thread.run_sync(
        run_sync_sql,
        kongtask_server.dsn,
        "select count(*) from pg_database where datname like 'kongtask_demo_%'",
    )
    assert left[0][0]["count"] == 0  # type: ignore[index]


async def test_second_signal_stops_at_once(tdb: Database, worker_dsn: str, project: Path) -> None:
    proc = await _run_until_job_runs(worker_dsn, project, tdb, grace="60")
    proc.send_signal(signal.SIGINT)
    with trio.move_on_after(0.5):  # still within the 60 s grace: it keeps running
        await proc.wait()
    assert proc.returncode is None
    proc.send_signal(signal.SIGINT)
    with trio.fail_after(10):
        code = await proc.wait()
    assert code == 0
    row = await tdb.fetchrow(f"select attempts, last_error, locked_by from {J}")
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (1, None)
    assert row["last_error"] == "Worker pool is shutting down gracefully"
    await assert_clean(tdb)
