"""Bad input gets a clear error, and nothing is lost or corrupted.

Test rules: a real PostgreSQL; no sleeps to wait for results (events, or polling under an
absolute ``trio.fail_after``). Every test that feeds a worker something odd also checks
that the pool still runs an ordinary job afterwards: bad input must not crash the pool.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio

import kongtask
from kongtask import ConfigError, JobSpec, SchemaTooNewError
from kongtask._config import quote_ident, resolve_schema
from kongtask._migrate import migrate_sync
from kongtask._pg import Database, open_database
from kongtask._worker import open_worker
from kongtask.testing import run_sync_sql

S = "graphile_worker"
CLI = [sys.executable, "-c", "import sys, trio, kongtask; sys.exit(trio.run(kongtask.main))"]

# Names PostgreSQL cannot hold, and names that must work (quotes, spaces, case, 63 bytes).
BAD_SCHEMAS = ["", "a\x00b", "x" * 64, "é" * 32]
GOOD_SCHEMAS = ['We"ird Sch ema', "UPPER", "x" * 63, "é" * 31 + "x", "semi;colon --"]


async def _count(db: Database, schema: str = S) -> int:
    n: int = await db.fetchval(f"select count(*) from {quote_ident(schema)}._private_jobs")
    return n


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await trio.run_process(
        [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def _one_clean_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


class Recorder:
    """A handler that records (identifier, payload) and signals when ``expected`` ran."""

    def __init__(self, expected: int) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.expected = expected
        self.done = trio.Event()

    async def __call__(self, job: kongtask.Job, ctx: object) -> None:
        self.seen.append((job.task_identifier, job.payload))
        if len(self.seen) >= self.expected:
            self.done.set()


# --- payloads -------------------------------------------------------------------------


def _circular() -> dict[str, object]:
    d: dict[str, object] = {}
    d["self"] = d
    return d


@pytest.mark.parametrize(
    "payload",
    [object(), {1, 2}, math.nan, math.inf, {"b": b"bytes"}, {(1, 2): "tuple key"}, _circular()],
    ids=["object", "set", "nan", "inf", "bytes", "tuple-key", "circular"],
)
async def test_payload_not_json_serialisable(db: Database, payload: object) -> None:
    client = kongtask.Client(db, S)
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        await client.add_job("t", payload)
    # In a batch, one bad payload rejects the whole batch before anything is sent.
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        await client.add_jobs([JobSpec("t", {"ok": 1}), JobSpec("t", payload)])
    assert await _count(db) == 0
    # The client still works.
    await client.add_job("t", {"ok": True})
    assert await _count(db) == 1


NON_OBJECTS: list[tuple[str, Any]] = [
    ("[1, 2, 3]", [1, 2, 3]),
    ("[]", []),
    ("42", 42),
    ("-1.5", -1.5),
    ('"text"', "text"),
    ("true", True),
    ("null", None),
    ('[{"a": null}]', [{"a": None}]),
]


async def test_non_object_payloads_reach_handlers_as_is(kongtask_dsn: str, db: Database) -> None:
    for i, (text, _) in enumerate(NON_OBJECTS):
        # From SQL, as another service would add them (one per queue keeps the order).
        await db.execute(
            f"select {S}.add_job('shape', $1::json, queue_name => 'shapes', "
            "run_at => now() + make_interval(secs => $2::int) - interval '1 hour')",
            text,
            i,
        )
    recorder = Recorder(len(NON_OBJECTS))
    async with open_worker(kongtask_dsn, {"shape": recorder}, poll_interval=0.2):
        with trio.fail_after(20):
            await recorder.done.wait()
    assert [payload for _, payload in recorder.seen] == [value for _, value in NON_OBJECTS]
    assert await _count(db) == 0  # all completed: an array is a batch job that succeeded


async def test_unknown_task_is_left_alone(kongtask_dsn: str, db: Database) -> None:
    client = kongtask.Client(db, S)
    unknown = await client.add_job("nobody_runs_this", {"x": 1}, priority=-10)
    await client.add_job("known", {"n": 1})
    recorder = Recorder(1)
    async with open_worker(kongtask_dsn, {"known": recorder}, poll_interval=0.2) as worker:
        with trio.fail_after(20):
            await recorder.done.wait()
        recorder.expected, recorder.done = 2, trio.Event()
        await client.add_job("known", {"n": 2})
        with trio.fail_after(20):
            await recorder.done.wait()
        assert worker.statistics() is not None
    row = await db.fetchrow(
        f"select attempts, locked_at, locked_by, last_error, run_at from {S}._private_jobs "
        "where id = $1",
        unknown.id,
    )
    assert row is not None
    assert dict(row) == {
        "attempts": 0,
        "locked_at": None,
        "locked_by": None,
        "last_error": None,
        "run_at": unknown.run_at,
    }
    assert await _count(db) == 1


# --- lengths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "limit"), [("identifier", 128), ("queue_name", 128), ("job_key", 512)]
)
async def test_length_limits(db: Database, field: str, limit: int) -> None:
    client = kongtask.Client(db, S)

    def spec(length: int) -> JobSpec:
        values: dict[str, Any] = {"identifier": "t", "payload": {}}
        values[field] = "k" * length
        return JobSpec(**values)

    at_limit = spec(limit)
    job = (await client.add_jobs([at_limit]))[0]
    assert job.id > 0
    for length in (limit + 1, limit * 4):
        with pytest.raises(ConfigError, match=str(limit)):
            await client.add_jobs([spec(length)])
        too_long: dict[str, Any] = {"payload": {}, "identifier": "t", field: "k" * length}
        with pytest.raises(ConfigError, match=str(limit)):
            await client.add_job(**too_long)
    # Multi-byte characters count as characters, as in PostgreSQL's length().
    wide: dict[str, Any] = {"identifier": "t", "payload": {}}
    wide[field] = "é" * limit
    await client.add_jobs([JobSpec(**wide)])
    # From SQL, the database refuses past the limit and stores nothing.
    before = await _count(db)
    args = {"identifier": "'t'", "queue_name": "null", "job_key": "null"}
    args[field] = f"repeat('k', {limit + 1})"
    with pytest.raises(asyncpg.CheckViolationError, match="check"):
        await db.execute(
            f"select {S}.add_job({args['identifier']}, '{{}}'::json, "
            f"queue_name => {args['queue_name']}, job_key => {args['job_key']})"
        )
    assert await _count(db) == before


async def test_longest_names_run(kongtask_dsn: str, db: Database) -> None:
    name, queue, key = "t" * 128, "q" * 128, "k" * 512
    await kongtask.Client(db, S).add_job(name, {"long": True}, queue_name=queue, job_key=key)
    recorder = Recorder(1)
    async with open_worker(kongtask_dsn, {name: recorder}, poll_interval=0.2):
        with trio.fail_after(20):
            await recorder.done.wait()
    assert recorder.seen == [(name, {"long": True})]
    assert await _count(db) == 0


async def test_worker_refuses_overlong_task_names(kongtask_dsn: str) -> None:
    async def handler(job: kongtask.Job, ctx: object) -> None:
        raise AssertionError("never runs")

    for bad in ["t" * 129, ""]:
        with pytest.raises(ConfigError, match="128"):
            async with open_worker(kongtask_dsn, {bad: handler}):
                raise AssertionError("not reached")


# --- schema names ---------------------------------------------------------------------


@pytest.mark.parametrize("schema", GOOD_SCHEMAS, ids=range(len(GOOD_SCHEMAS)))
async def test_odd_schema_names_work(kongtask_blank_dsn: str, schema: str) -> None:
    assert resolve_schema(schema) == schema
    await trio.to_thread.run_sync(migrate_sync, kongtask_blank_dsn, schema)
    async with open_database(kongtask_blank_dsn) as db:
        # The schema exists under its exact name (not folded, not truncated).
        assert (
            await db.fetchval("select count(*) from pg_namespace where nspname = $1", schema) == 1
        )
        await kongtask.Client(db, schema).add_job("odd", {"schema": schema})
        recorder = Recorder(1)
        async with open_worker(
            kongtask_blank_dsn, {"odd": recorder}, schema=schema, poll_interval=0.2
        ):
            with trio.fail_after(20):
                await recorder.done.wait()
        assert recorder.seen == [("odd", {"schema": schema})]
        assert await _count(db, schema) == 0
        # Nothing leaked into the default schema.
        assert await db.fetchval("select to_regnamespace('graphile_worker') is null")


@pytest.mark.parametrize("schema", BAD_SCHEMAS, ids=["empty", "nul", "64-ascii", "64-bytes"])
async def test_schemas_postgres_cannot_hold(kongtask_dsn: str, schema: str) -> None:
    expected = "empty" if schema == "" else ("NUL" if "\x00" in schema else "63 bytes")
    with pytest.raises(ConfigError, match=expected):
        resolve_schema(schema)
    with pytest.raises(ConfigError, match=expected):
        async with kongtask.open_client(kongtask_dsn, schema=schema):
            raise AssertionError("not reached")
    with pytest.raises(ConfigError, match=expected):
        async with open_worker(kongtask_dsn, {"t": Recorder(1)}, schema=schema):
            raise AssertionError("not reached")
    with pytest.raises(ConfigError, match=expected):
        migrate_sync(kongtask_dsn, schema)
    if schema == "x" * 64:  # the CLI once (a process start costs ~1.5 s); argv cannot hold NUL
        code, _, err = await _cli("migrate", "-c", kongtask_dsn, "-s", schema)
        assert code == 2  # a bad option value, as for every option
        assert expected in _one_clean_line(err)


async def test_schema_env_var_is_validated(
    kongtask_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPHILE_WORKER_SCHEMA", "y" * 64)
    with pytest.raises(ConfigError, match="63 bytes"):
        resolve_schema()


# --- servers and schemas that are not there -----------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


async def test_server_down(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    with trio.fail_after(30), pytest.raises(OSError, match="Connect call failed"):
        async with kongtask.open_client(dsn):
            raise AssertionError("not reached")
    with trio.fail_after(30), pytest.raises(OSError, match="Connect call failed"):
        async with open_worker(dsn, {"t": Recorder(1)}):
            raise AssertionError("not reached")
    # (--connect-timeout 0: fail at once instead of waiting for the server to come up)
    tasks = tmp_path / "tasks_here"
    tasks.mkdir()
    (tasks / "t.py").write_text("async def task(job, ctx):\n    pass\n")
    run = ["run", "--task-directory", str(tasks), "--connect-timeout", "0"]
    for verb in (["migrate"], run):
        code, out, err = await _cli(*verb, "-c", dsn)
        assert code == 1, (verb, out, err)
        assert "cannot reach the database" in _one_clean_line(err)


async def test_database_missing_or_dsn_malformed(kongtask_server: object) -> None:
    from kongtask.testing import PostgresServer

    assert isinstance(kongtask_server, PostgresServer)
    missing = kongtask_server.dsn_for("no_such_database_here")
    with pytest.raises(Exception, match='database "no_such_database_here" does not exist'):
        async with kongtask.open_client(missing):
            raise AssertionError("not reached")
    for dsn, text in [
        (missing, 'database "no_such_database_here" does not exist'),
        ("notadsn://x", "invalid DSN"),
    ]:
        code, _, err = await _cli("migrate", "-c", dsn)
        assert code == 1
        assert text in _one_clean_line(err)


def _keyword_form(url: str) -> str:
    """A URL DSN as libpq's keyword/value string, quoting every value."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)

    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    fields = {
        "host": parts.hostname or "",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or ""),
        "dbname": unquote(parts.path.lstrip("/")),
    }
    if parts.password:
        fields["password"] = unquote(parts.password)
    return " ".join(f"{k} = {quoted(v)}" for k, v in fields.items())


