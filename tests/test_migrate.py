"""The migrator: install, upgrade, concurrency, notifications and the newer-schema rules.

Rules: a real PostgreSQL for every test (fresh databases from the ``kongtask`` plugin), no
sleeps to wait for results (events, or polling under an absolute ``fail_after``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import trio
from _cli_helpers import cli_status

import kongtask
from kongtask._config import quote_ident
from kongtask._errors import ConfigError, MigrationError, SchemaTooNewError
from kongtask._migrate import (
    LOCKED_JOBS_MESSAGE,
    breaking_migration_ids,
    check_schema,
    latest_known_migration,
    migrate,
    migrate_connection,
    too_new_message,
)
from kongtask._pg import Database, open_database

BREAKING = [1, 3, 11, 13, 14, 16, 19]


async def blank_db(make_db: Callable[..., str]) -> str:
    # The factory runs its own asyncio loop, which cannot nest inside trio-asyncio.
    return await trio.to_thread.run_sync(lambda: make_db(migrated=False))


async def migration_rows(db: Database, schema: str = "graphile_worker") -> list[tuple[int, bool]]:
    rows = await db.fetch(f"select id, breaking from {quote_ident(schema)}.migrations order by id")
    return [(r["id"], r["breaking"]) for r in rows]


def test_known_migrations() -> None:
    assert latest_known_migration() == 20
    assert list(breaking_migration_ids()) == BREAKING


async def test_fresh_install_and_idempotent_rerun(kongtask_blank_dsn: str) -> None:
    async with open_database(kongtask_blank_dsn) as db:
        await migrate(db)
        rows = await migration_rows(db)
        assert [r[0] for r in rows] == list(range(1, 21))
        assert [r[0] for r in rows if r[1]] == BREAKING
        stamps = await db.fetch("select id, ts from graphile_worker.migrations order by id")

        await migrate(db)
        assert await db.fetch("select id, ts from graphile_worker.migrations order by id") == stamps
        status = await check_schema(db)
        assert (status.latest, status.latest_breaking) == (20, 19)


async def test_the_template_database_is_fully_migrated(db: Database) -> None:
    assert [r[0] for r in await migration_rows(db)] == list(range(1, 21))


async def test_twenty_concurrent_migrators(
    kongtask_database_factory: Callable[..., str],
) -> None:
    dsn = await blank_db(kongtask_database_factory)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            async with open_database(dsn, min_size=1, max_size=1) as db:
                await migrate(db)
        except Exception as exc:  # collected, so one failure doesn't hide the others
            errors.append(exc)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    assert errors == []
    async with open_database(dsn) as db:
        rows = await migration_rows(db)
        assert [r[0] for r in rows] == list(range(1, 21))
        assert [r[0] for r in rows if r[1]] == BREAKING
        assert await db.fetchval("select count(*) from graphile_worker._private_jobs") == 0


async def test_worker_migrate_notifications(kongtask_blank_dsn: str) -> None:
    payloads: list[str] = []
    all_received = trio.Event()

    def on_notify(conn: object, pid: int, channel: str, payload: object) -> None:
        payloads.append(str(payload))
        if len(payloads) == 20:
            all_received.set()

    async with open_database(kongtask_blank_dsn) as db:
        listener = await db.connect()
        try:
            await db.run(listener.add_listener, "worker:migrate", on_notify)
            await migrate(db)
            with trio.fail_after(10):
                await all_received.wait()
        finally:
            await db.close_connection(listener)
    expected = [
        f'{{"migrationNumber":{n},"breaking":{"true" if n in BREAKING else "false"}}}'
        for n in range(1, 21)
    ]
    assert payloads == expected


async def test_newer_breaking_migration_refuses_with_exit_57(
    kongtask_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_database(kongtask_dsn) as db:
        await db.execute("insert into graphile_worker.migrations (id, breaking) values (21, true)")
        with pytest.raises(SchemaTooNewError) as info:
            await migrate(db)
        assert str(info.value) == too_new_message(21, 21, 20)
        assert str(info.value) == (
            "Database is using Graphile Worker schema revision 21 which includes breaking "
            "migration 21, but the currently running worker only supports up to revision 20. "
            "It would be unsafe to continue; please ensure all versions of Graphile Worker are "
            "compatible."
        )
        with pytest.raises(SchemaTooNewError):
            await check_schema(db)
    assert await cli_status(["migrate", "-c", kongtask_dsn]) == 57
    assert "breaking migration 21" in capsys.readouterr().err


async def test_newer_non_breaking_migration_warns_and_continues(
    kongtask_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_database(kongtask_dsn) as db:
        await db.execute("insert into graphile_worker.migrations (id, breaking) values (21, false)")
        with caplog.at_level(logging.WARNING, logger="kongtask.migrate"):
            await migrate(db)
        status = await check_schema(db)
    assert (status.latest, status.latest_breaking) == (21, 19)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith(
            "Database is using Graphile Worker schema revision 21, but the currently running "
            "worker only supports up to revision 20 which may or may not be compatible."
        )
        and m.endswith("Attempting to continue regardless.")
        for m in warnings
    ), warnings
    assert await cli_status(["migrate", "-c", kongtask_dsn, "--silent"]) == 0


async def test_migrate_on_a_current_schema_takes_no_lock(kongtask_dsn: str) -> None:
    """A worker's start usually finds nothing to migrate: that is answered by a read, which
    does not queue behind a migrator's (or a body refresh's) lock on the migrations table."""
    async with open_database(kongtask_dsn) as db:
        holder = await db.connect()
        try:
            await db.run(holder.execute, "begin")
            await db.run(
                holder.execute, "lock table graphile_worker.migrations in share row exclusive mode"
            )
            with trio.fail_after(10):
                await migrate(db)
                status = await check_schema(db)
        finally:
            await db.close_connection(holder)
    assert status.latest == latest_known_migration()


async def test_worker_refused_at_start_leaves_no_connection_open(kongtask_dsn: str) -> None:
    """The start opens the worker's own connections while it migrates: a start that fails
    closes them too."""
    async with open_database(kongtask_dsn, max_size=1) as db:
        await db.execute("insert into graphile_worker.migrations (id, breaking) values (21, true)")

        async def noop(job: Any, ctx: Any) -> None:
            pass

        for migrate_at_start in (True, False):
            with pytest.raises(SchemaTooNewError):
                async with kongtask.open_worker(
                    kongtask_dsn, {"noop": noop}, migrate=migrate_at_start, handle_signals=False
                ):
                    pytest.fail("the worker started on a too-new schema")
        with trio.fail_after(10):
            # a closed session leaves pg_stat_activity right after its socket closes
            while await db.fetchval(  # noqa: ASYNC110
                "select count(*) from pg_stat_activity where datname = current_database()"
                " and backend_type = 'client backend' and pid <> pg_backend_pid()"
            ):
                await trio.sleep(0.02)


@pytest.mark.parametrize(
    "schema",
    [
        'Weird "Schema"',
        "with space",
        "UPPER_case",
        "dollar$$sign",
        "$kt0$ and $$",
        "it's; drop table x; --",
        "s" * 63,
    ],
)
async def test_unusual_schema_names(kongtask_blank_dsn: str, schema: str) -> None:
    async with open_database(kongtask_blank_dsn) as db:
        await migrate(db, schema)
        await migrate(db, schema)  # idempotent
        q = quote_ident(schema)
        assert [r[0] for r in await migration_rows(db, schema)] == list(range(1, 21))
        # The function bodies refer to the right schema: use them.
        job = await db.fetchrow(f"select * from {q}.add_job('hello', '{{\"a\":1}}', 'q1')")
        assert job is not None
        assert job["id"] is not None
        view = await db.fetchrow(f"select queue_name, task_identifier from {q}.jobs")
        assert view is not None
        assert tuple(view) == ("q1", "hello")
        assert (
            await db.fetchval(
                f"select count(*) from {q}.complete_jobs(array[$1::bigint])", job["id"]
            )
            == 1
        )
        assert (
            await db.fetchval("select count(*) from pg_namespace where nspname = $1", schema) == 1
        )


@pytest.mark.parametrize("schema", ["", "nul\x00byte", "s" * 64, "é" * 32])
async def test_unusable_schema_names_are_config_errors(
    kongtask_blank_dsn: str, schema: str
) -> None:
    async with open_database(kongtask_blank_dsn) as db:
        with pytest.raises(ConfigError, match="schema name"):
            await migrate(db, schema)


async def migrate_to(db: Database, up_to: int, schema: str = "graphile_worker") -> None:
    await db.with_connection(migrate_connection, schema, up_to=up_to)


async def test_migrations_table_without_breaking_column_is_adopted(kongtask_blank_dsn: str) -> None:
    async with open_database(kongtask_blank_dsn) as db:
        await migrate_to(db, 10)
        # The shape graphile-worker <= 0.13.0 left behind.
        await db.execute("alter table graphile_worker.migrations drop column breaking")
        await migrate(db)
        rows = await migration_rows(db)
        assert [r[0] for r in rows] == list(range(1, 21))
        assert [r[0] for r in rows if r[1]] == BREAKING
        columns = await db.fetch(
            "select attname from pg_attribute"
            " where attrelid = 'graphile_worker.migrations'::regclass"
            " and attnum > 0 and not attisdropped order by attnum"
        )
        assert [c[0] for c in columns] == ["id", "ts", "breaking"]


async def seed_legacy(db: Database) -> None:
    """Jobs at migration 10 (the legacy layout), through the legacy add_job."""
    await db.execute(
        """
        select graphile_worker.add_job('plain', '{"n":1}', run_at => '2030-01-01Z');
        select graphile_worker.add_job('queued', '{"n":2}', 'q', '2030-01-02Z', priority => 3);
        select graphile_worker.add_job('keyed', '[1,2]', job_key => 'k', flags => array['f']);
        select graphile_worker.add_job('failing', '{}', max_attempts => 2, job_key => 'dead');
        update graphile_worker.jobs set attempts = 2, last_error = 'boom' where key = 'dead';
        insert into graphile_worker.known_crontabs values ('cron1', now(), now());
        """
    )


async def test_legacy_jobs_survive_migration_11(kongtask_blank_dsn: str) -> None:
    async with open_database(kongtask_blank_dsn) as db:
        await migrate_to(db, 10)
        await seed_legacy(db)
        # Stale locks (over 4 h old) do not block migration 11.
        await db.execute(
            "update graphile_worker.jobs set locked_at = now() - interval '5 hours',"
            " locked_by = 'worker-old' where task_identifier = 'plain'"
        )
        await migrate(db)
        rows = await db.fetch(
            "select j.task_identifier, j.queue_name, j.key, j.attempts, j.max_attempts,"
            " j.last_error, j.priority, j.flags::text, j.locked_at, p.payload::text"
            " from graphile_worker.jobs j join graphile_worker._private_jobs p using (id)"
            " order by j.task_identifier"
        )
        assert [tuple(r) for r in rows] == [
            ("failing", None, "dead", 2, 2, "boom", 0, None, None, "{}"),
            ("keyed", None, "k", 0, 25, None, 0, '{"f": true}', None, "[1,2]"),
            ("plain", None, None, 0, 25, None, 0, None, None, '{"n":1}'),
            ("queued", "q", None, 0, 25, None, 3, None, None, '{"n":2}'),
        ]
        crons = await db.fetch("select identifier from graphile_worker._private_known_crontabs")
        assert [c[0] for c in crons] == ["cron1"]


async def test_migration_11_refuses_recently_locked_jobs(kongtask_blank_dsn: str) -> None:
    async with open_database(kongtask_blank_dsn) as db:
        await migrate_to(db, 10)
        await seed_legacy(db)
        await db.execute(
            "update graphile_worker.jobs set locked_at = now() - interval '3 hours',"
            " locked_by = 'worker-0123456789' where task_identifier = 'queued'"
        )
        before = await db.fetch("select * from graphile_worker.jobs order by id")
        with pytest.raises(MigrationError) as info:
            await migrate(db)
        assert str(info.value) == LOCKED_JOBS_MESSAGE
        assert str(info.value) == (
            "There are locked jobs present; migration 11 cannot complete. Please ensure all "
            "workers are shut down cleanly and all locked jobs and queues are unlocked before "
            "attempting this migration."
        )
        assert isinstance(info.value.__cause__, asyncpg.PostgresError)
        assert info.value.__cause__.sqlstate == "22012"
        # Nothing changed: still the legacy layout at migration 10, with the same rows.
        assert [r[0] for r in await migration_rows(db)] == list(range(1, 11))
        assert await db.fetch("select * from graphile_worker.jobs order by id") == before
        assert await db.fetchval("select to_regclass('graphile_worker.tasks')") is None
        assert await cli_status(["migrate", "-c", kongtask_blank_dsn]) == 1


async def test_add_job_inserts_only_missing_task_and_queue_names(db: Database) -> None:
    """graphile-worker #619: repeated adds must not burn identity values."""
    for _ in range(3):
        await db.execute("select graphile_worker.add_job('t', queue_name => 'q')")
        await db.execute(
            "select graphile_worker.add_job('t', queue_name => 'q', job_key => 'k',"
            " job_key_mode => 'unsafe_dedupe')"
        )
        await db.execute(
            "select * from graphile_worker.add_jobs(array[('t', null, 'q', null, null, null,"
            " null, null)::graphile_worker.job_spec])"
        )
    seqs = await db.fetch(
        "select sequencename, last_value from pg_sequences"
        " where schemaname = 'graphile_worker'"
        " and sequencename in ('tasks_id_seq', 'job_queues_id_seq') order by 1"
    )
    assert [tuple(r) for r in seqs] == [("job_queues_id_seq", 1), ("tasks_id_seq", 1)]


