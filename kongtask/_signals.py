"""SIGINT and SIGTERM, delivered to the running worker pools of this process.

One process-wide handler serves every pool that asked for signals: it is installed when
the first such pool starts and the previous handlers are put back when the last one ends.
Pools of one program may start and stop in any order (per-pool handlers, each restoring
what it replaced, would put back a stale handler when lifetimes overlap), which is why
this does not use :func:`trio.open_signal_receiver` per pool.

Signals can only be caught in the main thread of the main interpreter; elsewhere the
pool leaves them alone.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any, Final

import trio

log = logging.getLogger("kongtask.worker")

#: The signals that stop a pool: the first gracefully, the next at once.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

SignalCallback = Callable[[int], None]

# listener id -> (the trio run it lives in, what to call there with the signal number)
_listeners: dict[int, tuple[trio.lowlevel.TrioToken, SignalCallback]] = {}
_previous: dict[int, Any] = {}
_next_id = 0


def _deliver(signum: int, frame: FrameType | None) -> None:
    # A signal handler runs between two bytecodes of the main thread: it only schedules
    # the callbacks, which then run in their trio loops.
    for token, callback in list(_listeners.values()):
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(callback, signum)


def _install() -> bool:
    try:
        for signum in STOP_SIGNALS:
            _previous[signum] = signal.signal(signum, _deliver)
    except ValueError:  # not the main thread of the main interpreter
        _restore()
        return False
    return True


def _restore() -> None:
    for signum, previous in _previous.items():
        # None: the handler was not installed from Python; the default is the best guess
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    _previous.clear()


@contextmanager
def receive_stop_signals(callback: SignalCallback) -> Iterator[bool]:
    """Call ``callback(signum)`` in the current trio run for each SIGINT/SIGTERM.

    Yields whether signals are being received: ``False`` outside the main thread of the
    main interpreter, where Python lets nobody catch them.
    """
    global _next_id
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    if not _listeners and not _install():
        yield False
        return
    _next_id += 1
    key = _next_id
    _listeners[key] = (trio.lowlevel.current_trio_token(), callback)
    try:
        yield True
    finally:
        del _listeners[key]
        if not _listeners:
            _restore()


class StopOnSignals:
    """What a pool does with stop signals: the first stops it gracefully, the next at once.

    ``on_first`` runs after the graceful shutdown was requested (``open_worker`` uses it
    to end the body of its ``async with`` block).
    """

    def __init__(self, shutdown_nowait: Callable[..., None], on_first: Callable[[], None]) -> None:
        self._shutdown_nowait = shutdown_nowait
        self._on_first = on_first
        self.received = 0

    def __call__(self, signum: int) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1:
            log.info("%s: stopping gracefully (again to stop at once)", name)
            self._shutdown_nowait()
            self._on_first()
        else:
            log.warning("%s: stopping at once", name)
            self._shutdown_nowait(grace=0)