def test_keyword_dsns_become_urls() -> None:
    from kongtask._config import asyncpg_dsn

    assert asyncpg_dsn("postgresql://u@h/d") == "postgresql://u@h/d"
    assert asyncpg_dsn(None) is None
    assert asyncpg_dsn("host=h port=5433 dbname=app") == (
        "postgresql://?host=h&port=5433&dbname=app"
    )
    assert asyncpg_dsn(r"host = /run/pg  dbname='my db' password='it\'s \\' user=a\ b") == (
        "postgresql://?host=%2Frun%2Fpg&dbname=my+db&password=it%27s+%5C&user=a+b"
    )
    for bad in ("just words", "host=h 'x'", "=v"):
        with pytest.raises(ConfigError, match="keyword=value"):
            asyncpg_dsn(bad)


async def test_libpq_keyword_dsn_works_everywhere(kongtask_blank_dsn: str) -> None:
    dsn = _keyword_form(kongtask_blank_dsn)
    assert "://" not in dsn
    await trio.to_thread.run_sync(migrate_sync, dsn)
    async with kongtask.open_client(dsn) as client:
        job = await client.add_job("t", {"n": 1})
    seen = Recorder(1)
    async with open_worker(dsn, {"t": seen}) as worker:
        with trio.fail_after(10):
            await seen.done.wait()
        assert worker.statistics().running == 0
    assert seen.seen == [("t", {"n": 1})]
    assert job.payload == {"n": 1}
    code, out, err = await _cli("add", "t", "-c", dsn)
    assert code == 0, err
    assert json.loads(out)["task_identifier"] == "t"


