"""A database outage in a pool's log: one warning when it starts, one line when it ends.

While the database is away (a restart, a network cut), every part of a pool that talks
to it fails and retries on its own: the LISTEN connection, the claims, the outcome
writes, the dead-pool checks. Logged one by one, a restart of a few seconds made about
twenty lines. The parts report here instead: the first failure logs a warning, later
ones log at DEBUG, and once every part that failed has succeeded again one line says
the pool reconnected.
"""

from __future__ import annotations

import logging

import asyncpg
import trio

from ._logging import pool_extra

# 08: connection exceptions; 57P01-57P03: the server is shutting down, crashed, starting
_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be reached (rather than a statement
    failing on a working connection, such as a serialization failure)."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        return state in _LOST_SQLSTATES or state.startswith("08")
    # InternalClientError: the connection's protocol state broke with it (an operation
    # cut off mid-way); only a new connection helps, which is what every part does next
    return isinstance(
        exc,
        OSError
        | ConnectionError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | trio.TooSlowError,
    )


class OutageLog:
    """Tracks which parts of one pool are failing to reach the database."""

    __slots__ = ("_failing", "_log", "_pool_id", "_since")

    def __init__(self, log: logging.Logger, pool_id: str) -> None:
        self._log = log
        self._pool_id = pool_id
        self._failing: set[str] = set()
        self._since = 0.0

    @property
    def down(self) -> bool:
        """Whether some part of the pool cannot reach the database right now."""
        return bool(self._failing)

    def failed(self, part: str, exc: BaseException) -> None:
        """``part`` failed to reach the database with ``exc`` (and will retry)."""
        if not self._failing:
            self._since = trio.current_time()
            self._log.warning(
                "pool %s: lost its database connection (%s: %s: %s); retrying quietly until "
                "it is back",
                self._pool_id,
                part,
                type(exc).__name__,
                exc,
                extra=pool_extra(self._pool_id, "pool:connection:lost"),
            )
        else:
            self._log.debug("pool %s: %s still failing: %s", self._pool_id, part, exc)
        self._failing.add(part)

    def ok(self, part: str) -> None:
        """``part`` reached the database again (cheap when nothing was failing)."""
        if not self._failing or part not in self._failing:
            return
        self._failing.discard(part)
        if not self._failing:
            self._log.info(
                "pool %s: reconnected to the database after %.1f s",
                self._pool_id,
                trio.current_time() - self._since,
                extra=pool_extra(self._pool_id, "pool:connection:restored"),
            )
        else:
            self._log.debug("pool %s: %s works again", self._pool_id, part)
