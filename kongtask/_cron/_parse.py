"""Crontab pieces: the time fields and patterns, the options, the payload, and their errors.

Everything here reads graphile-worker's crontab format (docs/cron.md) and reports what is
wrong as a :class:`CrontabError` naming the column; ``_crontab`` puts the pieces of a line
together into a :class:`~kongtask._cron._items.CronItem`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import unquote_plus

import json5

from .._errors import ConfigError
from .._job import JSONValue
from .._validate import (
    CRON_JOB_KEY_MODES,
    MAX_KEY_LENGTH,
    MAX_NAME_LENGTH,
    SMALLINT_MAX,
    SMALLINT_MIN,
)


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
