"""Producers on psycopg 3: ``add_job_sync`` on a ``Connection`` and ``kongtask.aio`` on an
``AsyncConnection``, each in the caller's transaction (scenarios: producer_scenarios)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import psycopg
import pytest
from producer_scenarios import *  # noqa: F403  (the scenarios, run for this driver)
from producer_scenarios import AsyncTx, Tx
from psycopg.rows import dict_row

import kongtask
import kongtask.aio
from kongtask import Job, JobSpec

T = TypeVar("T")


class SyncTx:
    def __init__(self, conn: psycopg.Connection[Any], use_cursor: bool) -> None:
        self.conn = conn
        # the producer must accept a Cursor too, and ignore its dict row factory
        self.target: object = conn.cursor(row_factory=dict_row) if use_cursor else conn

    def add_job(self, *args: Any, **kwargs: Any) -> Job:
        return kongtask.add_job_sync(self.target, *args, **kwargs)

    def add_jobs(self, specs: list[JobSpec], **kwargs: Any) -> list[Job]:
        return kongtask.add_jobs_sync(self.target, specs, **kwargs)

    def execute(self, sql: str) -> None:
        self.conn.execute(sql)

    def savepoint(self) -> AbstractContextManager[Any]:
        return self.conn.transaction()

    def break_transaction(self) -> None:
        with pytest.raises(psycopg.errors.DivisionByZero):
            self.conn.execute("select 1/0")


class SyncDriver:
    def __init__(self, use_cursor: bool) -> None:
        self.use_cursor = use_cursor

    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        # dict rows on the connection: the producer must not depend on the row factory
        conn = psycopg.connect(dsn, row_factory=dict_row)
        try:
            result = body(SyncTx(conn, self.use_cursor))
            if commit:
                conn.commit()
            else:
                conn.rollback()
            return result
        finally:
            conn.close()  # an open transaction is rolled back


class AsyncDriver:
    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        loop = asyncio.new_event_loop()
        conn = loop.run_until_complete(psycopg.AsyncConnection.connect(dsn))
        try:
            tx = AsyncTx(loop, conn, conn.execute, conn.transaction, psycopg.errors.DivisionByZero)
            result = body(tx)
            loop.run_until_complete(conn.commit() if commit else conn.rollback())
            return result
        finally:
            loop.run_until_complete(conn.close())
            loop.close()


@pytest.fixture(params=["connection", "cursor", "async"])
def driver(request: pytest.FixtureRequest) -> object:
    if request.param == "async":
        return AsyncDriver()
    return SyncDriver(use_cursor=request.param == "cursor")
