"""The ``cron`` CLI verb: ``kongtask cron list``.

Kept apart from ``_cli.py`` (which only registers it) so the cron code stays together.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime

from ._config import resolve_dsn, resolve_schema
from ._cron import CronItem, KnownCrontab, format_fill, format_ts, load_crontab_file, utc_now
from ._cron_sql import CronQueries
from ._errors import ConfigError
from ._pg import open_database
from ._settings import AddConnectionOptions


def add_cron_verbs(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser],
    add_connection_options: AddConnectionOptions,
) -> None:
    """Register ``cron list`` on the CLI's subparsers."""
    cron = verbs.add_parser("cron", help="inspect the crontab")
    actions = cron.add_subparsers(dest="cron_action", metavar="ACTION", required=True)
    lst = actions.add_parser(
        "list", help="each crontab item, its next run times and its last execution"
    )
    add_connection_options(lst)
    lst.add_argument(
        "--crontab", default="crontab", metavar="FILE", help="the crontab file (default ./crontab)"
    )
    lst.add_argument(
        "--next", type=int, default=3, metavar="N", help="how many next run times (default 3)"
    )
    lst.set_defaults(func=_list_verb)


def _describe_options(item: CronItem) -> str:
    opts = []
    if item.identifier != item.task:
        opts.append(f"id={item.identifier}")
    if item.fill:
        opts.append(f"fill={format_fill(item.fill)}")
    for name, value in (
        ("max", item.max_attempts),
        ("queue", item.queue_name),
        ("priority", item.priority),
        ("jobKey", item.job_key),
        ("jobKeyMode", item.job_key_mode),
        ("tz", item.tz),
    ):
        if value is not None:
            opts.append(f"{name}={value}")
    return " ".join(opts)


def render_cron_list(
    items: Sequence[CronItem],
    known: dict[str, KnownCrontab],
    now: datetime,
    count: int = 3,
) -> str:
    """The text ``kongtask cron list`` prints (times in UTC, ISO format)."""
    if not items:
        return "The crontab has no items.\n"
    lines = []
    for item in items:
        pattern = item.match if isinstance(item.match, str) else "<predicate>"
        opts = _describe_options(item)
        lines.append(f"{item.cron_id}: {pattern} {item.task}" + (f"  ({opts})" if opts else ""))
        runs = item.next_runs(now, count)
        lines.append("  next: " + (", ".join(format_ts(t) for t in runs) or "never"))
        row = known.get(item.cron_id)
        if row is None:
            last = "never (not registered yet)"
        elif row.last_execution is None:
            last = f"never (known since {format_ts(row.known_since)})"
        else:
            last = format_ts(row.last_execution)
        lines.append(f"  last execution: {last}")
    return "\n".join(lines) + "\n"


async def _list_verb(args: argparse.Namespace) -> int:
    try:
        items = load_crontab_file(args.crontab)
    except FileNotFoundError:
        raise ConfigError(f"crontab file {args.crontab!r} not found (use --crontab FILE)") from None
    if args.next < 0:
        raise ConfigError("--next must be 0 or more")
    schema = resolve_schema(args.schema)
    async with open_database(resolve_dsn(args.connection), max_size=1) as db:
        rows = await db.fetch(CronQueries(schema).known_crontabs)
    known = {
        r["identifier"]: KnownCrontab(r["identifier"], r["known_since"], r["last_execution"])
        for r in rows
    }
    print(render_cron_list(items, known, utc_now(), args.next), end="")
    return 0
