"""Helpers shared by the worker tests (not a test module).

``worker_dsn``: a fresh database with the graphile-worker 0.18 schema. It is cloned from
kongtask's migrated template when kongtask's migrator is available, else from a template
that graphile-worker 0.18.0 itself migrated once per session (same schema, SCHEMA.md §9).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest

from kongtask._pg import Database
from kongtask._sql import WorkerQueries
from kongtask.testing import PostgresServer, run_sync_sql


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture(scope="session")
def gw_template(kongtask_server: PostgresServer) -> Iterator[str]:
    from oracle import oracle_migrate, require_oracle

    require_oracle("0.18.0")
    name = f"kongtask_gwtpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    run_sync_sql(kongtask_server.dsn, f"create database {_quote(name)}")
    try:
        oracle_migrate(kongtask_server.dsn_for(name), version="0.18.0")
        yield name
    finally:
        run_sync_sql(kongtask_server.dsn, f"drop database if exists {_quote(name)} with (force)")


def _have_migrator() -> bool:
    return importlib.util.find_spec("kongtask._migrate") is not None


@pytest.fixture
def worker_dsn(kongtask_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    if _have_migrator():
        dsn: str = request.getfixturevalue("kongtask_dsn")
        yield dsn
        return
    template = request.getfixturevalue("gw_template")
    name = f"kongtask_w{os.getpid()}_{uuid.uuid4().hex[:8]}"
    run_sync_sql(kongtask_server.dsn, f"create database {_quote(name)} template {_quote(template)}")
    try:
        yield kongtask_server.dsn_for(name)
    finally:
        run_sync_sql(kongtask_server.dsn, f"drop database if exists {_quote(name)} with (force)")


async def add_job_row(db: Database, task: str, payload: str = "{}", **kw: object) -> int:
    """Add a job through ``graphile_worker.add_job``; ``kw``: queue, run_at, max_attempts,
    key, priority, flags. Returns its id."""
    row = await db.fetchrow(
        WorkerQueries("graphile_worker").add_job,
        task,
        payload,
        kw.get("queue"),
        kw.get("run_at"),
        kw.get("max_attempts"),
        kw.get("key"),
        kw.get("priority"),
        kw.get("flags"),
        None,
    )
    assert row is not None
    return int(row["id"])
