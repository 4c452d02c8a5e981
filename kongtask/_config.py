"""Options and environment: the schema name, the connection string."""

from __future__ import annotations

import os
import re
from urllib.parse import urlencode

from ._errors import ConfigError
from ._validate import validate_identifier

DEFAULT_SCHEMA = "graphile_worker"


def resolve_schema(schema: str | None = None) -> str:
    """The schema to use: ``schema``, else ``GRAPHILE_WORKER_SCHEMA``, else the default.

    Raises:
      ConfigError: the name is one PostgreSQL cannot hold (empty, NUL, over 63 bytes).
    """
    if schema is None:
        schema = os.environ.get("GRAPHILE_WORKER_SCHEMA") or DEFAULT_SCHEMA
    return validate_identifier(schema, what="schema name")


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (always quoted, so any case or character works)."""
    return '"' + validate_identifier(name).replace('"', '""') + '"'


def resolve_dsn(dsn: str | None = None) -> str | None:
    """The connection string: ``dsn``, else ``DATABASE_URL``.

    ``None`` means "let libpq's ``PG*`` environment variables decide" (asyncpg reads them).
    """
    if dsn:
        return dsn
    return os.environ.get("DATABASE_URL") or None


# libpq's keyword/value form: `key = value` pairs; a value is 'single-quoted' (backslash
# escapes \' and \\) or runs to the next space (backslash escapes too).
_KEYWORD_PAIR = re.compile(r"""\s*([A-Za-z_]+)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|((?:[^\s'\\]|\\.)*))""")
_ESCAPE = re.compile(r"\\(.)")


def asyncpg_dsn(dsn: str | None) -> str | None:
    """``dsn`` in a form asyncpg accepts: URLs as they are, libpq keyword/value strings
    (``host=db dbname=app``) as the equivalent URL (asyncpg reads only URLs).

    Raises:
      ConfigError: ``dsn`` is neither a URL nor a keyword/value string.
    """
    if not dsn or "://" in dsn:
        return dsn
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(dsn):
        if dsn[position:].strip() == "":
            break
        match = _KEYWORD_PAIR.match(dsn, position)
        if match is None:
            raise ConfigError(
                f"cannot read the connection string at character {position + 1}: expected "
                "a URL (postgresql://...) or libpq's keyword=value pairs"
            )
        quoted, plain = match.group(2), match.group(3)
        value = quoted if quoted is not None else plain
        pairs.append((match.group(1), _ESCAPE.sub(r"\1", value)))
        position = match.end()
    if not pairs:
        return dsn
    return "postgresql://?" + urlencode(pairs)
