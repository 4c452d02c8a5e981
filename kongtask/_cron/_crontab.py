"""Crontab text: a string or a file of lines into :class:`~kongtask._cron._items.CronItem`."""

from __future__ import annotations

import re
from datetime import timedelta
from os import PathLike

from .._job import JSONValue
from ._items import CronItem
from ._parse import (
    _FIELDS,
    CrontabError,
    _parse_field,
    _parse_options,
    _parse_payload,
    _validate_task,
    parse_fill,
)


def _parse_line(line: str) -> CronItem:
    """One non-comment crontab line (not trimmed; columns count from its first character)."""
    tokens = list(re.finditer(r"\S+", line))
    # Check the fields that are there first, so '@daily task' is blamed on the '@'.
    for i in range(min(5, len(tokens))):
        _parse_field(tokens[i].group(), _FIELDS[i], tokens[i].start() + 1)
    if len(tokens) < 6:
        name = [f.name for f in _FIELDS][len(tokens)] if len(tokens) < 5 else "task identifier"
        raise CrontabError(
            f"line ends early: expected the {name} field (a line is "
            "MIN HOUR DOM MON DOW TASK [?OPTIONS] [{PAYLOAD}])",
            column=len(line.rstrip()) + 1,
        )
    task_tok = tokens[5]
    try:
        task = _validate_task(task_tok.group())
    except CrontabError as exc:
        raise CrontabError(exc.reason, column=task_tok.start() + 1) from None
    options: dict[str, str] = {}
    rest = 6
    if rest < len(tokens) and tokens[rest].group().startswith("?"):
        tok = tokens[rest]
        if tok.group() == "?":
            raise CrontabError(
                "expected options after '?' (such as ?fill=1h&max=3)", column=tok.start() + 1
            )
        options = _parse_options(tok.group()[1:], tok.start() + 2)
        rest += 1
    payload: dict[str, JSONValue] | None = None
    if rest < len(tokens):
        tok = tokens[rest]
        if not tok.group().startswith("{"):
            raise CrontabError(
                f"unexpected {tok.group()!r}: expected '?options' or a JSON5 payload "
                "object '{...}' (options must come before the payload, without spaces)",
                column=tok.start() + 1,
            )
        payload = _parse_payload(line[tok.start() :].rstrip(), tok.start() + 1)
    mode = options.get("jobKeyMode")
    item = CronItem(
        " ".join(t.group() for t in tokens[:5]),
        task,
        identifier=options.get("id"),
        payload=payload,
        fill=parse_fill(options["fill"]) if "fill" in options else timedelta(0),
        max_attempts=int(options["max"]) if "max" in options else None,
        queue_name=options.get("queue"),
        priority=int(options["priority"]) if "priority" in options else None,
        job_key=options.get("jobKey"),
        job_key_mode="preserve_run_at"
        if mode == "preserve_run_at"
        else ("replace" if mode else None),
    )
    return item


def crontab(text: str, *, source: str | None = None) -> list[CronItem]:
    """Parse graphile-worker crontab text into :class:`CronItem` objects.

    Each line is ``MIN HOUR DOM MON DOW TASK [?OPTIONS] [{PAYLOAD}]``; blank lines and
    lines starting with ``#`` are skipped. See ``docs/cron.md``.

    Args:
      text: the crontab.
      source: a file name to put in error messages.

    Raises:
      CrontabError: a line is malformed or two lines share an identifier; the message
        names the line, the column and what was expected.
    """
    items: list[CronItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            item = _parse_line(line)
        except CrontabError as exc:
            raise CrontabError(exc.reason, line=number, column=exc.column, source=source) from None
        if item.cron_id in first_line:
            raise CrontabError(
                f"duplicate cron identifier {item.cron_id!r} (first used on line "
                f"{first_line[item.cron_id]}): add ?id=... to tell the lines apart",
                line=number,
                source=source,
            )
        first_line[item.cron_id] = number
        items.append(item)
    return items


def load_crontab_file(path: str | PathLike[str]) -> list[CronItem]:
    """Read and parse a crontab file (UTF-8).

    Raises:
      CrontabError: the file is malformed (the message names the file, line and column).
      OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return crontab(text, source=str(path))
