"""The one convention for a schema's SQL (kongtask._schema_sql, docs/design/sql-convention.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from kongtask._client_sql import ClientQueries
from kongtask._cron_sql import CronQueries
from kongtask._enqueue import AddQueries
from kongtask._errors import ConfigError
from kongtask._inspect_sql import LIST_FILTERS, InspectQueries
from kongtask._liveness_sql import LivenessQueries
from kongtask._migrate import MigrationQueries
from kongtask._schema_sql import SchemaSql
from kongtask._sql import WorkerQueries

# A name that breaks any statement which splices it in unquoted or quotes it by hand
# without doubling the quote.
HOSTILE = 'Wörk"er; drop table x --'
QUOTED = '"Wörk""er; drop table x --"'

AREAS = [
    WorkerQueries(HOSTILE),
    ClientQueries(HOSTILE),
    CronQueries(HOSTILE),
    LivenessQueries(HOSTILE),
    InspectQueries(HOSTILE),
    MigrationQueries(HOSTILE),
    AddQueries(HOSTILE, "dollar"),
]


def _statements(area: SchemaSql) -> dict[str, str]:
    return {f.name: getattr(area, f.name) for f in dataclasses.fields(area) if not f.init}


@pytest.mark.parametrize("area", AREAS, ids=lambda area: type(area).__name__)
def test_every_statement_names_the_schema_only_quoted(area: SchemaSql) -> None:
    statements = _statements(area)
    assert statements
    for name, sql in statements.items():
        assert QUOTED in sql, name
        # Outside its quoted form the name appears nowhere.
        assert HOSTILE not in sql.replace(QUOTED, ""), name


def test_the_job_listing_quotes_the_schema_too() -> None:
    sql = InspectQueries(HOSTILE).list_jobs(LIST_FILTERS, descending=True, states=("ready",))
    assert QUOTED in sql
    assert HOSTILE not in sql.replace(QUOTED, "")
    assert sql.rstrip().endswith("limit $1::int")


def test_statements_are_frozen_and_the_repr_is_short() -> None:
    queries = WorkerQueries("graphile_worker")
    with pytest.raises(dataclasses.FrozenInstanceError):
        queries.claim = "select 1"  # type: ignore[misc]
    assert repr(queries) == "WorkerQueries(schema='graphile_worker')"


def test_an_unusable_schema_name_is_refused_before_any_statement_exists() -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        ClientQueries("")
    with pytest.raises(ConfigError, match="at most 63 bytes"):
        CronQueries("s" * 64)


def test_a_statement_declared_but_not_rendered_or_rendered_but_not_declared_fails() -> None:
    @dataclass(frozen=True, slots=True, repr=False)
    class Missing(SchemaSql):
        one: str = field(init=False)
        two: str = field(init=False)

        def _render(self, s: str) -> dict[str, str]:
            return {"one": f"select 1 from {s}.t"}

    @dataclass(frozen=True, slots=True, repr=False)
    class Extra(SchemaSql):
        one: str = field(init=False)

        def _render(self, s: str) -> dict[str, str]:
            return {"one": f"select 1 from {s}.t", "tow": "select 2"}

    with pytest.raises(TypeError, match=r"misses \['two'\]"):
        Missing("s")
    with pytest.raises(TypeError, match=r"returns \['tow'\] undeclared"):
        Extra("s")