async def test_schema_missing(kongtask_blank_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    hint = "'graphile_worker' is not installed in this database .*run `kongtask migrate`"
    async with open_database(kongtask_blank_dsn) as db:
        client = kongtask.Client(db, S)
        for call in (
            lambda: client.add_job("t", {}),
            lambda: client.add_jobs([JobSpec("t")]),
            lambda: client.complete_jobs([1]),
            lambda: client.remove_job("k"),
            lambda: client.force_unlock_workers(["pool-x"]),
            lambda: client.cleanup(["GC_JOB_QUEUES"]),
        ):
            with pytest.raises(kongtask.KongtaskError, match=hint) as caught:
                await call()
            # the database's own words stay attached
            assert "does not exist" in str(caught.value.__cause__)
    # a pool told not to migrate: one clear error, and no noise from a release of nothing
    with pytest.raises(kongtask.KongtaskError, match="'graphile_worker' is not installed"):
        async with open_worker(kongtask_blank_dsn, {"t": Recorder(1)}, migrate=False):
            raise AssertionError("not reached")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def _with_migration_21(dsn: str, *, breaking: bool) -> None:
    await trio.to_thread.run_sync(
        run_sync_sql,
        dsn,
        f"insert into {S}.migrations (id, breaking) values (21, {str(breaking).lower()})",
    )


async def test_schema_newer_and_breaking(kongtask_dsn: str, db: Database) -> None:
    job = await kongtask.Client(db, S).add_job("t", {"ok": 1})
    await _with_migration_21(kongtask_dsn, breaking=True)
    with pytest.raises(SchemaTooNewError, match="breaking migration 21"):
        await trio.to_thread.run_sync(migrate_sync, kongtask_dsn)
    recorder = Recorder(1)
    with pytest.raises(SchemaTooNewError, match="breaking migration 21"):
        async with open_worker(kongtask_dsn, {"t": recorder}):
            raise AssertionError("not reached")
    code, _, err = await _cli("migrate", "-c", kongtask_dsn)
    assert code == 57
    assert "breaking migration 21" in _one_clean_line(err)
    # Nothing was touched: the 21 rows are still there and no job was claimed.
    assert await db.fetchval(f"select count(*) from {S}.migrations") == 21
    assert recorder.seen == []
    row = await db.fetchrow(
        f"select attempts, locked_by from {S}._private_jobs where id = $1", job.id
    )
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (0, None)


async def test_schema_newer_but_compatible(kongtask_dsn: str, db: Database) -> None:
    await _with_migration_21(kongtask_dsn, breaking=False)
    await kongtask.Client(db, S).add_job("t", {"ok": 1})
    recorder = Recorder(1)
    async with open_worker(kongtask_dsn, {"t": recorder}, poll_interval=0.2):
        with trio.fail_after(20):
            await recorder.done.wait()
    assert recorder.seen == [("t", {"ok": 1})]


# --- roles (docs/security.md) ---------------------------------------------------------

WRAPPER = """
create schema app_jobs;
create function app_jobs.enqueue_email(recipient text, subject text)
returns bigint
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
  select id from graphile_worker.add_job(
    'send_email',
    json_build_object('to', recipient, 'subject', subject),
    queue_name => 'mail',
    max_attempts => 10
  );
$$;
revoke all on function app_jobs.enqueue_email(text, text) from public;
grant usage on schema app_jobs to {app};
grant execute on function app_jobs.enqueue_email(text, text) to {app};
"""


async def test_roles_and_security_definer_wrapper(kongtask_server: object) -> None:
    """The owner migrates and runs workers; an app role adds jobs only via the wrapper."""
    import uuid

    from kongtask.testing import PostgresServer

    assert isinstance(kongtask_server, PostgresServer)
    tag = uuid.uuid4().hex[:8]
    owner, app, dbname = f"kt_owner_{tag}", f"kt_app_{tag}", f"kt_roles_{tag}"
    admin = kongtask_server.dsn
    if "postgres@" not in admin:
        pytest.skip("needs a server DSN of the form user@host to derive role DSNs")

    def as_role(role: str) -> str:
        return kongtask_server.dsn_for(dbname).replace("postgres@", f"{role}@", 1)

    await trio.to_thread.run_sync(
        run_sync_sql,
        admin,
        f"create role {owner} login",
        f"create role {app} login",
        f"create database {dbname} owner {owner}",
    )
    try:
        await trio.to_thread.run_sync(migrate_sync, as_role(owner))
        async with open_database(as_role(owner)) as owner_db:
            await owner_db.execute(WRAPPER.format(app=app))
            async with open_database(as_role(app)) as app_db:
                job_id = await app_db.fetchval(
                    "select app_jobs.enqueue_email('a@example.com', 'Welcome')"
                )
                assert isinstance(job_id, int)
                with pytest.raises(Exception, match="permission denied for schema"):
                    await app_db.fetchval(f"select {S}.add_job('send_email')")
                # Granting the tables does not help: RLS with no policy hides every row.
                await owner_db.execute(
                    f"grant usage on schema {S} to {app}; "
                    f"grant all on all tables in schema {S} to {app}"
                )
                assert await app_db.fetchval(f"select count(*) from {S}._private_jobs") == 0
                with pytest.raises(Exception, match="row-level security"):
                    await app_db.fetchval(f"select {S}.add_job('send_email')")
            # A worker as the app role stops at start-up, saying why.
            with pytest.raises(Exception, match="row-level security"):
                async with open_worker(as_role(app), {"send_email": Recorder(1)}):
                    raise AssertionError("not reached")
            # The owner's worker runs the job the app added.
            recorder = Recorder(1)
            async with open_worker(as_role(owner), {"send_email": recorder}, poll_interval=0.2):
                with trio.fail_after(20):
                    await recorder.done.wait()
            assert recorder.seen == [("send_email", {"to": "a@example.com", "subject": "Welcome"})]
    finally:
        await trio.to_thread.run_sync(
            run_sync_sql,
            admin,
            f"drop database if exists {dbname} with (force)",
            f"drop role if exists {app}",
            f"drop role if exists {owner}",
        )


async def test_handler_calling_sys_exit_fails_only_its_job(kongtask_dsn: str, db: Database) -> None:
    """``sys.exit()`` in a handler (async or in a thread) fails that job; the pool goes on."""

    async def exits(job: kongtask.Job, ctx: object) -> None:
        sys.exit(3)

    def exits_in_thread(job: kongtask.Job, ctx: object) -> None:
        sys.exit("bye")

    client = kongtask.Client(db, S)
    bad = [
        (await client.add_job("exits", {}, max_attempts=1)).id,
        (await client.add_job("exits_in_thread", {}, max_attempts=1)).id,
    ]
    recorder = Recorder(1)
    tasks: dict[str, Callable[..., Any]] = {
        "exits": exits,
        "exits_in_thread": exits_in_thread,
        "ok": recorder,
    }
    async with open_worker(kongtask_dsn, tasks, concurrency=2, poll_interval=0.2):
        with trio.fail_after(20):
            while True:
                n = await db.fetchval(
                    f"select count(*) from {S}._private_jobs where id = any($1) "
                    "and attempts = max_attempts and locked_by is null",
                    bad,
                )
                if n == 2:
                    break
                await trio.sleep(0.05)
        await client.add_job("ok", {"after": True})
        with trio.fail_after(20):
            await recorder.done.wait()
    rows = await db.fetch(
        f"select last_error from {S}._private_jobs where id = any($1) order by id", bad
    )
    assert rows[0]["last_error"].startswith("the handler raised SystemExit(3)")
    assert rows[1]["last_error"].startswith("the handler raised SystemExit('bye')")
