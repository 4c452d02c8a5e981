"""Recurring jobs: graphile-worker's crontab format and a scheduler that shares its protocol.

Parsing follows graphile-worker's crontab format (docs/cron.md), scheduling its protocol
(docs/design/database.md#cron). Any number of kongtask and
Node graphile-worker processes may run the same crontab against one database: each
(identifier, minute) is claimed in ``known_crontabs`` by one statement that also adds
the job, so exactly one job is made per item per minute.

Time is matched in UTC, like graphile-worker. :class:`CronItem` has a Python-only
``tz`` option that matches the pattern against local wall-clock time instead; see
:class:`CronItem` for what that means at DST changes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from os import PathLike
from typing import Any, Protocol
from urllib.parse import unquote_plus
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import json5
import trio

from ._cron_sql import CronQueries
from ._errors import ConfigError
from ._job import JSONValue
from ._pg import Database
from ._validate import (
    CRON_JOB_KEY_MODES,
    MAX_KEY_LENGTH,
    MAX_NAME_LENGTH,
    SMALLINT_MAX,
    SMALLINT_MIN,
    CronJobKeyMode,
    check_int,
    validate_identifier,
)

log = logging.getLogger("kongtask.cron")

__all__ = [
    "CronItem",
    "CrontabError",
    "crontab",
    "load_crontab_file",
    "run_cron_scheduler",
]

MINUTE = timedelta(minutes=1)

#: A late timer catches up missed minutes one by one (``backfilled: false``) when it is at
#: most this far behind; further behind (a big forward clock jump, a long suspend) it is
#: treated like a restart: each item catches up only as far as its ``fill`` allows.
#: Without a bound, a clock that leaps a year ahead would add half a million jobs per item.
MAX_CATCH_UP = timedelta(hours=1)
#: Longest single sleep; the wall clock is re-read at least this often, so a clock step
#: during a long wait is noticed.
MAX_SLEEP = 120.0
#: Timers are armed this long after the minute boundary, so a wall clock read on wake-up
#: is already in the new minute.
TIMER_SLACK = 0.001
#: A timer firing earlier than this (by the wall clock) is logged as a clock step back.
EARLY_WARNING = 1.0
BACKOFF_START = 0.2
BACKOFF_FACTOR = 1.5
BACKOFF_MAX = 60.0

Matcher = Callable[[datetime], bool]


class CrontabError(ConfigError):
    """A crontab line or a :class:`CronItem` is not valid.

    Attributes:
      reason: what is wrong and what was expected.
      line: the 1-based line number, or ``None`` for an item defined in code.
      column: the 1-based column in that line (or in the ``match`` pattern), or ``None``.
      source: the file name, or ``None``.
    """

    def __init__(
        self,
        reason: str,
        *,
        line: int | None = None,
        column: int | None = None,
        source: str | None = None,
    ) -> None:
        self.reason = reason
        self.line = line
        self.column = column
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.source is not None:
            where.append(self.source)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"crontab {', '.join(where)}: {self.reason}" if where else self.reason


# ---------------------------------------------------------------------------------------
# Time fields


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int  # inclusive; day of week accepts 7 as an alias of 0


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12),
    _Field("day of week", 0, 6),
)
_FIELD_CHARS = frozenset("0123456789*/,-")


def _parse_field(text: str, spec: _Field, column: int) -> frozenset[int]:
    """One time field: a comma list of ``N``, ``a-b`` (b > a), ``*`` and ``*/n``.

    ``column`` is where ``text`` starts; errors point at the offending character or part.
    """
    dow = spec.name == "day of week"
    top = 7 if dow else spec.high
    allowed = f"{spec.low}-{top}" + (" (7 is Sunday, like 0)" if dow else "")
    for i, ch in enumerate(text):
        if ch not in _FIELD_CHARS:
            hint = " (names such as MON or JAN are not supported)" if ch.isalpha() else ""
            hint = " ('@' shortcuts such as @daily are not supported)" if ch == "@" else hint
            raise CrontabError(
                f"unexpected {ch!r} in the {spec.name} field {text!r}: expected digits, "
                f"'*', '*/n', 'a-b' or a comma list of those{hint}",
                column=column + i,
            )
    values: set[int] = set()
    offset = 0
    for part in text.split(","):
        col = column + offset
        offset += len(part) + 1
        if part == "":
            raise CrontabError(
                f"empty entry in the {spec.name} field {text!r}: expected a number, 'a-b', "
                "'*' or '*/n' between the commas",
                column=col,
            )
        if part == "*":
            values.update(range(spec.low, spec.high + 1))
            continue
        m = re.fullmatch(r"\*/([0-9]+)", part)
        if m:
            step = int(m.group(1))
            if step < 1:
                raise CrontabError(
                    f"step {part!r} in the {spec.name} field: expected '*/n' with n >= 1",
                    column=col + 2,
                )
            values.update(range(spec.low, spec.high + 1, step))
            continue
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            what = (
                "steps on ranges ('a-b/n') are not supported; use '*/n' or a list"
                if re.fullmatch(r"[0-9]+-[0-9]+/[0-9]+", part)
                else "expected a number, 'a-b', '*' or '*/n'"
            )
            raise CrontabError(f"invalid {spec.name} entry {part!r}: {what}", column=col)
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else None
        for value, vcol in ((a, col), (b, col + len(m.group(1)) + 1)):
            if value is not None and not spec.low <= value <= top:
                raise CrontabError(
                    f"{spec.name} {value} is out of range: expected {allowed}", column=vcol
                )
        if b is None:
            values.add(0 if dow and a == 7 else a)
            continue
        if b <= a:
            raise CrontabError(
                f"invalid {spec.name} range {part!r}: expected 'a-b' with b greater than a",
                column=col,
            )
        values.update(0 if dow and v == 7 else v for v in range(a, b + 1))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class _Pattern:
    """A parsed five-field pattern; :meth:`matches` takes a wall-clock time."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    def day_matches(self, t: datetime) -> bool:
        if t.month not in self.months:
            return False
        # "Restricted" means smaller than the full set, so '*/1' and '1-31' are not.
        dom_restricted = len(self.days) < 31
        dow_restricted = len(self.weekdays) < 7
        dom = t.day in self.days
        dow = (t.weekday() + 1) % 7 in self.weekdays
        if dom_restricted and dow_restricted:
            return dom or dow
        if dom_restricted:
            return dom
        if dow_restricted:
            return dow
        return True

    def matches(self, t: datetime) -> bool:
        return t.minute in self.minutes and t.hour in self.hours and self.day_matches(t)