async def test_jobs_insert_notify_payloads(db: Database) -> None:
    payloads: list[str] = []
    got = trio.Event()

    def on_notify(conn: object, pid: int, channel: str, payload: object) -> None:
        payloads.append(str(payload))
        if len(payloads) == 4:
            got.set()

    listener = await db.connect()
    try:
        await db.run(listener.add_listener, "jobs:insert", on_notify)
        await db.execute(
            "select * from graphile_worker.add_jobs(array["
            "('a', null, null, null, null, null, null, null),"
            "('b', null, null, null, null, null, null, null)]::graphile_worker.job_spec[])"
        )
        await db.execute("select graphile_worker.add_job('c', job_key => 'x')")
        await db.execute(
            "select graphile_worker.add_job('c', job_key => 'y', job_key_mode => 'unsafe_dedupe')"
        )
        await db.execute(
            "select graphile_worker.add_job('c', job_key => 'y', job_key_mode => 'unsafe_dedupe')"
        )  # a dedupe hit: no notify
        await db.execute("select graphile_worker.remove_job('x')")
        with trio.fail_after(10):
            await got.wait()
    finally:
        await db.close_connection(listener)
    parsed: list[dict[str, Any]] = [json.loads(p) for p in payloads]
    assert [p["count"] for p in parsed] == [2, 1, 1, -1]
    for raw, p in zip(payloads, parsed, strict=True):
        assert list(p) == ["r", "count"]
        assert 0 <= p["r"] < 1
        assert raw == f'{{"r":{raw[5:].split(",")[0]},"count":{p["count"]}}}'


