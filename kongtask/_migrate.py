"""Install and upgrade graphile-worker's schema (migrations 1..20), as graphile-worker does.

The protocol (docs/design/database.md#the-migrations-table) matters as much as the SQL,
because Node workers and other kongtask processes may migrate the same database at the
same time:

- one startup query reads the server version and the highest (breaking) migration ids;
- a missing ``migrations`` table or ``breaking`` column triggers a bootstrap, and a clash
  with a concurrent bootstrap is retried after a random 400–600 ms;
- each migration runs in its own transaction that inserts its ``migrations`` row *first*,
  so concurrent migrators collide on ``migrations_pkey`` and the loser moves on;
- each transaction sends ``worker:migrate`` so running workers learn about breaking changes.

All database work here is asyncio code on one asyncpg connection; the trio entry point
:func:`migrate` crosses into asyncio once (docs/design/stack.md#one-crossing-per-unit-of-work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import asyncpg

from ._config import asyncpg_dsn, quote_ident, resolve_schema
from ._errors import MigrationError, SchemaTooNewError, schema_not_installed
from ._pg import Database
from ._schema_sql import SchemaSql

log = logging.getLogger("kongtask.migrate")

#: The token the ``.sql`` files use for the (quoted) schema name.
SCHEMA_PLACEHOLDER = ":GRAPHILE_WORKER_SCHEMA"
#: The first line of a breaking migration's file.
BREAKING_MARKER = "--! breaking"
#: ``server_version_num`` of PostgreSQL 12.0, the oldest server graphile-worker supports.
MIN_SERVER_VERSION_NUM = 120000
#: The channel on which each migration transaction announces itself.
MIGRATE_CHANNEL = "worker:migrate"

# SQLSTATEs meaning "another process is installing the same thing right now":
# unique_violation, duplicate_schema, duplicate_table, duplicate_object.
_CLASH_CODES = frozenset({"23505", "42P06", "42P07", "42710"})
# undefined_table (no migrations table), undefined_column (no `breaking`, <= 0.13.0).
_BOOTSTRAP_CODES = frozenset({"42P01", "42703"})
_BOOTSTRAP_ATTEMPTS = 20

LOCKED_JOBS_MESSAGE = (
    "There are locked jobs present; migration 11 cannot complete. Please ensure all workers "
    "are shut down cleanly and all locked jobs and queues are unlocked before attempting "
    "this migration."
)


@dataclass(frozen=True)
class Migration:
    """One migration file: its number, whether it is breaking, and its SQL template."""

    id: int
    breaking: bool
    template: str

    def sql(self, schema: str) -> str:
        """The SQL with ``schema`` substituted (as a quoted identifier)."""
        return render_sql(self.template, schema)


@dataclass(frozen=True)
class SchemaStatus:
    """What the startup query found in ``<schema>.migrations``.

    Attributes:
      server_version_num: PostgreSQL's ``server_version_num``.
      latest: the highest applied migration id (``None`` when none is).
      latest_breaking: the highest applied breaking migration id (``None`` when none is).
    """

    server_version_num: int
    latest: int | None
    latest_breaking: int | None


@dataclass(frozen=True, slots=True, repr=False)
class MigrationQueries(SchemaSql):
    """The statements of the migration protocol, for one schema.

    Attributes:
      status: the startup query: ``server_version_num``, ``latest`` and
        ``latest_breaking`` (migration ids, null when none).
      create_schema, create_migrations, add_breaking_column: the bootstrap, each
        idempotent; ``add_breaking_column`` adopts a table made before graphile-worker
        0.16 (no ``breaking`` column).
      mark_breaking: ``$1`` int[]: the ids of the breaking migrations.
      insert_migration: ``$1`` id, ``$2`` breaking.
      lock_migrations: keeps migrators out (they insert into ``migrations``) until the
        transaction ends, and waits for those at work.
      latest: the highest applied migration id.
    """

    status: str = field(init=False)
    create_schema: str = field(init=False)
    create_migrations: str = field(init=False)
    add_breaking_column: str = field(init=False)
    mark_breaking: str = field(init=False)
    insert_migration: str = field(init=False)
    lock_migrations: str = field(init=False)
    latest: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        return dict(
            status=f"""
        select
          current_setting('server_version_num')::int as server_version_num,
          (select id from {s}.migrations order by id desc limit 1) as latest,
          (select id from {s}.migrations where breaking is true order by id desc limit 1)
            as latest_breaking
        """,
            create_schema=f"create schema if not exists {s}",
            create_migrations=(
                f"create table if not exists {s}.migrations ("
                " id int primary key,"
                " ts timestamptz default now() not null"
                ")"
            ),
            add_breaking_column=(
                f"alter table {s}.migrations"
                " add column if not exists breaking boolean not null default false"
            ),
            mark_breaking=(
                f"update {s}.migrations set breaking = true"
                " where id = any($1::int[]) and breaking is not true"
            ),
            insert_migration=f"insert into {s}.migrations (id, breaking) values ($1, $2)",
            lock_migrations=f"lock table {s}.migrations in share row exclusive mode",
            latest=f"select max(id) from {s}.migrations",
        )


_FILE_RE = re.compile(r"^(\d{6})\.sql$")


@cache
def load_migrations() -> tuple[Migration, ...]:
    """The migrations shipped in ``kongtask/_migrations``, in ascending order."""
    folder = resources.files("kongtask").joinpath("_migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        found.append(Migration(int(match[1]), text.startswith(BREAKING_MARKER), text))
    found.sort(key=lambda m: m.id)
    if [m.id for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"kongtask's migration files are not numbered 1..N: {found!r}")
    return tuple(found)


def latest_known_migration() -> int:
    """The highest migration id this kongtask knows (20: graphile-worker 0.18.0)."""
    return load_migrations()[-1].id


def breaking_migration_ids() -> tuple[int, ...]:
    """Ids of the known breaking migrations (1, 3, 11, 13, 14, 16, 19)."""
    return tuple(m.id for m in load_migrations() if m.breaking)


def render_sql(template: str, schema: str) -> str:
    """Substitute the quoted ``schema`` into a migration template.

    Function bodies are dollar-quoted with ``$$``; if the quoted name could end such a
    body early (it contains ``$``), the bodies get a tag that does not occur in the name.
    """
    quoted = quote_ident(schema)
    if "$" in quoted:
        n = 0
        while f"$kt{n}$" in quoted:
            n += 1
        template = template.replace("$$", f"$kt{n}$")
    return template.replace(SCHEMA_PLACEHOLDER, quoted)


def too_new_message(latest: int, latest_breaking: int, known: int) -> str:
    """graphile-worker's wording for "the database has a breaking migration we don't know"."""
    return (
        f"Database is using Graphile Worker schema revision {latest} which includes breaking "
        f"migration {latest_breaking}, but the currently running worker only supports up to "
        f"revision {known}. It would be unsafe to continue; please ensure all versions of "
        "Graphile Worker are compatible."
    )