def _parse_pattern(text: str, column: int = 1) -> _Pattern:
    """Parse ``MIN HOUR DOM MON DOW`` (whitespace-separated) starting at ``column``."""
    sets: list[frozenset[int]] = []
    for m in re.finditer(r"\S+", text):
        if len(sets) == 5:
            raise CrontabError(
                f"unexpected {m.group()!r} after the five time fields: expected nothing more",
                column=column + m.start(),
            )
        sets.append(_parse_field(m.group(), _FIELDS[len(sets)], column + m.start()))
    if len(sets) < 5:
        raise CrontabError(
            f"expected 5 time fields (minute hour day-of-month month day-of-week), "
            f"found {len(sets)}",
            column=column + len(text.rstrip()),
        )
    return _Pattern(*sets)


# ---------------------------------------------------------------------------------------
# Options and payload

_TASK_RE = re.compile(r"[_a-zA-Z][_a-zA-Z0-9:/_-]*")
_ID_RE = re.compile(r"[_a-zA-Z][-_a-zA-Z0-9]*")
_FILL_RE = re.compile(r"(?:[0-9]+[smhdw])+")
_QUEUE_RE = re.compile(r"[-a-zA-Z0-9_:]+")
_FILL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_OPTION_KEYS = ("id", "fill", "max", "queue", "priority", "jobKey", "jobKeyMode")


def parse_fill(text: str) -> timedelta:
    """A ``fill`` value such as ``4w3d2h1m`` as a :class:`~datetime.timedelta`.

    Raises:
      CrontabError: ``text`` is not one or more ``<digits><s|m|h|d|w>`` groups.
    """
    if not _FILL_RE.fullmatch(text):
        raise CrontabError(
            f"invalid fill {text!r}: expected a duration such as 30m, 1h or 4w3d2h1m "
            "(units s, m, h, d, w)"
        )
    return timedelta(
        seconds=sum(int(n) * _FILL_UNITS[u] for n, u in re.findall(r"([0-9]+)([smhdw])", text))
    )


