"""The producer on Django: ``add_job_sync(django.db.connection)`` inside ``atomic()``, with a
real settings module and the demo app's real migrations (tests/django_demo), plus the
scenarios of producer_scenarios on a Django connection per test database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import trio
from producer_scenarios import *  # noqa: F403  (the scenarios, run for this driver)
from producer_scenarios import Tx, wait_until

import kongtask
from kongtask import Job, JobSpec
from kongtask._pg import open_database
from kongtask.testing import PostgresServer

django = pytest.importorskip("django")

T = TypeVar("T")
S = "graphile_worker"


@pytest.fixture(scope="module")
def django_dsn(kongtask_server: PostgresServer, kongtask_template: str) -> Iterator[str]:
    """A migrated kongtask database that Django is set up on, with the demo app migrated."""
    name = f"kongtask_django_{uuid.uuid4().hex[:8]}"
    dsn = kongtask_server.create_database(name, kongtask_template)
    os.environ["DJANGO_SETTINGS_MODULE"] = "django_demo.settings"
    os.environ["KONGTASK_DJANGO_DSN"] = dsn
    django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    connections.close_all()
    yield dsn
    connections.close_all()
    kongtask_server.drop_database(name)


class DjangoTx:
    def __init__(self, alias: str) -> None:
        from django.db import connections

        self.alias = alias
        self.conn = connections[alias]

    def add_job(self, *args: Any, **kwargs: Any) -> Job:
        return kongtask.add_job_sync(self.conn, *args, **kwargs)

    def add_jobs(self, specs: list[JobSpec], **kwargs: Any) -> list[Job]:
        return kongtask.add_jobs_sync(self.conn, specs, **kwargs)

    def execute(self, sql: str) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql)

    def savepoint(self) -> AbstractContextManager[Any]:
        from django.db import transaction

        atomic: AbstractContextManager[Any] = transaction.atomic(using=self.alias)
        return atomic

    def break_transaction(self) -> None:
        from django.db import DataError

        # as after any failed query, Django refuses queries until the atomic block ends
        with pytest.raises(DataError):
            self.execute("select 1/0")


class DjangoDriver:
    """Each test database becomes a Django connection alias of its own."""

    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        from django.db import connections, transaction

        alias = urlsplit(dsn).path.lstrip("/")
        if alias not in connections.settings:
            settings = dict(connections.settings["default"])
            settings["NAME"] = alias
            connections.settings[alias] = settings
        try:
            with transaction.atomic(using=alias):
                result = body(DjangoTx(alias))
                if not commit:
                    transaction.set_rollback(True, using=alias)
            return result
        finally:
            connections[alias].close()


@pytest.fixture
def driver(django_dsn: str) -> object:
    return DjangoDriver()


def _post(number: int) -> Any:
    from django.db import connections
    from django.test import Client

    try:
        return Client().post("/orders/", {"number": number})
    finally:
        connections.close_all()


async def test_a_view_saves_a_model_and_enqueues_in_one_atomic_block(django_dsn: str) -> None:
    confirmed: list[object] = []
    done = trio.Event()

    async def confirm_order(job: Job, ctx: kongtask.JobContext) -> None:
        confirmed.append(job.payload["order"])
        done.set()

    async with (
        open_database(django_dsn) as db,
        kongtask.open_worker(django_dsn, {"confirm_order": confirm_order}, poll_interval=3600) as w,
    ):
        await wait_until(lambda: w.statistics().fetcher == "waiting for jobs")
        with pytest.raises(ValueError, match="negative order numbers"):
            await trio.to_thread.run_sync(_post, -1)
        assert await db.fetchval("select count(*) from orders_order where number = -1") == 0
        assert await db.fetchval(f"select count(*) from {S}._private_jobs") == 0

        response = await trio.to_thread.run_sync(_post, 7)
        assert response.status_code == 200
        order_id = response.json()["order"]
        with trio.fail_after(10):
            await done.wait()
        await wait_until(lambda: w.statistics().completed == 1)
        assert await db.fetchval("select number from orders_order where id = $1", order_id) == 7
    assert confirmed == [order_id]