def newer_nonbreaking_message(latest: int, known: int) -> str:
    """graphile-worker's wording for the warning about a newer, non-breaking schema."""
    return (
        f"Database is using Graphile Worker schema revision {latest}, but the currently running "
        f"worker only supports up to revision {known} which may or may not be compatible. Please "
        "ensure all versions of Graphile Worker you're running are compatible. Attempting to "
        "continue regardless."
    )


def runtime_breaking_message(migration_number: int) -> str:
    """The warning a running worker logs when ``worker:migrate`` announces a breaking change."""
    return (
        f"Graphile Worker detected breaking migration to database schema revision "
        f"'{migration_number}'; it would be unsafe to continue, so shutting down..."
    )


def migrate_notify_payload(migration_id: int, breaking: bool) -> str:
    """``{"migrationNumber":N,"breaking":bool}``, compact, keys in graphile-worker's order."""
    return json.dumps(
        {"migrationNumber": migration_id, "breaking": breaking}, separators=(",", ":")
    )


def _pg_too_old_message(version_num: int) -> str:
    return (
        "This version of Graphile Worker requires PostgreSQL v12.0 or greater (detected "
        f"`server_version_num` = {version_num})"
    )


def _sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


async def _read_status(conn: asyncpg.Connection, schema: str) -> SchemaStatus:
    row = await conn.fetchrow(MigrationQueries(schema).status)
    assert row is not None
    return SchemaStatus(row["server_version_num"], row["latest"], row["latest_breaking"])