def format_fill(fill: timedelta) -> str:
    """``fill`` in crontab notation (``1h30m``); the inverse of :func:`parse_fill`."""
    seconds = int(fill.total_seconds())
    parts = []
    for unit in "wdhms":
        count, seconds = divmod(seconds, _FILL_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _validate_task(task: object) -> str:
    if not isinstance(task, str) or not _TASK_RE.fullmatch(task):
        raise CrontabError(
            f"invalid task identifier {task!r}: expected a letter or '_' followed by letters, "
            "digits, '_', '-', ':' or '/'"
        )
    if len(task) > MAX_NAME_LENGTH:
        raise CrontabError(
            f"task identifier is {len(task)} characters long: expected at most {MAX_NAME_LENGTH}"
        )
    return task


def _validate_cron_id(identifier: object) -> str:
    if not isinstance(identifier, str) or not _ID_RE.fullmatch(identifier):
        raise CrontabError(
            f"invalid cron identifier {identifier!r}: expected a letter or '_' followed by "
            "letters, digits, '_' or '-'"
        )
    return identifier


# ---------------------------------------------------------------------------------------
# JSON exactly as JavaScript's JSON.stringify writes it. The payload column is ``json``,
# which keeps the text verbatim, so this makes a kongtask-scheduled job byte-identical
# to the one Node would add for the same crontab line.

_SURROGATE = re.compile("[\ud800-\udfff]")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")


def _js_number(x: float) -> str:
    """ECMAScript ``Number::toString`` (what JSON.stringify prints for a number)."""
    if not math.isfinite(x):
        return "null"  # JSON.stringify(Infinity) and NaN give null
    if x == 0:
        return "0"  # -0 too
    if x < 0:
        return "-" + _js_number(-x)
    # repr gives the shortest round-tripping digits, as ECMAScript requires.
    mantissa, _, exp = repr(x).partition("e")
    int_part, _, frac = mantissa.partition(".")
    all_digits = int_part + frac
    point = len(int_part) + (int(exp) if exp else 0)
    stripped = all_digits.lstrip("0")
    n = point - (len(all_digits) - len(stripped))
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    sign = "+" if e > 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(e)}"


def _js_key_order(keys: Iterable[str]) -> list[str]:
    # JavaScript objects list integer-like keys first, ascending, then the rest in
    # insertion order; JSON5.parse builds such an object, so Node's text follows it.
    keys = list(keys)
    index = sorted((k for k in keys if _ARRAY_INDEX.fullmatch(k) and int(k) < 2**32 - 1), key=int)
    chosen = set(index)
    return index + [k for k in keys if k not in chosen]


def _js_string(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)
    # Well-formed JSON.stringify escapes lone surrogates; json.dumps would leave them raw.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)


def js_json(value: JSONValue) -> str:
    """``value`` as JSON text, exactly as ``JSON.stringify`` would write it.

    Raises:
      TypeError: ``value`` holds something JSON cannot (a set, bytes, a non-str key...).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        # A JS number is a double: larger integers lose precision the same way there.
        return str(value) if abs(value) <= 2**53 else _js_number(float(value))
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, str):
        return _js_string(value)
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, not {type(k).__name__}")
        return (
            "{"
            + ",".join(f"{_js_string(k)}:{js_json(value[k])}" for k in _js_key_order(value))
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(js_json(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def format_ts(ts: datetime) -> str:
    """``ts`` like JavaScript's ``toISOString()``: ``2026-01-31T04:00:00.000Z``."""
    t = ts.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------------------
# CronItem


