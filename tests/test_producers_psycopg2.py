"""The DB-API 2.0 producer, on psycopg2: ``add_job_sync`` in the caller's transaction
(scenarios: producer_scenarios)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest
from producer_scenarios import *  # noqa: F403  (the scenarios, run for this driver)
from producer_scenarios import Tx

import kongtask
from kongtask import Job, JobSpec

T = TypeVar("T")


class DbApiTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def add_job(self, *args: Any, **kwargs: Any) -> Job:
        return kongtask.add_job_sync(self.conn, *args, **kwargs)

    def add_jobs(self, specs: list[JobSpec], **kwargs: Any) -> list[Job]:
        return kongtask.add_jobs_sync(self.conn, specs, **kwargs)

    def execute(self, sql: str) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self.execute("savepoint app")
        try:
            yield
        except BaseException:
            self.execute("rollback to savepoint app")
            raise
        self.execute("release savepoint app")

    def break_transaction(self) -> None:
        with pytest.raises(psycopg2.errors.DivisionByZero):
            self.execute("select 1/0")


class Psycopg2Driver:
    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        # dict rows by default: the producer must not depend on the cursor factory
        conn = psycopg2.connect(dsn, cursor_factory=psycopg2.extras.RealDictCursor)
        try:
            result = body(DbApiTx(conn))
            if commit:
                conn.commit()
            else:
                conn.rollback()
            return result
        finally:
            conn.close()


@pytest.fixture
def driver() -> object:
    return Psycopg2Driver()
