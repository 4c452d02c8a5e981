"""Producers on SQLAlchemy 2: ``add_job_sync`` on a ``Connection`` or ``Session`` and
``kongtask.aio`` on an ``AsyncConnection`` or ``AsyncSession``, in the caller's
transaction (scenarios: producer_scenarios)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import pytest
import sqlalchemy
from producer_scenarios import *  # noqa: F403  (the scenarios, run for this driver)
from producer_scenarios import AsyncTx, Tx
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import kongtask
from kongtask import Job, JobSpec

T = TypeVar("T")


def _url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


class SyncTx:
    def __init__(self, target: sqlalchemy.Connection | Session) -> None:
        self.target = target

    def add_job(self, *args: Any, **kwargs: Any) -> Job:
        return kongtask.add_job_sync(self.target, *args, **kwargs)

    def add_jobs(self, specs: list[JobSpec], **kwargs: Any) -> list[Job]:
        return kongtask.add_jobs_sync(self.target, specs, **kwargs)

    def execute(self, sql: str) -> None:
        self.target.execute(sqlalchemy.text(sql))

    def savepoint(self) -> AbstractContextManager[Any]:
        return self.target.begin_nested()

    def break_transaction(self) -> None:
        with pytest.raises(sqlalchemy.exc.DataError):
            self.execute("select 1/0")


class SyncDriver:
    def __init__(self, kind: str, dbapi: str) -> None:
        self.kind, self.dbapi = kind, dbapi

    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        engine = sqlalchemy.create_engine(_url(dsn, self.dbapi), poolclass=sqlalchemy.NullPool)
        try:
            if self.kind == "session":
                with Session(engine) as session:
                    result = body(SyncTx(session))
                    session.commit() if commit else session.rollback()
                    return result
            with engine.connect() as conn:
                conn.begin()
                result = body(SyncTx(conn))
                conn.commit() if commit else conn.rollback()
                return result
        finally:
            engine.dispose()


class AsyncDriver:
    def __init__(self, kind: str, dbapi: str) -> None:
        self.kind, self.dbapi = kind, dbapi

    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        loop = asyncio.new_event_loop()
        engine = create_async_engine(_url(dsn, self.dbapi), poolclass=sqlalchemy.NullPool)
        try:
            if self.kind == "session":
                target: Any = AsyncSession(engine)
            else:
                target = loop.run_until_complete(engine.connect())
                loop.run_until_complete(target.begin())

            async def execute(sql: str) -> None:
                await target.execute(sqlalchemy.text(sql))

            tx = AsyncTx(loop, target, execute, target.begin_nested, sqlalchemy.exc.DBAPIError)
            try:
                result = body(tx)
                loop.run_until_complete(target.commit() if commit else target.rollback())
                return result
            finally:
                loop.run_until_complete(target.close())
        finally:
            loop.run_until_complete(engine.dispose())
            loop.close()


@pytest.fixture(
    params=[
        ("sync", "connection", "psycopg"),
        ("sync", "session", "psycopg2"),
        ("async", "connection", "asyncpg"),
        ("async", "session", "psycopg"),
    ],
    ids=lambda p: "-".join(p),
)
def driver(request: pytest.FixtureRequest) -> object:
    flavour, kind, dbapi = request.param
    return (SyncDriver if flavour == "sync" else AsyncDriver)(kind, dbapi)


async def test_a_scoped_session_is_used_through_its_current_session(
    appdb: Any, kongtask_dsn: str
) -> None:
    import trio
    from producer_scenarios import count
    from sqlalchemy.orm import scoped_session, sessionmaker

    def add() -> None:
        engine = sqlalchemy.create_engine(_url(kongtask_dsn, "psycopg"))
        db_session = scoped_session(sessionmaker(engine))  # what Flask-SQLAlchemy hands out
        try:
            db_session.execute(sqlalchemy.text("insert into orders values (1)"))
            kongtask.add_job_sync(db_session, "t")
            db_session.rollback()  # the producer used the scoped session's transaction
            kongtask.add_job_sync(db_session, "t", {"kept": True})
            db_session.commit()
        finally:
            db_session.remove()
            engine.dispose()

    await trio.to_thread.run_sync(add)
    assert await count(appdb, "orders") == 0
    assert await appdb.fetchval("select payload::text from graphile_worker._private_jobs") == (
        '{"kept":true}'
    )
