"""kongtask's log lines for programs that never configured logging.

Python shows nothing below WARNING until a program configures logging, so a first
program's ``ctx.logger.info(...)`` would print nothing. The rule: while a pool runs, if
no handler would receive kongtask's records (neither the ``kongtask`` logger, nor any of
its ancestors up to the root logger, has one), kongtask logs INFO and above to stderr
through its own handler on the ``kongtask`` logger. A program that configures logging
(``logging.basicConfig``, ``dictConfig``, a handler on ``kongtask``) before the pool starts
decides alone: kongtask then changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

#: The format of kongtask's own log lines (the command line's too).
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_logger = logging.getLogger("kongtask")
_handler: logging.Handler | None = None
_set_level = False
_users = 0


def host_handles_kongtask_logs() -> bool:
    """Whether the program put a handler of its own on the ``kongtask`` logger."""
    return any(handler is not _handler for handler in _logger.handlers)


@contextmanager
def log_to_stderr_unless_configured() -> Iterator[None]:
    """Apply the rule above for the duration of the block (blocks may overlap)."""
    global _handler, _set_level, _users
    if _handler is None:
        if _logger.hasHandlers():
            yield
            return
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter(LOG_FORMAT))
        _logger.addHandler(_handler)
        # a level chosen by the program stays; the unset one would hide INFO
        _set_level = _logger.level == logging.NOTSET
        if _set_level:
            _logger.setLevel(logging.INFO)
    _users += 1
    try:
        yield
    finally:
        _users -= 1
        if _users == 0 and _handler is not None:
            _logger.removeHandler(_handler)
            _handler = None
            if _set_level:
                _logger.setLevel(logging.NOTSET)
                _set_level = False