@dataclass(frozen=True, slots=True)
class CronItem:
    """One recurring job: when it runs, which task, and the job's options.

    Make items from crontab text with :func:`crontab`, or directly::

        CronItem("*/5 * * * *", "send_digest", payload={"all": True},
                 fill=timedelta(hours=1))

    Attributes:
      match: a five-field pattern (``MIN HOUR DOM MON DOW``, as in a crontab line) or a
        predicate called with each minute as an aware datetime (UTC, or in ``tz``).
      task: the task identifier of the jobs.
      identifier: the key in ``known_crontabs`` (default: ``task``); unique per crontab.
      payload: a JSON object; each job gets it plus ``_cron: {ts, backfilled}``.
      fill: how far back to backfill missed runs after downtime (default: none).
      max_attempts: the jobs' ``max_attempts`` (default: the database's 25).
      queue_name: the jobs' named queue (default: none).
      priority: the jobs' priority (default 0).
      job_key: the jobs' ``job_key`` (default: none).
      job_key_mode: ``"replace"`` or ``"preserve_run_at"``; defaults to ``"replace"``
        when ``job_key`` is set.
      tz: Python API only: an IANA zone name (``"Europe/Berlin"``). The pattern is then
        matched against local wall-clock time, still at each real (UTC) minute, and the
        ``_cron.ts`` stays UTC. At a DST change this means: a local time skipped by the
        spring-forward jump never occurs, so an item due only then does not run that
        day; a local time repeated by the fall-back jump occurs twice, at two different
        UTC minutes, so an item due then runs twice. Interval patterns (``*/5 * * * *``)
        keep their real-time spacing. Node rejects this key, so it cannot appear in a
        crontab file.
    """

    match: str | Matcher
    task: str
    _: KW_ONLY
    identifier: str | None = None
    payload: Mapping[str, JSONValue] | None = None
    fill: timedelta = timedelta(0)
    max_attempts: int | None = None
    queue_name: str | None = None
    priority: int | None = None
    job_key: str | None = None
    job_key_mode: CronJobKeyMode | None = None
    tz: str | None = None
    _pattern: _Pattern | None = field(init=False, repr=False, compare=False)
    _zone: ZoneInfo | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.match, str):
            pattern: _Pattern | None = _parse_pattern(self.match)
        elif callable(self.match):
            pattern = None
        else:
            raise CrontabError(
                f"match must be a pattern string or a callable, not {type(self.match).__name__}"
            )
        object.__setattr__(self, "_pattern", pattern)
        _validate_task(self.task)
        ident = self.task if self.identifier is None else _validate_cron_id(self.identifier)
        object.__setattr__(self, "identifier", ident)
        if self.payload is not None and not isinstance(self.payload, Mapping):
            raise CrontabError(f"payload must be a JSON object (a mapping), not {self.payload!r}")
        try:
            js_json(dict(self.payload or {}))
        except TypeError as exc:
            raise CrontabError(f"payload is not JSON-serialisable: {exc}") from None
        if not isinstance(self.fill, timedelta) or self.fill < timedelta(0):
            raise CrontabError(f"fill {self.fill!r}: expected a timedelta of zero or more")
        if self.max_attempts is not None:
            check_int(self.max_attempts, "max_attempts", 1, SMALLINT_MAX, error=CrontabError)
        if self.priority is not None:
            check_int(self.priority, "priority", SMALLINT_MIN, SMALLINT_MAX, error=CrontabError)
        if self.queue_name is not None and (
            not isinstance(self.queue_name, str)
            or not _QUEUE_RE.fullmatch(self.queue_name)
            or len(self.queue_name) > MAX_NAME_LENGTH
        ):
            raise CrontabError(
                f"invalid queue name {self.queue_name!r}: expected 1 to {MAX_NAME_LENGTH} "
                "letters, digits, '-', '_' or ':'"
            )
        if self.job_key is not None and (
            not isinstance(self.job_key, str) or not 1 <= len(self.job_key) <= MAX_KEY_LENGTH
        ):
            raise CrontabError(
                f"job_key {self.job_key!r}: expected a string of 1 to {MAX_KEY_LENGTH} characters"
            )
        if self.job_key_mode not in (None, *CRON_JOB_KEY_MODES):
            raise CrontabError(
                f"job_key_mode {self.job_key_mode!r}: expected 'replace' or 'preserve_run_at' "
                "(cron jobs cannot use 'unsafe_dedupe')"
            )
        zone = None
        if self.tz is not None:
            try:
                zone = ZoneInfo(self.tz)
            except (ZoneInfoNotFoundError, ValueError, TypeError):
                raise CrontabError(
                    f"unknown time zone {self.tz!r}: expected an IANA name such as 'Europe/Berlin'"
                ) from None
        object.__setattr__(self, "_zone", zone)

    @property
    def cron_id(self) -> str:
        """The identifier in ``known_crontabs`` (``identifier``, else ``task``)."""
        return self.identifier or self.task

    def local_time(self, ts: datetime) -> datetime:
        """``ts`` as the wall-clock time the pattern is matched against (UTC, or ``tz``)."""
        return ts.astimezone(self._zone or UTC)

    def matches(self, ts: datetime) -> bool:
        """Whether the item is due at the minute ``ts`` (an aware datetime)."""
        local = self.local_time(ts)
        if self._pattern is not None:
            return self._pattern.matches(local)
        assert callable(self.match)
        return bool(self.match(local))

    def next_runs(
        self, after: datetime, count: int = 3, *, horizon_days: int = 366 * 5
    ) -> list[datetime]:
        """The next ``count`` minutes (UTC, strictly after ``after``) the item is due.

        Searches at most ``horizon_days`` ahead; a pattern that never matches (such as
        ``0 0 31 2 *``) returns fewer. Days that cannot match are skipped whole.
        """
        out: list[datetime] = []
        ts = _floor_minute(after) + MINUTE
        end = ts + timedelta(days=horizon_days)
        while ts < end and len(out) < count:
            local = self.local_time(ts)
            if self._pattern is not None and not self._pattern.day_matches(local):
                # Jump to the next local midnight (at least one minute on).
                midnight = (local + timedelta(days=1)).replace(
                    hour=0, minute=0, second=0, microsecond=0
                )
                ts = max(ts + MINUTE, _floor_minute(midnight.astimezone(UTC)))
                continue
            if self.matches(ts):
                out.append(ts)
            ts += MINUTE
        return out

    def job_payload(self, ts: datetime, *, backfilled: bool) -> str:
        """The JSON text of the job for minute ``ts``: the payload plus ``_cron``.

        ``_cron`` replaces a user key of that name but keeps its position, as the object
        spread in Node does, so the text is byte-identical to Node's.
        """
        # Encoded afresh each time, so a payload mapping changed after the item was made
        # is still written as it is now.
        return js_json(
            {**(self.payload or {}), "_cron": {"ts": format_ts(ts), "backfilled": backfilled}}
        )

    @property
    def effective_job_key_mode(self) -> CronJobKeyMode | None:
        """``job_key_mode``, defaulting to ``"replace"`` when there is a ``job_key``."""
        if self.job_key is None:
            return self.job_key_mode
        return self.job_key_mode or "replace"


