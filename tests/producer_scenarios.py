"""The behaviour every producer must have, written once (not a test module).

Each ``tests/test_producers_<driver>.py`` module provides a ``driver`` fixture (a
:class:`Driver`) and imports the ``test_*`` functions below, so pytest runs them once per
driver. A driver opens its own connection in a worker thread and hands the test a
:class:`Tx`: sync methods that run on that connection inside one open transaction (an
asyncio driver runs each call on a private event loop of that thread).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import pytest
import trio

import kongtask
import kongtask.aio
from kongtask import ConfigError, Job, JobSpec, KongtaskError
from kongtask._pg import Database

T = TypeVar("T")
S = "graphile_worker"

# what a driver's test module takes with `from producer_scenarios import *`
__all__ = [
    "test_a_failed_enqueue_aborts_the_transaction",
    "test_a_savepoint_keeps_the_transaction_after_a_failed_enqueue",
    "test_bad_arguments_fail_as_in_the_trio_client_before_anything_is_sent",
    "test_commit_wakes_an_idle_pool",
    "test_job_keys_and_batches_as_the_trio_client",
    "test_rolled_back_jobs_never_exist",
    "test_typed_task_definitions",
]


class Tx(Protocol):
    """One open transaction on the driver's connection."""

    def add_job(self, *args: Any, **kwargs: Any) -> Job: ...
    def add_jobs(self, specs: list[JobSpec], **kwargs: Any) -> list[Job]: ...
    def execute(self, sql: str) -> None:
        """Run a statement of the application's own (a business write)."""

    def savepoint(self) -> AbstractContextManager[None]:
        """The driver's own way of opening a savepoint (rolled back if the block raises)."""

    def break_transaction(self) -> None:
        """Run a failing statement and swallow the driver's error: the transaction is
        now aborted, so any further statement fails at the server."""


class Driver(Protocol):
    def transaction(self, dsn: str, body: Callable[[Tx], T], *, commit: bool = True) -> T:
        """Open a connection, begin, run ``body``, then commit (or roll back), close.
        If ``body`` raises, roll back and re-raise."""


async def in_thread(driver: Driver, dsn: str, body: Callable[[Tx], T], commit: bool = True) -> T:
    return await trio.to_thread.run_sync(lambda: driver.transaction(dsn, body, commit=commit))


async def count(db: Database, table: str) -> int:
    return int(await db.fetchval(f"select count(*) from {table}"))


async def wait_until(pred: Callable[[], object], limit: float = 10) -> None:
    with trio.fail_after(limit):
        while True:
            if pred():
                return
            await trio.sleep(0.01)


# --- the scenarios ------------------------------------------------------------------------


async def test_rolled_back_jobs_never_exist(
    driver: Driver, appdb: Database, kongtask_dsn: str
) -> None:
    def body(tx: Tx) -> None:
        tx.execute("insert into orders values (1)")
        tx.add_job("t", {"n": 1})
        tx.add_jobs([JobSpec("t", {"n": 2}), JobSpec("u")])

    await in_thread(driver, kongtask_dsn, body, commit=False)
    assert await count(appdb, f"{S}._private_jobs") == 0
    assert await count(appdb, "orders") == 0


async def test_commit_wakes_an_idle_pool(
    driver: Driver, appdb: Database, kongtask_dsn: str
) -> None:
    seen: list[object] = []
    all_seen = trio.Event()

    async def handler(job: Job, ctx: kongtask.JobContext) -> None:
        seen.append(job.payload)
        if len(seen) == 3:
            all_seen.set()

    def body(tx: Tx) -> list[Job]:
        tx.execute("insert into orders values (1)")
        return [tx.add_job("t", {"n": 1}), *tx.add_jobs([JobSpec("t", 2), JobSpec("t", 3)])]

    # poll_interval=3600: only the commit's NOTIFY can wake the pool in time
    async with kongtask.open_worker(kongtask_dsn, {"t": handler}, poll_interval=3600) as w:
        await wait_until(
            lambda: w.statistics().fetcher == "waiting for jobs"
        )  # the first claim found nothing
        added = await in_thread(driver, kongtask_dsn, body)
        with trio.fail_after(10):
            await all_seen.wait()
        await wait_until(lambda: w.statistics().completed == 3)
    assert sorted(seen, key=str) == [2, 3, {"n": 1}]
    assert {job.task_identifier for job in added} == {"t"}
    assert await count(appdb, f"{S}._private_jobs") == 0
    assert await count(appdb, "orders") == 1


T1 = datetime(2100, 1, 1, tzinfo=UTC)
T2 = T1 + timedelta(days=1)


