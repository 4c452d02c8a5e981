"""The asyncio loop asyncpg runs on: trio-asyncio's, with ready callbacks run together.

trio-asyncio runs asyncio's callbacks from one trio task that takes them from a memory
channel one at a time, with a trio checkpoint after each. Every callback therefore costs
a whole trio scheduling round (an ``epoll`` call and a pass over the run queue), and one
asyncpg round trip is a chain of callbacks that each schedule the next: the task step
that sends the query, the reader that receives the reply, the step that resumes the
coroutine, the done-callback that wakes the trio caller, and the reader's own
synchronisation. That chain takes 7 rounds per statement; run as asyncio runs its ready
queue, it takes 4 (docs/performance.md, "The latency path").

:func:`run_ready_callbacks_together` makes one loop (never trio-asyncio's class, so an
application's own loops are untouched) run, after each callback it waits for, those
already queued, up to :data:`MAX_CALLBACKS_PER_ROUND`: the same order, and the same
callbacks as before, in fewer rounds. It relies on trio-asyncio's private step method;
when that is missing (another trio-asyncio release), the loop is left as it is and a
test notices (tests/test_aio_loop.py counts the rounds); pyproject.toml keeps
trio-asyncio below its next release for that reason.
"""

from __future__ import annotations

import logging
from typing import Any, Final

log = logging.getLogger("kongtask.pg")

#: Callbacks run in one trio scheduling round at most; the rest wait for the next round,
#: so a callback that keeps scheduling callbacks cannot starve trio's other tasks.
MAX_CALLBACKS_PER_ROUND: Final = 64


def run_ready_callbacks_together(loop: Any) -> bool:
    """Make ``loop`` (a running trio-asyncio loop) run queued callbacks together;
    whether it could (``False``: an unknown trio-asyncio, left as it is)."""
    step = getattr(type(loop), "_main_loop_one", None)
    queue = getattr(loop, "_q_recv", None)
    stopped = getattr(loop, "_stopped", None)
    if step is None or queue is None or stopped is None:
        log.debug("trio-asyncio's loop has no known step method; left as it is")
        return False

    async def main_loop_step(no_wait: bool = False) -> None:
        # the stock step: wait for a callback (or a due timer) and run it
        await step(loop, no_wait)
        # then those queued meanwhile, without a checkpoint between them, as asyncio
        # runs its ready queue; the stock step with no_wait runs one without waiting
        for _ in range(MAX_CALLBACKS_PER_ROUND - 1):
            if loop._stopped.is_set() or not loop._q_recv.statistics().current_buffer_used:
                return
            await step(loop, True)

    # the loop's main task looks the step up on the instance at every turn
    loop._main_loop_one = main_loop_step
    return True
