"""What a job's run comes to: pure functions from what a handler did to its outcome.

The runner collects the facts of a run (the handler's result or exception, whether and by
whom its cancel scope was cancelled, whether it ran past its timeout); :func:`classify`
turns them into the job's error and ``last_error`` text, and :func:`batch_failures` reads
a batch job's per-element results. Nothing here awaits or touches the database.
"""

from __future__ import annotations

import json
import signal
import traceback
from typing import Final

import trio

#: The ``last_error`` of jobs cancelled by a shutdown (graphile-worker's wording).
SHUTDOWN_MESSAGE: Final = "Worker pool is shutting down gracefully"
#: The ``last_error`` of jobs cancelled through their context's cancel scope.
CANCELLED_MESSAGE: Final = "Job was cancelled"
#: ``last_error`` when an exception carries no text (graphile-worker's wording).
NO_MESSAGE: Final = "Non error or error without message thrown."


class JobCancelled(Exception):
    """The ``error`` of ``job:error`` events for jobs cancelled (shutdown, ``cancel_scope``)."""


def classify(
    error: BaseException | None,
    *,
    cancelled: bool,
    also: BaseException | None,
    cancelled_by_pool: bool,
    timed_out_after: float | None,
) -> tuple[BaseException | None, str]:
    """``(error, last_error)`` of a run; ``(None, "")`` when the job succeeded.

    Args:
      error: what the handler raised that is its own failure (``None``: it returned).
      cancelled: the job's cancel scope was cancelled and the handler ended by it.
      also: an exception the handler raised while it was being cancelled.
      cancelled_by_pool: the shutdown cancelled it (not its context).
      timed_out_after: the task's timeout when the run exceeded it, else ``None``.
    """
    if timed_out_after is not None:
        error = TimeoutError(f"timed out after {timed_out_after:g} s")
        message = str(error)
        if also is not None:
            message = pg_text(f"{message}\n{also_raised(also)}")
        return error, message
    if cancelled and error is None:
        message = SHUTDOWN_MESSAGE if cancelled_by_pool else CANCELLED_MESSAGE
        error = JobCancelled(message)
        if also is not None:
            message = pg_text(f"{message}\n{also_raised(also)}")
        return error, message
    if error is not None:
        return error, error_text(error)
    return None, ""


def batch_failures(payload: object, result: object) -> tuple[str, str] | None:
    """For a batch job (a list payload) whose handler returned one result per element:
    ``(last_error, payload of the failed elements as JSON)``, or ``None`` when no element
    failed. Raises :class:`ValueError` when the lengths differ (counted as a success)."""
    if not isinstance(result, list | tuple) or not isinstance(payload, list):
        return None
    if len(result) != len(payload):
        raise ValueError(f"returned {len(result)} outcomes for a batch of {len(payload)}")
    failed = [
        (item, r) for item, r in zip(payload, result, strict=True) if isinstance(r, BaseException)
    ]
    if not failed:
        return None
    message = pg_text("Batch failures:\n" + "\n".join(str(r) or NO_MESSAGE for _, r in failed))
    return message, json.dumps([item for item, _ in failed])


def error_text(exc: BaseException) -> str:
    """``last_error`` for a handler exception: a first line, then a short traceback.

    The first line of an :class:`Exception` is its message (graphile-worker's wording; the
    type is on the traceback's last line). Any other ``BaseException`` says its type first
    (``CancelledError: x``): it is not an error a handler is expected to raise.
    """
    summary = "".join(traceback.format_exception(exc, limit=-5)).rstrip()
    return pg_text(f"{first_line(exc)}\n{summary}")


def first_line(exc: BaseException) -> str:
    """The first line of ``last_error`` for ``exc``."""
    if isinstance(exc, Exception):
        return str(exc) or NO_MESSAGE
    if isinstance(exc, SystemExit):
        return f"the handler raised SystemExit({exc.code!r})"
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def also_raised(exc: BaseException) -> str:
    """The part of ``last_error`` for an exception raised while a job was being cancelled."""
    return f"The handler also raised {error_text(exc)}"


def pg_text(text: str) -> str:
    """``text`` as PostgreSQL can store it.

    PostgreSQL text cannot hold NUL: one such message would fail its whole batch of
    outcomes on every retry, so it is escaped here.
    """
    return text.replace("\x00", "\\0") if "\x00" in text else text


def split_cancelled(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``(cancellation, rest)`` of what a handler raised: the :class:`trio.Cancelled`
    part (a ``Cancelled`` or a group holding only those) and everything else."""
    if isinstance(exc, trio.Cancelled):
        return exc, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    return None, exc


#: Signals whose Python handler may raise in whatever code runs when they arrive.
_SHUTDOWN_SIGNALS: Final = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def raised_by_signal_handler(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it holds or was raised during) was raised by the
    Python-level handler of a real signal rather than by a handler's own code.

    trio's default SIGINT handler raises ``KeyboardInterrupt`` right in the code that was
    running (a job handler, when one was): the exception's innermost traceback frame is
    then that signal handler's. The same holds for a host program's own Python handler
    (``signal.signal(SIGTERM, ...)``) that raises. A handler's ``raise KeyboardInterrupt``
    has its own frame innermost, and so does anything raised in a thread.
    """
    handler_codes = {
        code
        for signum in _SHUTDOWN_SIGNALS
        if (code := getattr(signal.getsignal(signum), "__code__", None)) is not None
    }
    if not handler_codes:
        return False
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        tb = current.__traceback__
        if tb is not None:
            while tb.tb_next is not None:
                tb = tb.tb_next
            if tb.tb_frame.f_code in handler_codes:
                return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False