def check_unique_identifiers(items: Sequence[CronItem]) -> None:
    """Raise :class:`CrontabError` when two items share an identifier."""
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, CronItem):
            raise CrontabError(f"crontab entry {i} is {type(item).__name__}, not CronItem")
        if item.cron_id in seen:
            raise CrontabError(
                f"duplicate cron identifier {item.cron_id!r} (items {seen[item.cron_id]} and {i}): "
                "give one of them its own identifier"
            )
        seen[item.cron_id] = i


# ---------------------------------------------------------------------------------------
# Crontab text


def _parse_options(text: str, column: int) -> dict[str, str]:
    """``key=value&...`` as URLSearchParams reads it (``+`` and ``%XX`` decoded)."""
    found: dict[str, str] = {}
    offset = 0
    for pair in text.split("&"):
        col = column + offset
        offset += len(pair) + 1
        if pair == "":
            continue  # URLSearchParams skips empty pairs
        raw_key, _, raw_value = pair.partition("=")
        key, value = unquote_plus(raw_key), unquote_plus(raw_value)
        if key not in _OPTION_KEYS:
            raise CrontabError(
                f"unknown option {key!r}: expected one of {', '.join(_OPTION_KEYS)}", column=col
            )
        if key in found:
            raise CrontabError(f"option {key!r} is given more than once", column=col)
        vcol = col + len(raw_key) + 1
        problem = None
        if key == "id" and not _ID_RE.fullmatch(value):
            problem = "expected a letter or '_' followed by letters, digits, '_' or '-'"
        elif key == "fill" and not _FILL_RE.fullmatch(value):
            problem = "expected a duration such as 30m, 1h or 4w3d2h1m (units s, m, h, d, w)"
        elif key == "max" and not (
            value.isascii() and value.isdigit() and 1 <= int(value) <= SMALLINT_MAX
        ):
            # Stricter than Node (which accepts 0 and then fails in add_job every minute).
            problem = f"expected an integer from 1 to {SMALLINT_MAX}"
        elif key == "queue" and not (_QUEUE_RE.fullmatch(value) and len(value) <= MAX_NAME_LENGTH):
            problem = f"expected 1 to {MAX_NAME_LENGTH} letters, digits, '-', '_' or ':'"
        elif key == "priority" and not (
            re.fullmatch(r"-?[0-9]+", value) and SMALLINT_MIN <= int(value) <= SMALLINT_MAX
        ):
            problem = f"expected an integer from {SMALLINT_MIN} to {SMALLINT_MAX}"
        elif key == "jobKey" and not 1 <= len(value) <= MAX_KEY_LENGTH:
            problem = f"expected 1 to {MAX_KEY_LENGTH} characters"
        elif key == "jobKeyMode" and value not in CRON_JOB_KEY_MODES:
            problem = "expected 'replace' or 'preserve_run_at'"
        if problem:
            raise CrontabError(f"invalid {key} value {value!r}: {problem}", column=vcol)
        found[key] = value
    return found


