"""The ``kongtask`` command line: ``main(argv)`` is async, ``run_cli()`` is the console script."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from ._config import resolve_dsn, resolve_schema
from ._errors import KongtaskError
from ._version import __version__

log = logging.getLogger("kongtask")

Verb = Callable[[argparse.Namespace], Awaitable[int]]


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--connection",
        help="PostgreSQL connection string (default: $DATABASE_URL, then libpq's PG* variables)",
    )
    parser.add_argument(
        "-s",
        "--schema",
        help="schema name (default: $GRAPHILE_WORKER_SCHEMA, then graphile_worker)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kongtask",
        description="A PostgreSQL job queue for trio that speaks graphile-worker's schema.",
    )
    parser.add_argument("--version", action="version", version=f"kongtask {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("KONGTASK_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log (default: INFO, or $KONGTASK_LOG_LEVEL)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    migrate = verbs.add_parser("migrate", help="install or upgrade the schema, then exit")
    _add_connection_options(migrate)
    migrate.add_argument("--silent", action="store_true", help="print nothing on success")
    migrate.set_defaults(func=_migrate_verb)

    from ._cli_client import add_client_verbs

    add_client_verbs(verbs, _add_connection_options)

    from ._cli_cron import add_cron_verbs

    add_cron_verbs(verbs, _add_connection_options)

    from ._cli_run import add_run_verbs

    add_run_verbs(verbs, _add_connection_options)
    return parser


async def _migrate_verb(args: argparse.Namespace) -> int:
    from ._migrate import migrate
    from ._pg import open_database

    schema = resolve_schema(args.schema)
    async with open_database(resolve_dsn(args.connection), max_size=1) as db:
        await migrate(db, schema)
    if not args.silent:
        print(f"Schema {schema!r} is up to date")
    return 0


def _one_line(record: logging.LogRecord) -> bool:
    """Fold a log record's traceback into its message.

    asyncpg's pool logs a full traceback each time it fails to reconnect (a database
    restart prints dozens); the exception's type and text say all an operator needs.
    """
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    ``trio.run(kongtask.main)`` works. Expected failures print one line on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("asyncpg.pool").addFilter(_one_line)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = await args.func(args)
        return code
    except KongtaskError as exc:
        print(f"kongtask: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ConnectionError) as exc:
        print(f"kongtask: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        import asyncpg

        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            print(f"kongtask: database error: {exc}", file=sys.stderr)
            return 1
        raise


def run_cli() -> None:
    """Console-script entry point."""
    sys.exit(trio.run(main))
