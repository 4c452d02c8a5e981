"""What every producer shares: no trio at run time, drivers imported only when used, and
the connection types they refuse (the per-driver behaviour: test_producers_<driver>.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trio

import kongtask
import kongtask.aio
from kongtask import ConfigError, JobSpec
from kongtask._pg import open_database

SCRIPT = textwrap.dedent(
    """\
    import asyncio, json, sys
    import asyncpg, psycopg
    import kongtask, kongtask.aio

    dsn = sys.argv[1]
    with psycopg.connect(dsn) as conn:  # the context manager commits
        kongtask.add_job_sync(conn, "sync_job", {"n": 1})
        kongtask.add_jobs_sync(conn, [kongtask.JobSpec("sync_job", 2)])

    async def main():
        conn = await asyncpg.connect(dsn)
        async with conn.transaction():
            await kongtask.aio.add_job(conn, "asyncio_job", {"n": 3})
        await conn.close()

    asyncio.run(main())
    watched = ["trio", "trio_asyncio", "sqlalchemy", "django", "psycopg2"]
    print(json.dumps([name for name in watched if name in sys.modules]))
    """
)


async def test_producers_need_no_trio_and_load_no_other_driver(kongtask_dsn: str) -> None:
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", SCRIPT, kongtask_dsn],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == []
    async with open_database(kongtask_dsn) as db:
        rows = await db.fetch(
            "select t.identifier, j.payload::text from graphile_worker._private_jobs j "
            "join graphile_worker._private_tasks t on t.id = j.task_id order by j.id"
        )
    assert [tuple(row) for row in rows] == [
        ("sync_job", '{"n":1}'),
        ("sync_job", "2"),
        ("asyncio_job", '{"n":3}'),
    ]


async def test_import_kongtask_loads_no_driver_and_no_trio() -> None:
    code = (
        "import sys, kongtask, kongtask.aio\n"
        "watched = ['trio', 'trio_asyncio', 'psycopg', 'psycopg2', 'sqlalchemy', 'django']\n"
        "print([name for name in watched if name in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, env=env, check=True
        )
    assert done.stdout.decode().strip() == "[]"


def test_unsupported_connections_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ConfigError, match=r"add_job_sync cannot use a builtins\.object"):
        kongtask.add_job_sync(object(), "t")
    with pytest.raises(ConfigError, match=r"add_job_sync cannot use a builtins\.str"):
        kongtask.add_jobs_sync("postgresql:///db", [JobSpec("t")])


async def test_connections_of_the_other_flavour_are_refused(kongtask_dsn: str) -> None:
    async def asyncpg_to_sync() -> None:
        conn = await asyncpg.connect(kongtask_dsn)
        try:
            with pytest.raises(ConfigError, match=r"asyncio connections go to kongtask\.aio"):
                kongtask.add_job_sync(conn, "t")
        finally:
            await conn.close()

    async def psycopg_to_asyncio() -> None:
        with (
            psycopg.connect(kongtask_dsn) as conn,
            pytest.raises(ConfigError, match="sync connections go to add_job_sync"),
        ):
            await kongtask.aio.add_job(conn, "t")

    # on plain asyncio loops, in a thread
    await trio.to_thread.run_sync(asyncio.run, asyncpg_to_sync())
    await trio.to_thread.run_sync(asyncio.run, psycopg_to_asyncio())


def test_a_job_spec_comes_alone() -> None:
    with pytest.raises(ConfigError, match="either a JobSpec or an identifier with options"):
        kongtask.add_job_sync(object(), JobSpec("t"), queue_name="q")  # type: ignore[call-overload]
