"""One recurring job (:class:`CronItem`): its checks, and which minutes it is due."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .._job import JSONValue
from .._validate import (
    CRON_JOB_KEY_MODES,
    MAX_KEY_LENGTH,
    MAX_NAME_LENGTH,
    SMALLINT_MAX,
    SMALLINT_MIN,
    CronJobKeyMode,
    check_int,
)
from ._js import format_ts, js_json
from ._parse import (
    _QUEUE_RE,
    CrontabError,
    _parse_pattern,
    _Pattern,
    _validate_cron_id,
    _validate_task,
)

MINUTE = timedelta(minutes=1)

Matcher = Callable[[datetime], bool]


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


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)
