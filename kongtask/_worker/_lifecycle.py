"""The pool's lifecycle: the one object through which anything asks the pool to stop.

A shutdown is requested by the application (``Worker.shutdown_nowait``), a signal, or a
part of the pool itself (the completer giving up on its writes, the notifier seeing a
breaking migration, the fetcher in ``once`` mode finding nothing). They all call
:meth:`Lifecycle.request_stop`; only the pool (``_pool.py``) acts on it, in its shutdown
order. The lifecycle also holds the exit code and the phase statistics() report.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import trio

from .._events import EventEmitter

log = logging.getLogger("kongtask.worker")

#: The phases of a pool, in order (``WorkerStatistics.state``).
STARTING: Final = "starting"
RUNNING: Final = "running"
RETURNING: Final = "returning"  # claiming stopped; held jobs are being handed back
GRACE: Final = "grace"  # waiting for running jobs until the grace deadline
FLUSHING: Final = "flushing"  # writing the last outcomes
STOPPED: Final = "stopped"


class Lifecycle:
    """Stop requests, the grace deadline, the exit code and the pool's phase."""

    def __init__(self, pool_id: str, events: EventEmitter, default_grace: float) -> None:
        self._pool_id = pool_id
        self._events = events
        self._default_grace = default_grace
        #: set once a stop was requested: the pool starts its shutdown
        self.stop_requested = trio.Event()
        #: set once the pool has stopped and released everything
        self.stopped = trio.Event()
        #: ``None`` while running normally; see ``Worker.exit_code``
        self.exit_code: int | None = None
        #: the current phase (STARTING ... STOPPED)
        self.state: str = STARTING
        self._stopping = False
        self._grace_deadline = math.inf
        self._grace_scope: trio.CancelScope | None = None

    @property
    def stopping(self) -> bool:
        """Whether a stop has been requested."""
        return self._stopping

    @property
    def grace_deadline(self) -> float:
        """The trio time at which running jobs are cancelled (``inf`` before a stop)."""
        return self._grace_deadline

    def request_stop(self, grace: float | None = None, *, exit_code: int | None = None) -> None:
        """Ask the pool to stop, running jobs getting ``grace`` seconds (default: the
        pool's). A second request with a shorter grace shortens the wait (``grace=0``:
        cancel running jobs now). ``exit_code`` is kept unless one was set before."""
        if exit_code is not None and self.exit_code is None:
            self.exit_code = exit_code
        grace = self._default_grace if grace is None else max(0.0, float(grace))
        deadline = trio.current_time() + grace
        if not self._stopping:
            self._stopping = True
            self._grace_deadline = deadline
            self._events.emit("pool:gracefulShutdown", message="Worker pool is shutting down")
            log.info("pool %s: shutting down (grace %.1f s)", self._pool_id, grace)
            self.stop_requested.set()
        elif deadline < self._grace_deadline:
            self._grace_deadline = deadline
            self._events.emit("pool:forcefulShutdown", message="Forced worker shutdown")
            log.warning("pool %s: forceful shutdown", self._pool_id)
            if self._grace_scope is not None:
                self._grace_scope.deadline = deadline

    def grace_scope(self) -> trio.CancelScope:
        """The scope the pool waits for its running jobs in: it ends at the grace
        deadline, which a later, shorter stop request moves closer."""
        scope = trio.CancelScope(deadline=self._grace_deadline)
        self._grace_scope = scope
        self.state = GRACE
        return scope