def _script(add_job: Callable[..., Any], add_jobs: Callable[..., Any]) -> list[object]:
    """The same calls for a producer and for the trio client; what they return."""
    return [
        add_job("a", {"v": 1}, job_key="K", run_at=T1),
        add_job("a", {"v": 2}, job_key="K", run_at=T2, job_key_mode="replace"),
        add_job("a", {"v": 3}, job_key="K", run_at=T1, job_key_mode="preserve_run_at"),
        add_job("b", {"v": 4}, job_key="K", job_key_mode="unsafe_dedupe"),
        add_job("new_task", None, queue_name="new_queue", priority=-2, flags=["f"]),
        add_job("new_task", [1], queue_name="new_queue", max_attempts=3),
        add_jobs(
            [
                JobSpec("a", {"v": 5}, job_key="K", run_at=T1),
                JobSpec("bulk", "x", queue_name="q2", priority=3, flags=["g", "h"]),
                JobSpec("bulk", None, job_key="B", run_at=T2),
            ],
            job_key_preserve_run_at=True,
        ),
        add_jobs([]),
    ]


def _job(result: object) -> Job:
    assert isinstance(result, Job), result
    return result


def _batch(result: object) -> list[Job]:
    assert isinstance(result, list), result
    return [_job(job) for job in result]


def _shape(result: object) -> object:
    """A job without what differs between two databases (creation times)."""
    if isinstance(result, list):  # a batch comes back in the specs' order
        return [_shape(job) for job in result]
    assert isinstance(result, Job)
    return (
        result.task_identifier,
        result.payload,
        result.queue_name,
        result.priority,
        result.run_at if result.run_at > T1 - timedelta(days=1) else "now",
        result.attempts,
        result.max_attempts,
        result.key,
        result.flags,
        result.revision,
        result.last_error,
        result.locked_at,
        result.locked_by,
    )


async def test_job_keys_and_batches_as_the_trio_client(
    driver: Driver, kongtask_dsn: str, second_dsn: str
) -> None:
    producer_dsn, client_dsn = kongtask_dsn, second_dsn
    got = await in_thread(driver, producer_dsn, lambda tx: _script(tx.add_job, tx.add_jobs))

    async with kongtask.open_client(client_dsn) as client:
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        _script(
            lambda *a, **k: calls.append(("add_job", a, k)),
            lambda *a, **k: calls.append(("add_jobs", a, k)),
        )
        expected = [await getattr(client, name)(*a, **k) for name, a, k in calls]

    assert [_shape(r) for r in got] == [_shape(r) for r in expected]
    # and the absolute facts, in case both were wrong alike
    first, replaced, preserved, deduped = map(_job, got[:4])
    assert (replaced.payload, replaced.run_at, replaced.revision) == ({"v": 2}, T2, 1)
    assert (preserved.payload, preserved.run_at, preserved.revision) == ({"v": 3}, T2, 2)
    assert (deduped.task_identifier, deduped.payload) == ("a", {"v": 3})
    assert first.id == replaced.id == preserved.id == deduped.id
    new1, new2 = map(_job, got[4:6])
    assert (new1.task_identifier, new1.queue_name, new1.flags) == (
        "new_task",
        "new_queue",
        frozenset({"f"}),
    )
    assert (new2.payload, new2.max_attempts, new2.priority) == ([1], 3, 0)
    batch_jobs = _batch(got[6])
    assert [job.payload for job in batch_jobs] == [{"v": 5}, "x", {}]
    batch = {job.key or job.payload: job for job in batch_jobs}
    assert (batch["K"].run_at, batch["K"].payload) == (T2, {"v": 5})
    assert (batch["x"].queue_name, batch["x"].flags) == ("q2", frozenset({"g", "h"}))
    assert got[7] == []