async def _bootstrap(conn: asyncpg.Connection, schema: str) -> None:
    queries = MigrationQueries(schema)
    # Refuse before creating anything on a server graphile-worker cannot run on.
    version_num = int(await conn.fetchval("select current_setting('server_version_num')"))
    if version_num < MIN_SERVER_VERSION_NUM:
        raise MigrationError(_pg_too_old_message(version_num))
    async with conn.transaction():
        await conn.execute(queries.create_schema)
        await conn.execute(queries.create_migrations)
        await conn.execute(queries.add_breaking_column)
        await conn.execute(queries.mark_breaking, list(breaking_migration_ids()))


async def _startup(conn: asyncpg.Connection, schema: str) -> SchemaStatus:
    """The startup query, bootstrapping the ``migrations`` table when it is missing or old."""
    for attempt in range(_BOOTSTRAP_ATTEMPTS):
        try:
            return await _read_status(conn, schema)
        except asyncpg.PostgresError as exc:
            if _sqlstate(exc) not in _BOOTSTRAP_CODES:
                raise
        try:
            await _bootstrap(conn, schema)
        except asyncpg.PostgresError as exc:
            if _sqlstate(exc) not in _CLASH_CODES or attempt == _BOOTSTRAP_ATTEMPTS - 1:
                raise
            # Another process is bootstrapping the same schema; let it finish.
            await asyncio.sleep(random.uniform(0.4, 0.6))
    raise MigrationError(f"could not bootstrap the migrations table of schema {schema!r}")


def _check_status(status: SchemaStatus) -> None:
    if status.server_version_num < MIN_SERVER_VERSION_NUM:
        raise MigrationError(_pg_too_old_message(status.server_version_num))
    known = latest_known_migration()
    if status.latest is not None and status.latest > known:
        if status.latest_breaking is not None and status.latest_breaking > known:
            raise SchemaTooNewError(too_new_message(status.latest, status.latest_breaking, known))
        log.warning(newer_nonbreaking_message(status.latest, known))


async def _apply(conn: asyncpg.Connection, schema: str, migration: Migration) -> bool:
    """Run one migration in its own transaction; ``False`` if another process did it."""
    queries = MigrationQueries(schema)
    sql = migration.sql(schema)
    try:
        async with conn.transaction():
            try:
                # The row goes in first: a concurrent migrator blocks here on
                # migrations_pkey and then gets a clash instead of running the DDL twice.
                await conn.execute(queries.insert_migration, migration.id, migration.breaking)
            except asyncpg.PostgresError as exc:
                if _sqlstate(exc) in _CLASH_CODES:
                    raise _AlreadyApplied from exc
                raise
            # No arguments: the simple query protocol runs the whole multi-statement file.
            await conn.execute(sql)
            await conn.execute(
                "select pg_notify($1, $2)",
                MIGRATE_CHANNEL,
                migrate_notify_payload(migration.id, migration.breaking),
            )
    except _AlreadyApplied:
        log.debug("migration %d was applied by another process", migration.id)
        return False
    except asyncpg.PostgresError as exc:
        if migration.id == 11 and _sqlstate(exc) == "22012":
            raise MigrationError(LOCKED_JOBS_MESSAGE) from exc
        raise MigrationError(
            f"migration {migration.id} failed and was rolled back: "
            f"{type(exc).__name__} ({_sqlstate(exc)}): {exc}"
        ) from exc
    log.info("applied migration %06d%s", migration.id, " (breaking)" if migration.breaking else "")
    return True


class _AlreadyApplied(Exception):
    pass


#: Functions whose kongtask body is brought up to date in place (see :func:`refresh_own_bodies`).
OWN_BODY_FUNCTIONS = ("add_jobs",)
#: Every kongtask function body carries this comment; graphile-worker's do not.
OWN_BODY_MARKER = "-- kongtask"
_PLPGSQL_END = "$$ language plpgsql;"


