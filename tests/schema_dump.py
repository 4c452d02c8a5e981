"""Comparable snapshots of a graphile-worker schema (SCHEMA.md §9.3).

Function bodies are masked: kongtask writes its own, and reading upstream's (an unmasked
dump of an oracle database) is against the project's rules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import trio
from oracle import oracle_migrate, require_oracle

from kongtask._config import quote_ident
from kongtask._pg import open_database


def _major(version_text: str) -> int:
    match = re.search(r"(\d+)", version_text)
    assert match, version_text
    return int(match[1])


def require_pg_dump(server_version_num: int) -> str:
    """The local ``pg_dump``, or skip when it is missing or older than the server."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        pytest.skip("pg_dump is not installed")
    local = _major(subprocess.run([pg_dump, "--version"], capture_output=True, text=True).stdout)
    server = server_version_num // 10000
    if local < server:
        pytest.skip(f"local pg_dump {local} is older than the server ({server})")
    return pg_dump


def masked_dump(dsn: str, schema: str) -> str:
    """``pg_dump --schema-only`` of ``schema``, normalised and with function bodies masked."""
    pg_dump = shutil.which("pg_dump")
    assert pg_dump is not None
    # pg_dump's --schema takes a pattern: double quotes make it literal (and exact-case).
    pattern = quote_ident(schema)
    proc = subprocess.run(
        [pg_dump, "--schema-only", f"--schema={pattern}", "--no-owner", "--no-privileges", dsn],
        capture_output=True,
        text=True,
        check=True,
    )
    text = re.sub(r"^(\\(un)?restrict .*|--.*)$", "", proc.stdout, flags=re.M)
    text = re.sub(r"AS (\$[A-Za-z_0-9]*\$).*?\1", "AS <body>", text, flags=re.S)
    return re.sub(r"\n{2,}", "\n", text)


async def server_version_num(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("select current_setting('server_version_num')"))


async def catalog_snapshot(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """Catalog facts a dump does not show in full: function attributes, RLS, sequences."""
    procs = await conn.fetch(
        """
        select p.proname, pg_get_function_identity_arguments(p.oid) as args,
               pg_get_function_arguments(p.oid) as full_args,
               pg_get_function_result(p.oid) as result, l.lanname, p.proisstrict,
               p.provolatile, p.prosecdef, p.proparallel, p.procost, p.prorows,
               p.proconfig, p.prokind, p.proretset
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        join pg_language l on l.oid = p.prolang
        where n.nspname = $1
        order by 1, 2
        """,
        schema,
    )
    rels = await conn.fetch(
        """
        select c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = $1
        order by 1
        """,
        schema,
    )
    seqs = await conn.fetch(
        """
        select sequencename, data_type::text, start_value, min_value, max_value,
               increment_by, cycle, cache_size
        from pg_sequences where schemaname = $1 order by 1
        """,
        schema,
    )
    triggers = await conn.fetch(
        """
        select t.tgname from pg_trigger t
        join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = $1 order by 1
        """,
        schema,
    )
    migrations = await conn.fetch(
        f"select id, breaking from {quote_ident(schema)}.migrations order by id"
    )
    return {
        "procs": [dict(r) for r in procs],
        "rels": [dict(r) for r in rels],
        "seqs": [dict(r) for r in seqs],
        "triggers": [r["tgname"] for r in triggers],
        "migrations": [tuple(r) for r in migrations],
    }


JOBS_VIEW_QUERY = """
    select j.queue_name, j.task_identifier, j.priority, j.run_at, j.attempts, j.max_attempts,
           j.last_error, j.key, (j.locked_at is not null) as locked, j.locked_by, j.revision,
           j.flags::text as flags, p.payload::jsonb::text as payload
    from {s}.jobs j join {s}._private_jobs p using (id)
    order by 2, 8 nulls first, 4, 13
"""


async def jobs_snapshot(conn: asyncpg.Connection, schema: str) -> list[tuple[Any, ...]]:
    """Jobs as seen through the ``jobs`` view (ids and bookkeeping timestamps left out)."""
    rows = await conn.fetch(JOBS_VIEW_QUERY.format(s=quote_ident(schema)))
    return [tuple(r) for r in rows]


Snapshot = tuple[str, dict[str, Any]]

# Databases migrated by graphile-worker 0.18.0, per schema, built once per test session.
_ORACLE_SNAPSHOTS: dict[str, Snapshot] = {}


async def blank_db(make_db: Callable[..., str]) -> str:
    """A fresh empty database from the plugin's factory."""
    # The factory runs its own asyncio loop, which cannot nest inside trio-asyncio.
    return await trio.to_thread.run_sync(lambda: make_db(migrated=False))


async def snapshot(dsn: str, schema: str) -> Snapshot:
    """The masked dump and the catalog snapshot of ``schema`` (skips without pg_dump)."""
    async with open_database(dsn, max_size=1) as db:
        require_pg_dump(await db.with_connection(server_version_num))
        catalog = await db.with_connection(catalog_snapshot, schema)
    return await trio.to_thread.run_sync(masked_dump, dsn, schema), catalog


async def oracle_snapshot(make_db: Callable[..., str], schema: str) -> Snapshot:
    """The snapshot of a fresh database migrated by graphile-worker 0.18.0."""
    if schema not in _ORACLE_SNAPSHOTS:
        require_oracle("0.18.0")
        dsn = await blank_db(make_db)
        await run_oracle(dsn, "0.18.0", schema)
        _ORACLE_SNAPSHOTS[schema] = await snapshot(dsn, schema)
    return _ORACLE_SNAPSHOTS[schema]


async def run_oracle(dsn: str, version: str, schema: str | None = None) -> None:
    """``graphile-worker --schema-only`` of ``version`` on ``dsn``, in a thread."""
    require_oracle(version)
    await trio.to_thread.run_sync(lambda: oracle_migrate(dsn, version=version, schema=schema))


def assert_same(kong: Snapshot, oracle: Snapshot) -> None:
    """Equal masked dumps and catalog facts; the oracle's must be non-trivial."""
    kong_dump, kong_catalog = kong
    oracle_dump, oracle_catalog = oracle
    # Guard against comparing two empty dumps (e.g. a schema pattern that matched nothing).
    for needle in ("CREATE VIEW", "jobs_pkey1", "jobs_id_seq1", "job_spec", "ROW LEVEL SECURITY"):
        assert needle in oracle_dump, needle
    assert len(oracle_catalog["procs"]) == 7
    assert kong_dump.splitlines() == oracle_dump.splitlines()
    for key in oracle_catalog:
        assert kong_catalog[key] == oracle_catalog[key], key
