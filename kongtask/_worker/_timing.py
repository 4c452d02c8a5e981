"""The worker's timing policy: one frozen settings object, and the pure delay formulas.

Every part of the pool reads its waits, limits and retry rules from the
:class:`WorkerTiming` it was given. The defaults are the production values; tests pass a
shorter one (``open_worker(..., timing=WorkerTiming(...))``) instead of patching modules.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .._held import RECHECK_AFTER
from .._liveness import DEFAULT_RESTART_GRACE


@dataclass(frozen=True, slots=True)
class WorkerTiming:
    """Waits, limits and retry rules of a worker pool (``open_worker(timing=...)``).

    The defaults are the documented behaviour (docs/design/worker.md); a test passes a
    shorter policy instead of patching the worker's modules.

    Attributes:
      statement_timeout: seconds after which a claim, a hand-back or a write of outcomes
        is given up on (and retried).
      reconcile_again_after: after a claim whose reply was lost, the pool looks for that
        claim's jobs at once and again after each of these delays (a statement given up on
        may still commit late on the server).
      flush_timeout: how long a shutdown waits for the final write of outcomes.
      give_up_after: consecutive non-transient errors writing outcomes before the pool
        stops (exit code 1); the outcomes are kept and retried until the shutdown.
      retry_cap: the longest wait between two retries of a database statement (the
        backoff starts at 0.1 s and doubles, with jitter).
      listen_keepalive: seconds between liveness checks of the LISTEN connection.
      liveness_reconnect_cap: the longest wait between two reconnects of the LISTEN
        connection of a pool that holds a liveness lock on it.
      prefetch_lookahead: seconds of work, at the measured job rate, claimed ahead of
        the workers.
      min_prefetch: jobs claimed ahead of the workers whatever the measured rate (0: only
        the rate decides).
      recheck_after: seconds a claimed job may wait and still start without its row
        being looked at again (``kongtask._held``).
      dead_pool_restart_grace: seconds after a server start during which no pool is
        declared dead (its LISTEN connection may still be reconnecting).
      thread_report_first, thread_report_every: after the grace period, handlers still
        running in threads are named after the first delay, then after each second one.
    """

    statement_timeout: float = 30.0
    reconcile_again_after: tuple[float, ...] = (5.0, 30.0, 120.0)
    flush_timeout: float = 30.0
    give_up_after: int = 10
    retry_cap: float = 10.0
    listen_keepalive: float = 30.0
    liveness_reconnect_cap: float = 2.0
    prefetch_lookahead: float = 0.1
    min_prefetch: int = 0
    recheck_after: float = RECHECK_AFTER
    dead_pool_restart_grace: float = DEFAULT_RESTART_GRACE
    thread_report_first: float = 0.2
    thread_report_every: float = 10.0

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` of a database statement."""
        return retry_delay(attempt, cap=self.retry_cap)


# its public home (kongtask.testing loads it on first use): named so in docs and reprs
WorkerTiming.__module__ = "kongtask.testing"

DEFAULT_TIMING = WorkerTiming()


def failure_delay(attempts: int) -> float:
    """Seconds until a failed job may run again: ``exp(min(attempts, 10))``.

    graphile-worker's backoff (docs/design/database.md); the SQL computes the same from
    ``greatest(now(), run_at)``, and this is for docs and logs.
    """
    return math.exp(min(attempts, 10))


def retry_delay(
    attempt: int, rand: Callable[[], float] = random.random, *, cap: float = 10.0
) -> float:
    """Capped exponential backoff with jitter for database retries (0.1 s … ``cap``)."""
    base: float = min(cap, 0.1 * 2 ** min(attempt, 10))
    return base * (0.5 + rand() / 2)


def listen_reconnect_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The LISTEN reconnect delay, graphile-worker's formula.

    ``(0.5 + sqrt(r)/2) * min(60 s, 50 ms * e^attempt)``, rounded up to whole ms.
    """
    ms = math.ceil((0.5 + math.sqrt(rand()) / 2) * min(60_000.0, 50 * math.exp(min(attempt, 20))))
    return ms / 1000


def sweep_delays(rand: Callable[[], float] = random.random) -> Iterator[float]:
    """Delays between stale-lock sweeps: first in [0, 60 s), then in [480, 600 s)."""
    yield 60.0 * rand()
    while True:
        yield 480.0 + 120.0 * rand()


def parse_insert_count(payload: str | None) -> int:
    """The ``count`` of a ``jobs:insert`` payload; 1 when missing or unparseable."""
    if not payload:
        return 1
    try:
        count = json.loads(payload).get("count", 1)
    except (ValueError, AttributeError):
        return 1
    if isinstance(count, bool) or not isinstance(count, int | float):
        return 1
    return int(count)
