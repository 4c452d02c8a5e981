"""How many jobs the fetcher claims: pure arithmetic on the pool's counts and the time.

A pool keeps ``concurrency`` jobs running plus a prefetch: the work the measured job rate
gets through in ``prefetch_lookahead`` seconds (at most ``batch_size``). Claiming many
rows in one statement is what makes throughput; holding few keeps claimed jobs from
waiting (docs/design/worker.md).
"""

from __future__ import annotations

from typing import Final

#: The fetcher claims again once this fraction (1/n) of its target is free.
REFILL_PARTS: Final = 4
#: Seconds over which a falling job rate is forgotten (a rising one is taken at once).
RATE_MEMORY: Final = 0.2


class ClaimSizer:
    """The job-rate estimate and the claim size that follows from it.

    Attributes:
      rate: the estimated jobs started per second.
      refill_below: jobs in flight (held plus running) at or below which the fetcher,
        waiting for capacity, is to be woken.
    """

    __slots__ = (
        "_at",
        "_batch_size",
        "_concurrency",
        "_lookahead",
        "_min_prefetch",
        "_seen",
        "rate",
        "refill_below",
    )

    def __init__(
        self,
        concurrency: int,
        batch_size: int,
        *,
        lookahead: float,
        min_prefetch: int = 0,
        now: float = 0.0,
    ) -> None:
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._lookahead = lookahead
        self._min_prefetch = min_prefetch
        self.rate = 0.0
        self._at = now
        self._seen = 0
        self.refill_below = 0

    def size(self, now: float, *, started: int, in_flight: int, idle_worker_waits: bool) -> int:
        """How many jobs to claim at ``now`` (0: wait for capacity).

        Args:
          now: the current time (seconds, any monotonic clock).
          started: jobs started since the pool started (the rate is measured from it).
          in_flight: jobs held locally plus jobs running.
          idle_worker_waits: a worker is idle and nothing is held for it.
        """
        dt = now - self._at
        if dt >= 0.01:
            instant = (started - self._seen) / dt
            # Up at once, down with a short memory: a backlog is claimed at full size
            # within a few claims, and one pause does not drop the prefetch to nothing.
            weight = 1.0 if instant > self.rate else min(1.0, dt / RATE_MEMORY)
            self.rate += weight * (instant - self.rate)
            self._at, self._seen = now, started
        prefetch = min(self._batch_size, max(self._min_prefetch, int(self.rate * self._lookahead)))
        target = self._concurrency + prefetch
        deficit = target - in_flight
        # Refill when a quarter is gone: a claim takes a few round-trip milliseconds while
        # a worker runs a job in a fraction of that, so a claim sent when the local queue
        # is half empty comes back to idle workers; smaller claims sent sooner keep one
        # always in flight under load.
        step = max(1, target // REFILL_PARTS)
        self.refill_below = target - step
        if deficit <= 0:
            return 0
        if deficit >= step or idle_worker_waits:
            return min(self._batch_size, deficit)
        return 0