def _bad_calls() -> Iterator[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    naive = datetime(2030, 1, 1)
    yield "add_job", ("t",), {"run_at": naive}
    yield "add_job", ("t",), {"job_key_mode": "upsert"}
    yield "add_job", ("t",), {"priority": 40000}
    yield "add_job", ("t",), {"max_attempts": 0}
    yield "add_job", ("x" * 129,), {}
    yield "add_job", ("t", {"v": math.nan}), {}
    yield "add_job", ("t",), {"flags": "gpu"}
    yield "add_job", ("t",), {"job_key": ""}
    yield "add_job", ("t",), {"queue_name": "a\x00b"}
    yield "add_jobs", ([JobSpec("t", job_key="k"), JobSpec("u", job_key="k")],), {}
    yield "add_jobs", ([JobSpec("t"), JobSpec("t", {1, 2})],), {}
    yield "add_jobs", ([JobSpec("t"), "t"],), {}
    yield "add_jobs", ([JobSpec("t")],), {"job_key_preserve_run_at": "yes"}


async def test_bad_arguments_fail_as_in_the_trio_client_before_anything_is_sent(
    driver: Driver, appdb: Database, kongtask_dsn: str
) -> None:
    expected: list[str] = []
    async with kongtask.open_client(kongtask_dsn) as client:
        for name, args, kwargs in _bad_calls():
            with pytest.raises(ConfigError) as info:
                await getattr(client, name)(*args, **kwargs)
            expected.append(str(info.value))

    def body(tx: Tx) -> list[str]:
        messages = []
        # an aborted transaction: anything sent would fail with the driver's error
        tx.break_transaction()
        for name, args, kwargs in _bad_calls():
            with pytest.raises(ConfigError) as info:
                getattr(tx, name)(*args, **kwargs)
            messages.append(str(info.value))
        with pytest.raises(Exception) as sent:
            tx.add_job("t")  # proves the transaction really refuses statements
        assert not isinstance(sent.value, KongtaskError)
        return messages

    got = await in_thread(driver, kongtask_dsn, body, commit=False)
    assert got == expected
    assert await count(appdb, f"{S}._private_jobs") == 0


async def test_a_failed_enqueue_aborts_the_transaction(
    driver: Driver, appdb: Database, kongtask_dsn: str
) -> None:
    def body(tx: Tx) -> None:
        tx.execute("insert into orders values (1)")
        with pytest.raises(KongtaskError, match="schema 'nope' is not installed"):
            tx.add_job("t", schema="nope")
        # PostgreSQL refuses every further statement of this transaction
        with pytest.raises(Exception) as later:
            tx.execute("insert into orders values (2)")
        assert not isinstance(later.value, KongtaskError)

    await in_thread(driver, kongtask_dsn, body, commit=False)
    assert await count(appdb, "orders") == 0


async def test_a_savepoint_keeps_the_transaction_after_a_failed_enqueue(
    driver: Driver, appdb: Database, kongtask_dsn: str
) -> None:
    def body(tx: Tx) -> None:
        tx.execute("insert into orders values (1)")
        with pytest.raises(KongtaskError, match="schema 'nope' is not installed"), tx.savepoint():
            tx.add_job("t", schema="nope")
        tx.add_job("t", {"after": "savepoint"})
        tx.execute("insert into orders values (2)")

    await in_thread(driver, kongtask_dsn, body)
    assert await count(appdb, "orders") == 2
    payload = await appdb.fetchval(f"select payload::text from {S}._private_jobs")
    assert payload == '{"after":"savepoint"}'


async def test_typed_task_definitions(driver: Driver, kongtask_dsn: str) -> None:
    from typed_tasks import Resize, resize, send_email

    def body(tx: Tx) -> list[Job]:
        return [
            tx.add_job(send_email.spec({"to": "a@example.com"}, priority=1)),
            *tx.add_jobs([resize.spec(Resize("a.png", 10))]),
        ]

    email, image = await in_thread(driver, kongtask_dsn, body)
    assert (email.task_identifier, email.payload, email.priority) == (
        "send_email",
        {"to": "a@example.com"},
        1,
    )
    assert image.payload == {"path": "a.png", "width": 10}
    assert resize.payload_of(image) == Resize("a.png", 10)
    assert send_email.payload_of(email) == {"to": "a@example.com"}


class AsyncTx:
    """A :class:`Tx` over an asyncio driver: each call runs on ``loop`` (this thread's own)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: object,
        execute: Callable[[str], Awaitable[object]],
        savepoint: Callable[[], AbstractAsyncContextManager[object]],
        error: type[BaseException],
    ) -> None:
        self.loop, self.target, self._execute = loop, target, execute
        self._savepoint, self._error = savepoint, error

    def add_job(self, *args: Any, **kwargs: Any) -> Job:
        return self.loop.run_until_complete(kongtask.aio.add_job(self.target, *args, **kwargs))

    def add_jobs(self, specs: list[JobSpec], **kwargs: Any) -> list[Job]:
        return self.loop.run_until_complete(kongtask.aio.add_jobs(self.target, specs, **kwargs))

    def execute(self, sql: str) -> None:
        self.loop.run_until_complete(self._execute(sql))

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        manager = self._savepoint()
        self.loop.run_until_complete(manager.__aenter__())
        try:
            yield
        except BaseException as exc:
            self.loop.run_until_complete(manager.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        self.loop.run_until_complete(manager.__aexit__(None, None, None))

    def break_transaction(self) -> None:
        with pytest.raises(self._error):
            self.execute("select 1/0")
