"""``kongtask run`` at start: wait for a database that is not reachable yet.

Under an orchestrator the worker often starts before (or while) PostgreSQL does. Errors
that mean "not reachable yet" (refused or reset connections, unresolvable hosts,
timeouts, "the database system is starting up", too many connections) are retried with
capped exponential backoff until ``give_up_after`` seconds have passed, one log line per
retry; anything else (a wrong password, a missing database) fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import trio

from ._errors import KongtaskError
from ._pg import open_database

log = logging.getLogger("kongtask")

T = TypeVar("T")

FIRST_DELAY = 0.5
MAX_DELAY = 10.0

# class 08: connection exceptions; 57P03: cannot_connect_now (starting up, shutting
# down, in recovery); 53300: too_many_connections
_UNREACHABLE_SQLSTATES = frozenset({"57P03", "53300"})


class DatabaseUnreachable(KongtaskError):
    """The database could not be reached within ``--connect-timeout``."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the server is not reachable (yet), rather than refusing us."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        return state in _UNREACHABLE_SQLSTATES or state.startswith("08")
    return isinstance(exc, OSError | TimeoutError | trio.TooSlowError)


def backoff_delays() -> Iterator[float]:
    """0.5 s, 1 s, 2 s, ... doubling up to :data:`MAX_DELAY`, then that forever."""
    delay = FIRST_DELAY
    while True:
        yield delay
        delay = min(delay * 2, MAX_DELAY)


async def retry_while_unreachable(attempt: Callable[[], Awaitable[T]], give_up_after: float) -> T:
    """``await attempt()``, again after each "unreachable" error until ``give_up_after`` s passed.

    Raises:
      DatabaseUnreachable: the last attempt's error, once the time is up (``give_up_after``
        0: after the first attempt).
      Exception: an error that does not mean "unreachable", at once.
    """
    deadline = trio.current_time() + give_up_after
    for number, delay in enumerate(backoff_delays(), start=1):
        try:
            with trio.fail_at(max(deadline, trio.current_time()) + MAX_DELAY):
                return await attempt()
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise DatabaseUnreachable(
                    f"cannot reach the database ({_describe(exc)}); gave up after "
                    f"{number} attempt(s) in {give_up_after:g} s (--connect-timeout)"
                ) from exc
            delay = min(delay, remaining)
            log.warning(
                "cannot reach the database (%s); retrying in %.1f s (attempt %d, giving up "
                "in %.1f s)",
                _describe(exc),
                delay,
                number,
                remaining,
            )
            await trio.sleep(delay)
    raise AssertionError("unreachable")  # backoff_delays() never ends


def _describe(exc: BaseException) -> str:
    text = str(exc) or "no message"
    return f"{type(exc).__name__}: {text}"


async def wait_for_database(
    dsn: str | None, give_up_after: float, *, prepared_statements: bool = True
) -> None:
    """Return once a connection to ``dsn`` answers ``select 1`` (see the module doc)."""

    async def probe() -> None:
        async with open_database(dsn, max_size=1, prepared_statements=prepared_statements) as db:
            await db.execute("select 1")

    await retry_while_unreachable(probe, give_up_after)