async def race_keyed_add(dsn: str) -> tuple[asyncpg.Record | None, list[tuple[Any, ...]]]:
    """Re-add a keyed job while a claimer holds its row lock, then let the claim commit.

    This forces graphile-worker #580 deterministically: add_job's retire step passes (the
    committed row is available), its upsert waits on the claimer's row lock, and after the
    claim commits, the conflicting row is locked, so the upsert skips it.
    """
    async with open_database(dsn, max_size=2) as db:
        await db.execute("select graphile_worker.add_job('t', job_key => 'K')")
        claimer = await db.connect()
        result: list[asyncpg.Record | None] = []
        try:
            await db.run(claimer.execute, "begin")
            await db.run(
                claimer.execute,
                "update graphile_worker._private_jobs set locked_at = now(),"
                " locked_by = 'pool-claimer', attempts = attempts + 1 where key = 'K'",
            )

            async def add() -> None:
                result.append(
                    await db.fetchrow(
                        "select * from graphile_worker.add_job("
                        "'t', '{\"new\":true}', job_key => 'K')"
                    )
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(add)
                # Poll (bounded) until add_job waits on the claimer's row lock.
                with trio.fail_after(10):
                    while True:
                        # Not on `claimer`: its open transaction freezes pg_stat_activity.
                        waiting = await db.fetchval(
                            "select count(*) from pg_stat_activity"
                            " where wait_event_type = 'Lock' and query like '%add_job%'",
                        )
                        if waiting:
                            break
                        await trio.sleep(0.01)
                await db.run(claimer.execute, "commit")
        finally:
            await db.close_connection(claimer)
        rows = await db.fetch(
            "select key, locked_by, attempts, max_attempts, payload::text"
            " from graphile_worker._private_jobs order by id"
        )
    return result[0], [tuple(r) for r in rows]


async def test_keyed_add_racing_a_claim_still_yields_a_live_job(kongtask_dsn: str) -> None:
    """graphile-worker #580 is fixed in kongtask's add_jobs: one live row per keyed spec."""
    returned, rows = await race_keyed_add(kongtask_dsn)
    assert returned is not None
    assert returned["id"] is not None
    assert returned["key"] == "K"
    assert rows == [
        (None, "pool-claimer", 25, 25, "{}"),  # the running job: retired, never retried
        ("K", None, 0, 25, '{"new":true}'),
    ]


async def test_schema_from_environment(
    kongtask_blank_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPHILE_WORKER_SCHEMA", "From Env")
    assert await cli_status(["migrate", "-c", kongtask_blank_dsn, "--silent"]) == 0
    async with open_database(kongtask_blank_dsn) as db:
        assert len(await migration_rows(db, "From Env")) == 20
        assert await db.fetchval("select to_regnamespace('graphile_worker')") is None
