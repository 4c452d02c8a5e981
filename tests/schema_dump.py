"""Comparable snapshots of a graphile-worker schema (docs/design/database.md#objects).

Function bodies are masked: kongtask writes its own, and reading upstream's (an unmasked
dump of an oracle database) is against the project's rules.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from typing import Any

import asyncpg
import trio
from oracle import oracle_migrate, require_oracle, skip_or_fail

from kongtask._config import quote_ident
from kongtask._pg import open_database
from kongtask.testing import PostgresServer


def _major(version_text: str) -> int:
    match = re.search(r"(\d+)", version_text)
    assert match, version_text
    return int(match[1])


def require_pg_dump(server_version_num: int) -> str:
    """The local ``pg_dump``, or skip when it is missing or older than the server."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        skip_or_fail("pg_dump is not installed")
    local = _major(subprocess.run([pg_dump, "--version"], capture_output=True, text=True).stdout)
    server = server_version_num // 10000
    if local < server:
        skip_or_fail(f"local pg_dump {local} is older than the server ({server})")
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

_counter = itertools.count()
# dsn -> database name, for every scratch database made in this process.
_NAMES: dict[str, str] = {}


class ScratchDatabases:
    """Databases made for tests (blank or cloned), dropped by :meth:`drop_all`.

    Cloning (``CREATE DATABASE … TEMPLATE``) a database that graphile-worker migrated is much
    cheaper than starting Node again.
    """

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.made: list[str] = []

    async def create(self, template: str | None = None) -> str:
        """A new database: blank, or a copy of the scratch database at dsn ``template``."""
        name = f"kt_mig_{os.getpid()}_{next(_counter)}"
        source = _NAMES[template] if template is not None else "template0"
        # run_sync_sql runs its own asyncio loop, which cannot nest inside trio-asyncio.
        dsn = await trio.to_thread.run_sync(self.server.create_database, name, source)
        self.made.append(name)
        _NAMES[dsn] = name
        return dsn

    def drop_all(self) -> None:
        for name in self.made:
            self.server.drop_database(name)


class OracleDatabases:
    """Fresh databases migrated by graphile-worker 0.18.0, one per schema, made lazily."""

    def __init__(self, scratch: ScratchDatabases) -> None:
        self.scratch = scratch
        self.built: dict[str, tuple[str, Snapshot]] = {}

    async def get(self, schema: str = "graphile_worker") -> tuple[str, Snapshot]:
        """The dsn (do not modify it: clone it) and snapshot for ``schema``."""
        if schema not in self.built:
            dsn = await self.scratch.create()
            await run_oracle(dsn, "0.18.0", schema)
            self.built[schema] = (dsn, await snapshot(dsn, schema))
        return self.built[schema]

    async def snapshot(self, schema: str = "graphile_worker") -> Snapshot:
        return (await self.get(schema))[1]

    async def clone(self, scratch: ScratchDatabases, schema: str = "graphile_worker") -> str:
        """A database of the caller's own, migrated by graphile-worker 0.18.0."""
        return await scratch.create(template=(await self.get(schema))[0])


async def snapshot(dsn: str, schema: str) -> Snapshot:
    """The masked dump and the catalog snapshot of ``schema`` (skips without pg_dump)."""
    async with open_database(dsn, max_size=1) as db:
        require_pg_dump(await db.with_connection(server_version_num))
        catalog = await db.with_connection(catalog_snapshot, schema)
    return await trio.to_thread.run_sync(masked_dump, dsn, schema), catalog


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