def own_function_statement(name: str) -> tuple[str, str]:
    """``(create or replace statement, body)`` templates of kongtask's current ``name``.

    Both come from the newest migration that defines the function, so the shipped SQL
    stays the single source.
    """
    head = f"create or replace function {SCHEMA_PLACEHOLDER}.{name}("
    for migration in reversed(load_migrations()):
        start = migration.template.find(head)
        if start < 0:
            continue
        end = migration.template.index(_PLPGSQL_END, start) + len(_PLPGSQL_END)
        statement = migration.template[start:end]
        body_start = statement.index(" as $$\n", statement.index(") returns ")) + len(" as $$")
        return statement, statement[body_start : -len(_PLPGSQL_END)]
    raise LookupError(f"no migration defines {name}")


def _own_body_query(name: str) -> str:
    """The body of function ``name``(job_spec[], ...) in schema ``$1``; no row when missing."""
    return (
        "select p.prosrc from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
        f"where n.nspname = $1 and p.proname = {name} and p.proargtypes[0] = "
        "(select t.typarray from pg_type t where t.typnamespace = n.oid "
        "and t.typname = 'job_spec') limit 1"
    )


def _is_stale_own_body(current: str | None, wanted: str, quoted_schema: str) -> bool:
    """Whether ``current`` is a body an older kongtask wrote (graphile-worker's bodies,
    those of this release and missing functions are left alone)."""
    if current is None or current == wanted:
        return False
    return OWN_BODY_MARKER in current.replace(quoted_schema, "")


