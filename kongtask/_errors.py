"""Exceptions that kongtask raises on purpose."""

from __future__ import annotations


class KongtaskError(Exception):
    """Base class of the errors kongtask raises on purpose.

    The CLI prints these as one line on stderr and exits with ``exit_code``.
    """

    exit_code: int = 1


class ConfigError(KongtaskError, ValueError):
    """An option, environment variable or argument has a value kongtask cannot use."""


class SchemaTooNewError(KongtaskError):
    """The database holds a breaking migration newer than this kongtask knows."""

    exit_code = 57


class MigrationError(KongtaskError):
    """A migration could not be applied (the database is left as it was)."""


class NoPostgresError(KongtaskError):
    """No PostgreSQL server could be found or started for tests."""


def schema_not_installed(schema: str, *, maybe_old: bool = False) -> KongtaskError:
    """The error for a schema that is missing (or, ``maybe_old``, lacks what kongtask needs)."""
    state = "is not installed in this database"
    if maybe_old:
        state += " (or is older than kongtask needs)"
    return KongtaskError(
        f"schema {schema!r} {state}; run `kongtask migrate` (or graphile-worker's migration) first"
    )
