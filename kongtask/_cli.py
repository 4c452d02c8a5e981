"""The ``kongtask`` command line: ``main(argv)`` is async, ``run_cli()`` is the console script."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import asyncpg
import trio

from ._cli_client import add_client_verbs
from ._cli_cron import add_cron_verbs
from ._cli_dashboard import add_dashboard_verb
from ._cli_ops import add_ops_verbs
from ._cli_run import add_run_verbs
from ._config import resolve_dsn, resolve_schema
from ._errors import KongtaskError
from ._log_fallback import host_handles_kongtask_logs
from ._logging import configure_cli_logging, print_failure
from ._migrate import migrate
from ._pg import open_database
from ._settings import (
    COMMON_KEYS,
    CONNECTION,
    LOG_KEYS,
    SCHEMA,
    SettingsError,
    add_config_options,
    add_log_options,
    add_option,
    resolve_settings,
)
from ._version import __version__

log = logging.getLogger("kongtask")


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    """-c/-s, --config and the log options, resolved by ``kongtask._settings``."""
    add_option(parser, CONNECTION)
    add_option(parser, SCHEMA)
    add_config_options(parser)
    add_log_options(parser)
    parser.set_defaults(settings_keys=COMMON_KEYS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kongtask",
        description="A PostgreSQL job queue for trio that speaks graphile-worker's schema.",
    )
    parser.add_argument("--version", action="version", version=f"kongtask {__version__}")
    add_log_options(parser)  # here and after every verb
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    migrate = verbs.add_parser("migrate", help="install or upgrade the schema, then exit")
    _add_connection_options(migrate)
    migrate.add_argument("--silent", action="store_true", help="print and log nothing on success")
    migrate.set_defaults(func=_migrate_verb)

    add_client_verbs(verbs, _add_connection_options)

    add_cron_verbs(verbs, _add_connection_options)

    add_run_verbs(verbs, _add_connection_options)

    add_ops_verbs(verbs, _add_connection_options)

    add_dashboard_verb(verbs, _add_connection_options)
    return parser


async def _migrate_verb(args: argparse.Namespace) -> int:
    schema = resolve_schema(args.schema)
    migrate_log = logging.getLogger("kongtask.migrate")
    level = migrate_log.level
    if args.silent:
        migrate_log.setLevel(logging.WARNING)  # one INFO line per applied migration
    try:
        async with open_database(resolve_dsn(args.connection), max_size=1) as db:
            await migrate(db, schema)
    finally:
        migrate_log.setLevel(level)
    if not args.silent:
        print(f"Schema {schema!r} is up to date")
    return 0


async def main(argv: Sequence[str] | None = None) -> None:
    """The ``kongtask`` command, run with ``argv`` (default: ``sys.argv[1:]``).

    ``trio.run(kongtask.main)`` is the whole command: it returns when the command
    succeeds and raises :class:`SystemExit` with the command's exit status otherwise
    (2 for bad usage, 1 for an error, 57 for a too-new schema). Expected failures print
    one line on stderr. When the program has not configured logging, logs go to stderr
    at ``--log-level``; a program that configured logging keeps its configuration.
    """
    status = await _run_command(argv)
    if status:
        raise SystemExit(status)


async def _run_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # `run --processes N` starts its children with the same arguments
    try:
        # flag > environment > config file > default, checked before anything runs
        resolve_settings(args, getattr(args, "settings_keys", LOG_KEYS))
    except SettingsError as exc:
        print(f"kongtask: {exc}", file=sys.stderr)
        return exc.exit_code
    # a host program that gave kongtask's logger a handler keeps its configuration
    # (configure_cli_logging leaves a host's own root handlers alone by itself)
    if not host_handles_kongtask_logs():
        configure_cli_logging(args.log_level, args.log_format)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = await args.func(args)
        return code
    except KongtaskError as exc:
        print_failure(str(exc), args.log_format)
        return exc.exit_code
    except (OSError, ConnectionError) as exc:
        print_failure(f"cannot reach the database: {exc}", args.log_format)
        return 1
    except Exception as exc:
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            print_failure(f"database error: {exc}", args.log_format)
            return 1
        raise


def run_cli() -> None:
    """Console-script entry point."""
    trio.run(main)