async def refresh_own_bodies(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Re-create the functions of :data:`OWN_BODY_FUNCTIONS` whose body was written by an
    older kongtask release; returns their names.

    kongtask fixes graphile-worker bugs inside its function bodies without adding
    migrations (Node workers would not know the revision). A database migrated by an
    earlier kongtask keeps that release's body, so ``migrate`` brings it up to date: only
    when the schema is at exactly the newest known migration, and only a body that carries
    :data:`OWN_BODY_MARKER`. graphile-worker's own bodies are left alone. Interfaces do
    not change; nothing is announced on ``worker:migrate``.
    """
    queries = MigrationQueries(schema)
    q = quote_ident(schema)
    refreshed: list[str] = []
    for name in OWN_BODY_FUNCTIONS:
        statement, body = own_function_statement(name)
        wanted = body.replace(SCHEMA_PLACEHOLDER, q)
        async with conn.transaction():
            # migrators insert into `migrations`: this waits for them and for another
            # refresh, and keeps them out until this one commits
            await conn.execute(queries.lock_migrations)
            latest = await conn.fetchval(queries.latest)
            if latest != latest_known_migration():
                return refreshed
            current = await conn.fetchval(_own_body_query("$2"), schema, name)
            if not _is_stale_own_body(current, wanted, q):
                continue
            await conn.execute(render_sql(statement, schema))
        log.info("updated the body of %s.%s to this kongtask release's", q, name)
        refreshed.append(name)
    return refreshed


async def migrate_connection(
    conn: asyncpg.Connection, schema: str | None = None, *, up_to: int | None = None
) -> None:
    """Install or upgrade the schema on an asyncpg connection (asyncio side).

    Args:
      conn: an open asyncpg connection, not inside a transaction.
      schema: the schema name; ``None`` means ``GRAPHILE_WORKER_SCHEMA`` or ``graphile_worker``.
      up_to: stop after this migration (tests build intermediate states with it).

    Raises:
      ConfigError: the schema name is unusable.
      SchemaTooNewError: the database has a breaking migration newer than kongtask knows.
      MigrationError: PostgreSQL is older than 12, or a migration failed (rolled back).
    """
    schema = resolve_schema(schema)
    status = await _startup(conn, schema)
    _check_status(status)
    latest = status.latest or 0
    for migration in load_migrations():
        if migration.id > latest and (up_to is None or migration.id <= up_to):
            await _apply(conn, schema, migration)
    if up_to is None and latest <= latest_known_migration():
        try:
            await refresh_own_bodies(conn, schema)
        except asyncpg.PostgresError as exc:
            # e.g. a role that does not own the functions: the old body keeps working
            log.warning(
                "could not update kongtask's function bodies in schema %s (%s: %s); the "
                "fixes of this release are missing until a role that owns them runs migrate",
                quote_ident(schema),
                type(exc).__name__,
                exc,
            )


async def check_schema_connection(
    conn: asyncpg.Connection, schema: str | None = None
) -> SchemaStatus:
    """Read the schema's migration state and refuse a too-new one (asyncio side).

    Logs the non-breaking warning when the database is newer but compatible.

    Raises:
      SchemaTooNewError: the database holds a breaking migration newer than kongtask knows.
      MigrationError: PostgreSQL is older than 12.
      KongtaskError: the schema is not installed.
    """
    schema = resolve_schema(schema)
    try:
        status = await _read_status(conn, schema)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        # The raw text ('relation "x.migrations" does not exist') hides the fix.
        raise schema_not_installed(schema) from None
    _check_status(status)
    return status


async def migrate(db: Database, schema: str | None = None) -> None:
    """Install or upgrade graphile-worker's schema (migrations 1..20) in ``schema``.

    Safe to run concurrently from many processes, Node graphile-worker included.

    Args:
      db: an open :class:`~kongtask._pg.Database`.
      schema: the schema name; ``None`` means ``GRAPHILE_WORKER_SCHEMA`` or ``graphile_worker``.

    Raises:
      ConfigError: the schema name is unusable.
      SchemaTooNewError: the database has a breaking migration newer than kongtask knows
        (the CLI exits with code 57).
      MigrationError: PostgreSQL is older than 12, or a migration failed (rolled back).
    """
    schema = resolve_schema(schema)
    if await db.with_own_connection(_up_to_date, schema):
        return
    await db.with_connection(migrate_connection, schema)


async def _up_to_date(conn: asyncpg.Connection, schema: str) -> bool:
    """Whether there is nothing to migrate: one read-only statement (asyncio side).

    The usual start of a worker finds the schema at the newest migration with this
    release's function bodies; this answers that in one round trip, without the
    transaction and table lock that :func:`refresh_own_bodies` takes to change a body.
    Anything else (no schema yet, an older or newer one, a stale body, an error) is left
    to :func:`migrate_connection`, which reads the state again and does the work.
    """
    q = quote_ident(schema)
    try:
        row = await conn.fetchrow(
            f"""
            select
              current_setting('server_version_num')::int as server_version_num,
              (select id from {q}.migrations order by id desc limit 1) as latest,
              array(
                select ({_own_body_query("f.name")})
                from unnest($2::text[]) with ordinality as f(name, n) order by f.n
              ) as bodies
            """,
            schema,
            list(OWN_BODY_FUNCTIONS),
        )
    except asyncpg.PostgresError:
        return False
    assert row is not None
    if row["server_version_num"] < MIN_SERVER_VERSION_NUM:
        return False
    if row["latest"] != latest_known_migration():
        return False
    for name, current in zip(OWN_BODY_FUNCTIONS, row["bodies"], strict=True):
        wanted = own_function_statement(name)[1].replace(SCHEMA_PLACEHOLDER, q)
        if _is_stale_own_body(current, wanted, q):
            return False
    return True


async def check_schema(db: Database, schema: str | None = None) -> SchemaStatus:
    """Refuse to run against a schema with a newer breaking migration (for worker start-up).

    Returns:
      The :class:`SchemaStatus` read from the database.

    Raises:
      SchemaTooNewError: the database holds a breaking migration newer than kongtask knows.
    """
    schema = resolve_schema(schema)
    return await db.with_own_connection(check_schema_connection, schema)


def migrate_sync(dsn: str, schema: str | None = None) -> None:
    """Blocking :func:`migrate` on a plain asyncio loop (for fixtures and scripts).

    ``import trio_asyncio`` replaces asyncio's default loop
    (docs/design/stack.md#trio-asyncio-replaces-the-default-loop), so this asks for a real
    :class:`asyncio.SelectorEventLoop` explicitly.
    """
    schema = resolve_schema(schema)

    async def run() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(dsn))
        try:
            await migrate_connection(conn, schema)
        finally:
            await conn.close()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(run())
