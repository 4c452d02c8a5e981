"""Log records for operators: the CLI's handler, its text and JSON formats, job fields.

The worker puts the fields of :data:`JOB_FIELDS` on its job and pool records as
``extra`` (plain attributes of the :class:`logging.LogRecord`), so a library user's own
handler or formatter can read them; ``--log-format json`` writes them as keys.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The record attributes the worker sets on job and pool events (absent ones are omitted).
JOB_FIELDS = ("job_id", "task", "queue", "attempt", "pool_id", "event")


def job_extra(pool_id: str, job: Any, event: str) -> dict[str, Any]:
    """The ``extra`` of a job event's record."""
    return {
        "job_id": job.id,
        "task": job.task_identifier,
        "queue": job.queue_name,
        "attempt": job.attempts,
        "pool_id": pool_id,
        "event": event,
    }


def pool_extra(pool_id: str, event: str) -> dict[str, Any]:
    """The ``extra`` of a pool event's record."""
    return {"pool_id": pool_id, "event": event}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the job fields present,
    and ``exception`` (the formatted traceback) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in JOB_FIELDS:
            if field in record.__dict__:
                entry[field] = record.__dict__[field]
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def one_line(record: logging.LogRecord) -> bool:
    """Fold a log record's traceback into its message.

    asyncpg's pool logs a full traceback each time it fails to reconnect (a database
    restart prints dozens); the exception's type and text say all an operator needs.
    """
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def quiet_pool_restores(record: logging.LogRecord) -> bool:
    """Drop asyncpg's "Failed to restore the pool connection floor" warnings.

    The pool's maintenance task logs one each time it fails to reconnect while the
    database is away, a traceback each, doubling its delay up to a minute; a worker
    reports the outage itself (:mod:`kongtask._outage`). They still show when
    ``kongtask.worker`` logs at DEBUG.
    """
    if isinstance(record.msg, str) and record.msg.startswith(
        "Failed to restore the pool connection floor"
    ):
        return logging.getLogger("kongtask.worker").isEnabledFor(logging.DEBUG)
    return True


def install_pool_filters() -> None:
    """Add :func:`quiet_pool_restores` to the ``asyncpg.pool`` logger (once)."""
    pool_logger = logging.getLogger("asyncpg.pool")
    if quiet_pool_restores not in pool_logger.filters:
        pool_logger.addFilter(quiet_pool_restores)


def print_failure(message: str, log_format: str) -> None:
    """The CLI's last word on stderr: ``kongtask: message``, or with ``--log-format json``
    one more JSON object (level ``ERROR``), so every line stays machine-readable."""
    if log_format != "json":
        print(f"kongtask: {message}", file=sys.stderr)
        return
    record = logging.LogRecord("kongtask", logging.ERROR, "", 0, message, None, None)
    print(JsonFormatter().format(record), file=sys.stderr)


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler the CLI installs (told apart from a host program's own)."""


def configure_cli_logging(level: str, log_format: str) -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``).

    A root logger that already has a handler the CLI did not install belongs to a host
    program (``trio.run(kongtask.main)`` inside an application): it is left alone.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _CliHandler)]
    if root.handlers and not ours:
        return
    handler = ours[0] if ours else _CliHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    if not ours:
        root.addHandler(handler)
    root.setLevel(level)
    install_pool_filters()
    pool_logger = logging.getLogger("asyncpg.pool")
    if one_line not in pool_logger.filters:
        pool_logger.addFilter(one_line)