def _parse_payload(text: str, column: int) -> dict[str, JSONValue]:
    try:
        value = json5.loads(text)
    except ValueError as exc:
        msg = str(exc)
        m = re.search(r"at column (\d+)", msg)
        col = column + int(m.group(1)) - 1 if m else column
        detail = re.sub(r" at column \d+$", "", re.sub(r"^<string>:\d+ ", "", msg))
        raise CrontabError(f"invalid JSON5 payload: {detail}", column=col) from None
    if not isinstance(value, dict):
        raise CrontabError("the payload must be a JSON5 object ('{...}')", column=column)
    return value


def _parse_line(line: str) -> CronItem:
    """One non-comment crontab line (not trimmed; columns count from its first character)."""
    tokens = list(re.finditer(r"\S+", line))
    # Check the fields that are there first, so '@daily task' is blamed on the '@'.
    for i in range(min(5, len(tokens))):
        _parse_field(tokens[i].group(), _FIELDS[i], tokens[i].start() + 1)
    if len(tokens) < 6:
        name = [f.name for f in _FIELDS][len(tokens)] if len(tokens) < 5 else "task identifier"
        raise CrontabError(
            f"line ends early: expected the {name} field (a line is "
            "MIN HOUR DOM MON DOW TASK [?OPTIONS] [{PAYLOAD}])",
            column=len(line.rstrip()) + 1,
        )
    task_tok = tokens[5]
    try:
        task = _validate_task(task_tok.group())
    except CrontabError as exc:
        raise CrontabError(exc.reason, column=task_tok.start() + 1) from None
    options: dict[str, str] = {}
    rest = 6
    if rest < len(tokens) and tokens[rest].group().startswith("?"):
        tok = tokens[rest]
        if tok.group() == "?":
            raise CrontabError(
                "expected options after '?' (such as ?fill=1h&max=3)", column=tok.start() + 1
            )
        options = _parse_options(tok.group()[1:], tok.start() + 2)
        rest += 1
    payload: dict[str, JSONValue] | None = None
    if rest < len(tokens):
        tok = tokens[rest]
        if not tok.group().startswith("{"):
            raise CrontabError(
                f"unexpected {tok.group()!r}: expected '?options' or a JSON5 payload "
                "object '{...}' (options must come before the payload, without spaces)",
                column=tok.start() + 1,
            )
        payload = _parse_payload(line[tok.start() :].rstrip(), tok.start() + 1)
    mode = options.get("jobKeyMode")
    item = CronItem(
        " ".join(t.group() for t in tokens[:5]),
        task,
        identifier=options.get("id"),
        payload=payload,
        fill=parse_fill(options["fill"]) if "fill" in options else timedelta(0),
        max_attempts=int(options["max"]) if "max" in options else None,
        queue_name=options.get("queue"),
        priority=int(options["priority"]) if "priority" in options else None,
        job_key=options.get("jobKey"),
        job_key_mode="preserve_run_at"
        if mode == "preserve_run_at"
        else ("replace" if mode else None),
    )
    return item


