"""Checks of the values users give kongtask, with one message for each kind of mistake.

Every public entry point (the client, the producers, cron items, settings) checks its
arguments here before anything is sent, so a bad value fails the same way everywhere.
Each check returns the value it accepted and raises :class:`~kongtask.ConfigError` (or the
subclass given as ``error``) naming what was wrong.

This module imports no database driver and neither trio nor asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final, Literal

from ._errors import ConfigError

#: How ``add_job`` treats an existing job with the same key (graphile-worker's
#: ``job_key_mode``).
JobKeyMode = Literal["replace", "preserve_run_at", "unsafe_dedupe"]
#: The modes a cron item may use: a scheduled job never uses ``unsafe_dedupe``.
CronJobKeyMode = Literal["replace", "preserve_run_at"]

JOB_KEY_MODES: Final = ("replace", "preserve_run_at", "unsafe_dedupe")
CRON_JOB_KEY_MODES: Final = ("replace", "preserve_run_at")

SMALLINT_MIN: Final = -32768
SMALLINT_MAX: Final = 32767
BIGINT_MIN: Final = -(2**63)
BIGINT_MAX: Final = 2**63 - 1
MAX_NAME_LENGTH: Final = 128  # tasks_identifier_check, job_queues_queue_name_check
MAX_KEY_LENGTH: Final = 512  # jobs_key_check

# PostgreSQL truncates identifiers at NAMEDATALEN - 1 bytes.
MAX_IDENTIFIER_BYTES: Final = 63


def validate_identifier(name: str, *, what: str = "identifier") -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a string, not {type(name).__name__}")
    if name == "":
        raise ConfigError(f"{what} must not be empty")
    if "\x00" in name:
        raise ConfigError(f"{what} {name!r} contains a NUL character, which PostgreSQL cannot hold")
    size = len(name.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"{what} {name!r} is {size} bytes long; PostgreSQL identifiers hold at most "
            f"{MAX_IDENTIFIER_BYTES} bytes"
        )
    return name


def check_job_key_mode(mode: object) -> str | None:
    if mode is None or (isinstance(mode, str) and mode in JOB_KEY_MODES):
        return mode
    raise ConfigError(f"job_key_mode must be one of {', '.join(JOB_KEY_MODES)}, not {mode!r}")


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise ConfigError(
            f"{what} {value!r} contains a NUL character, which PostgreSQL cannot hold"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {value!r} is not valid Unicode (lone surrogate)") from None
    return value


def check_name(value: object, what: str) -> str:
    name = check_text(value, what)
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    return name


def check_int(
    value: object, what: str, low: int, high: int, *, error: type[ConfigError] = ConfigError
) -> int:
    # bool is an int subclass; True as a priority is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{what} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise error(f"{what} must be between {low} and {high}, not {value}")
    return value


def check_smallint(value: int | None, what: str) -> int | None:
    return None if value is None else check_int(value, what, SMALLINT_MIN, SMALLINT_MAX)


def check_max_attempts(value: int | None, what: str) -> int | None:
    return None if value is None else check_int(value, what, 1, SMALLINT_MAX)


def check_aware(value: object, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise ConfigError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(
            f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc)); "
            "a naive datetime is ambiguous"
        )
    try:
        value.astimezone(UTC)
    except OverflowError:
        # e.g. 0001-01-01 00:00 at +01:00 is in year 0 in UTC: stored, it could not be
        # read back as a datetime (it would read as datetime.min)
        raise ConfigError(
            f"{what} {value.isoformat()} is outside the range a datetime can hold in UTC "
            "(years 1 to 9999)"
        ) from None
    return value


def check_ids(ids: Iterable[int]) -> list[int]:
    return [check_int(job_id, "job id", BIGINT_MIN, BIGINT_MAX) for job_id in ids]
