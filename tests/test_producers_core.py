"""What every producer shares: no trio at run time, drivers imported only when used, and
the connection types they refuse (the per-driver behaviour: test_producers_<driver>.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import trio

import kongtask
import kongtask.aio
from kongtask import ConfigError, JobSpec
from kongtask._enqueue import ParamStyle, queries
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


async def test_the_producers_retry_graphile_worker_580_as_the_client_does(
    kongtask_dsn: str,
) -> None:
    """The "flaky" schema of test_client.py drops keyed jobs as #580 does, for the first
    ``drop_first`` calls; the producers' plans retry exactly as the client."""
    from test_client import FLAKY

    from kongtask import KongtaskError
    from kongtask._enqueue import ADD_ATTEMPTS

    def run() -> list[tuple[Any, int]]:
        out: list[tuple[Any, int]] = []
        with psycopg.connect(kongtask_dsn, autocommit=True) as conn:
            conn.execute(FLAKY)

            def calls_after(drop_first: int, drop_unkeyed: bool, add: Any) -> tuple[Any, int]:
                conn.execute("truncate flaky.settings")
                conn.execute(
                    "insert into flaky.settings values (%s, %s)", (drop_first, drop_unkeyed)
                )
                conn.execute("select setval('flaky.calls', 1, false)")
                try:
                    result = add()
                except KongtaskError as exc:
                    result = exc
                calls = conn.execute("select last_value from flaky.calls").fetchone()
                assert calls is not None
                return result, calls[0]

            def one() -> Any:
                return kongtask.add_job_sync(conn, "t", {"v": 1}, job_key="k", schema="flaky")

            def batch() -> Any:
                specs = [
                    JobSpec("t", 1),
                    JobSpec("t", 2, job_key="a"),
                    JobSpec("t", 3, job_key="b"),
                ]
                return kongtask.add_jobs_sync(conn, specs, schema="flaky")

            out.append(calls_after(2, False, one))
            out.append(calls_after(1000, False, one))
            out.append(calls_after(1, False, batch))
            out.append(calls_after(1000, False, batch))
            out.append(calls_after(1, True, batch))
        return out

    retried, gave_up, resent, gave_up_bulk, misbehaved = await trio.to_thread.run_sync(run)
    job, calls = retried
    assert (job.key, job.payload, job.task_identifier, calls) == ("k", {"v": 1}, "t", 3)
    assert isinstance(gave_up[0], KongtaskError)
    assert "#580" in str(gave_up[0])
    assert gave_up[1] == ADD_ATTEMPTS
    jobs, calls = resent
    assert (sorted(j.payload for j in jobs), calls) == ([1, 2, 3], 2)
    assert "#580" in str(gave_up_bulk[0])
    assert gave_up_bulk[1] == ADD_ATTEMPTS
    assert "misbehaves" in str(misbehaved[0])


async def test_a_batch_comes_back_in_the_order_of_its_specs(kongtask_dsn: str) -> None:
    specs = [JobSpec(f"task{i % 7}", i, queue_name=f"q{i % 50}") for i in range(500)]

    def run() -> list[kongtask.Job]:
        with psycopg.connect(kongtask_dsn) as conn:
            kongtask.add_jobs_sync(conn, specs[:10])  # some names known, most new
            return kongtask.add_jobs_sync(conn, specs)

    jobs = await trio.to_thread.run_sync(run)
    assert [(j.payload, j.task_identifier, j.queue_name) for j in jobs] == [
        (s.payload, s.identifier, s.queue_name) for s in specs
    ]


@pytest.mark.parametrize(
    ("style", "marks", "params"),
    [
        ("dollar", ["$1", "$9"], (1,)),
        ("format", ["%s"], (1,)),
        ("pyformat", ["%(p0)s", "%(p8)s"], {"p0": 1}),
        ("qmark", ["?"], (1,)),
        ("numeric", [":1", ":9"], (1,)),
        ("named", [":p0", ":p8"], {"p0": 1}),
    ],
)
def test_statements_in_every_parameter_style(
    style: ParamStyle, marks: list[str], params: object
) -> None:
    q = queries('we"ird', style)
    assert all(mark in q.add_job for mark in marks)
    assert q.add_job.count(marks[0]) == (9 if marks[0] in ("%s", "?") else 1)
    assert '"we""ird".add_job(' in q.add_job  # the schema, quoted
    assert q.bind(q.add_job, [1]).params == params