def crontab(text: str, *, source: str | None = None) -> list[CronItem]:
    """Parse graphile-worker crontab text into :class:`CronItem` objects.

    Each line is ``MIN HOUR DOM MON DOW TASK [?OPTIONS] [{PAYLOAD}]``; blank lines and
    lines starting with ``#`` are skipped. See ``docs/cron.md``.

    Args:
      text: the crontab.
      source: a file name to put in error messages.

    Raises:
      CrontabError: a line is malformed or two lines share an identifier; the message
        names the line, the column and what was expected.
    """
    items: list[CronItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            item = _parse_line(line)
        except CrontabError as exc:
            raise CrontabError(exc.reason, line=number, column=exc.column, source=source) from None
        if item.cron_id in first_line:
            raise CrontabError(
                f"duplicate cron identifier {item.cron_id!r} (first used on line "
                f"{first_line[item.cron_id]}): add ?id=... to tell the lines apart",
                line=number,
                source=source,
            )
        first_line[item.cron_id] = number
        items.append(item)
    return items


def load_crontab_file(path: str | PathLike[str]) -> list[CronItem]:
    """Read and parse a crontab file (UTF-8).

    Raises:
      CrontabError: the file is malformed (the message names the file, line and column).
      OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return crontab(text, source=str(path))


# ---------------------------------------------------------------------------------------
# The scheduler


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _ceil_minute(t: datetime) -> datetime:
    floor = _floor_minute(t)
    return floor if floor == t else floor + MINUTE


def utc_now() -> datetime:
    """The default wall clock: the current time in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KnownCrontab:
    """A ``known_crontabs`` row."""

    identifier: str
    known_since: datetime
    last_execution: datetime | None


class CronBackend(Protocol):
    """Where the scheduler's decisions go: the database, or a recorder in timing tests."""

    async def register(
        self, identifiers: Sequence[str], start: datetime
    ) -> dict[str, KnownCrontab]:
        """Register unseen identifiers; return the rows of those seen before."""
        ...

    async def schedule(self, ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
        """Claim minute ``ts`` for ``items`` and add a job for each claim won."""
        ...


class PgCronBackend:
    """The real backend: the statements of :mod:`kongtask._cron_sql`."""

    def __init__(self, db: Database, schema: str) -> None:
        validate_identifier(schema, what="schema name")
        self._db = db
        self._queries = CronQueries(schema)
        #: How many jobs this backend added (the stress script and tests read it).
        self.jobs_added = 0

    async def register(
        self, identifiers: Sequence[str], start: datetime
    ) -> dict[str, KnownCrontab]:
        rows = await self._db.fetch(self._queries.register, list(identifiers), start)
        return {
            r["identifier"]: KnownCrontab(r["identifier"], r["known_since"], r["last_execution"])
            for r in rows
        }

    async def schedule(self, ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
        args = (
            ts,
            [i.cron_id for i in items],
            [i.task for i in items],
            [i.job_payload(ts, backfilled=backfilled) for i in items],
            [i.queue_name for i in items],
            [i.max_attempts for i in items],
            [i.job_key for i in items],
            [i.priority for i in items],
            [i.effective_job_key_mode for i in items],
        )
        ids = await self._db.run(_schedule_with_retry, self._db.pool, self._queries.schedule, args)
        self.jobs_added += len(ids)


async def _schedule_with_retry(pool: Any, sql: str, args: tuple[Any, ...]) -> list[int]:
    # asyncio side (one crossing). Two schedulers upserting several identifiers can
    # deadlock when a Node process locks them in another order; the victim simply
    # retries, and by then the winner's claims make the retry add nothing twice.
    for attempt in range(5):
        try:
            rows = await pool.fetch(sql, *args)
            return [r["id"] for r in rows]
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            if attempt == 4:
                raise
            log.info("cron: retrying a minute after %s", type(exc).__name__)
    raise AssertionError("unreachable")


class CronScheduler:
    """The scheduling loop (docs/design/database.md#cron) over a :class:`CronBackend`.

    ``wall_clock`` gives UTC time; trio time only measures the sleeps, which are derived
    from it. :func:`run_cron_scheduler` is the public entry point.
    """

    def __init__(
        self,
        items: Sequence[CronItem],
        backend: CronBackend,
        wall_clock: Callable[[], datetime] = utc_now,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.items = list(items)
        check_unique_identifiers(self.items)
        self._backend = backend
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._delay = BACKOFF_START
        #: Set once the first startup and backfill have finished and live scheduling began.
        self.live = trio.Event()
        #: How many times the loop restarted after an error.
        self.restarts = 0

    def _now(self) -> datetime:
        now = self._wall_clock()
        if now.tzinfo is None:
            raise ConfigError("the cron wall clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    async def run(self) -> None:
        """Run forever (until cancelled), restarting with backoff after any error."""
        while True:
            try:
                await self._run_once()
            except Exception as exc:
                # trio.Cancelled is a BaseException and passes through.
                wait = min(BACKOFF_MAX, self._delay * self._rng.uniform(0.75, 1.25))
                self._delay = min(BACKOFF_MAX, self._delay * BACKOFF_FACTOR)
                self.restarts += 1
                log.error("cron failed, restarting in %.2fs: %r", wait, exc, exc_info=exc)
                await trio.sleep(wait)

    async def _run_once(self) -> None:
        ts = await self._startup(self._now())
        self.live.set()
        while True:
            ts = await self._tick(ts)

    async def _startup(self, start: datetime) -> datetime:
        """Register identifiers and backfill; return the first live minute."""
        known = await self._backend.register([i.cron_id for i in self.items], start)
        self._delay = BACKOFF_START
        fills = [i.fill for i in self.items if i.cron_id in known and i.fill > timedelta(0)]
        if fills:
            ts = _ceil_minute(start - max(fills))
            while ts < start:
                due = []
                for item in self.items:
                    row = known.get(item.cron_id)
                    if row is None or item.fill < start - ts:
                        continue
                    # The minute of last_execution itself is done already (the upsert
                    # would refuse it), so start after it; known_since is inclusive.
                    if row.last_execution is not None:
                        fresh = ts > row.last_execution
                    else:
                        fresh = ts >= row.known_since
                    if fresh and item.matches(ts):
                        due.append(item)
                if due:
                    await self._backend.schedule(ts, due, True)
                ts += MINUTE
        return _ceil_minute(start)

    async def _tick(self, ts: datetime) -> datetime:
        """Wait for minute ``ts``, schedule it (and any missed ones); return the next."""
        while True:
            now = self._now()
            if now >= ts:
                break
            delay = (ts - now).total_seconds() + TIMER_SLACK
            await trio.sleep(min(delay, MAX_SLEEP))
            if delay <= MAX_SLEEP:
                after = self._now()
                if after < ts:
                    # NTP slewing makes the wall clock lag trio's clock by milliseconds;
                    # only a real step back deserves a warning. Either way: re-arm.
                    early = (ts - after).total_seconds()
                    log.log(
                        logging.WARNING if early > EARLY_WARNING else logging.DEBUG,
                        "cron timer fired %.3fs early (the wall clock went back); "
                        "re-arming for %s without scheduling",
                        early,
                        format_ts(ts),
                    )
        behind = _floor_minute(now) - ts
        if behind > MAX_CATCH_UP:
            log.warning(
                "cron timer is %s late (the wall clock jumped forward or the process was "
                "suspended); skipping to now and backfilling as after a restart",
                behind,
            )
            return await self._startup(now)
        if behind > timedelta(0):
            log.warning(
                "cron timer is %s late (the wall clock jumped forward or the process was "
                "paused); catching up %d missed minutes",
                behind,
                behind // MINUTE,
            )
        while ts <= now:
            due = [item for item in self.items if item.matches(ts)]
            if due:
                await self._backend.schedule(ts, due, False)
            self._delay = BACKOFF_START
            ts += MINUTE
            now = self._now()
        return ts


async def run_cron_scheduler(
    db: Database,
    schema: str,
    items: Sequence[CronItem],
    *,
    wall_clock: Callable[[], datetime] = utc_now,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Schedule ``items`` forever (until cancelled), sharing the work with other workers.

    Registers the identifiers in ``known_crontabs``, backfills missed minutes up to each
    item's ``fill``, then wakes at every minute boundary and adds the jobs due. Any
    number of kongtask and Node graphile-worker processes may run the same items on the
    same database: each item gets exactly one job per minute. Errors restart the
    scheduler (backfill included) after 200 ms, growing ×1.5 with jitter up to 60 s.

    Args:
      db: the database.
      schema: the graphile-worker schema.
      items: the crontab (identifiers must be unique).
      wall_clock: returns the current time as an aware datetime (tests move it).
      task_status: ``nursery.start`` support; reported started once the items are
        validated (before the first database round trip, so a down database does not
        block the caller).

    Raises:
      CrontabError: two items share an identifier (before reporting started).
    """
    scheduler = CronScheduler(items, PgCronBackend(db, schema), wall_clock)
    task_status.started()
    if not scheduler.items:
        await trio.sleep_forever()
    await scheduler.run()
