"""The worker: ``open_worker`` and the parts of a pool, one module each.

Jobs flow one way through the parts (docs/design/worker.md)::

    NOTIFY -> notifier --nudge--> fetcher --claims--> local queue --> runner (N workers)
              poll, TTL, freed capacity --^                              |
                                                           outcomes, hand-backs
                                                                         v
                                                  completer (one statement per batch)

- ``_pool``: :func:`open_worker`, the :class:`Worker` facade, the nursery and the
  shutdown order; ``_lifecycle``: the one object through which anything asks it to stop.
- ``_fetcher``: the claim loop; ``_claim_sizing``: how many to claim (pure arithmetic).
- ``_local_queue``: held jobs, idle workers, and the recheck of held rows.
- ``_runner``: the workers (the hot path); ``_context``: what a handler gets;
  ``_outcome``: what a run comes to (pure).
- ``_completer``: every write about a claimed job (outcomes and every hand-back).
- ``_notifier``: the LISTEN connection and the liveness lock on it.
- ``_housekeeping``: the sweepers.
- ``_timing``: the timing policy (:class:`WorkerTiming`) and the delay formulas.
- ``_handlers``: :func:`task` and the checks of the tasks given to ``open_worker``.
"""

from ._completer import is_transient as is_transient
from ._context import JobCancelScope as JobCancelScope, JobContext as JobContext
from ._fetcher import CLAIM_SESSION_SETTINGS as CLAIM_SESSION_SETTINGS
from ._handlers import TaskSpec as TaskSpec, runners_of as runners_of, task as task
from ._outcome import (
    NO_MESSAGE as NO_MESSAGE,
    SHUTDOWN_MESSAGE as SHUTDOWN_MESSAGE,
    JobCancelled as JobCancelled,
    raised_by_signal_handler as raised_by_signal_handler,
    split_cancelled as split_cancelled,
)
from ._pool import (
    DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE,
    DEFAULT_GRACE as DEFAULT_GRACE,
    DEFAULT_LOCAL_QUEUE_TTL as DEFAULT_LOCAL_QUEUE_TTL,
    Worker as Worker,
    WorkerStatistics as WorkerStatistics,
    open_worker as open_worker,
)
from ._timing import (
    WorkerTiming as WorkerTiming,
    failure_delay as failure_delay,
    listen_reconnect_delay as listen_reconnect_delay,
    parse_insert_count as parse_insert_count,
    retry_delay as retry_delay,
)
