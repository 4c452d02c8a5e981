"""Comparable snapshots of a graphile-worker schema (SCHEMA.md §9.3).

Function bodies are masked: kongtask writes its own, and reading upstream's (an unmasked
dump of an oracle database) is against the project's rules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import asyncpg
import pytest

from kongtask._config import quote_ident


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
    select queue_name, task_identifier, priority, run_at, attempts, max_attempts,
           last_error, key, (locked_at is not null) as locked, locked_by, revision,
           flags::text as flags, p.payload::jsonb::text as payload
    from {s}.jobs j join {s}._private_jobs p using (id)
    order by task_identifier, key nulls first, run_at, payload
"""


async def jobs_snapshot(conn: asyncpg.Connection, schema: str) -> list[tuple[Any, ...]]:
    """Jobs as seen through the ``jobs`` view (ids and bookkeeping timestamps left out)."""
    rows = await conn.fetch(JOBS_VIEW_QUERY.format(s=quote_ident(schema)))
    return [tuple(r) for r in rows]
