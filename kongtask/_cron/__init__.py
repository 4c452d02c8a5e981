"""Recurring jobs: graphile-worker's crontab format and a scheduler that shares its protocol.

Parsing follows graphile-worker's crontab format (docs/cron.md), scheduling its protocol
(docs/design/database.md#cron). Any number of kongtask and
Node graphile-worker processes may run the same crontab against one database: each
(identifier, minute) is claimed in ``known_crontabs`` by one statement that also adds
the job, so exactly one job is made per item per minute.

Time is matched in UTC, like graphile-worker. :class:`CronItem` has a Python-only
``tz`` option that matches the pattern against local wall-clock time instead; see
:class:`CronItem` for what that means at DST changes.

- ``_parse``: the time fields and patterns, options, payloads, fills and :class:`CrontabError`.
- ``_js``: JSON, numbers and timestamps exactly as JavaScript writes them.
- ``_items``: :class:`CronItem` and which minutes it is due.
- ``_crontab``: crontab text and files into items.
- ``_scheduler``: the scheduling loop, its backends and :func:`run_cron_scheduler`.
"""

from ._crontab import crontab as crontab, load_crontab_file as load_crontab_file
from ._items import (
    MINUTE as MINUTE,
    CronItem as CronItem,
    Matcher as Matcher,
    check_unique_identifiers as check_unique_identifiers,
)
from ._js import format_ts as format_ts, js_json as js_json
from ._parse import (
    CrontabError as CrontabError,
    _parse_pattern as _parse_pattern,
    format_fill as format_fill,
    parse_fill as parse_fill,
)
from ._scheduler import (
    CronBackend as CronBackend,
    CronScheduler as CronScheduler,
    KnownCrontab as KnownCrontab,
    PgCronBackend as PgCronBackend,
    run_cron_scheduler as run_cron_scheduler,
    utc_now as utc_now,
)

__all__ = [
    "CronItem",
    "CrontabError",
    "crontab",
    "load_crontab_file",
    "run_cron_scheduler",
]
