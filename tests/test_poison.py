"""Poison jobs: whatever a handler raises fails that job and nothing else.

A handler may raise any ``BaseException``: ``asyncio.CancelledError`` (from asyncio code
reached through trio-asyncio), ``KeyboardInterrupt``, ``GeneratorExit``, a user subclass,
an exception group holding them, even a stale ``trio.Cancelled``. Each fails its own job
(the attempt counts, ``last_error`` names the exception) and the pool carries on. Only
cancellation delivered by the pool (timeout, ``ctx.cancel_scope``, shutdown), an outer
scope's cancellation and an exception raised by a real signal's handler stop a handler
without being its own failure.

Rules: real PostgreSQL, real pools, a real ``kongtask run`` process; no sleeps to wait for
a result (polling under an absolute ``fail_after``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from _worker_helpers import add_job_row
from test_cli_run import kongtask_argv
from test_worker import assert_clean, wait_until

import kongtask
from kongtask._pg import Database

S = "graphile_worker"
J = f"{S}._private_jobs"


class Poison(BaseException):
    """A user subclass of ``BaseException``."""


async def _grab_cancelled() -> trio.Cancelled:
    """A real ``trio.Cancelled`` from a scope that has already ended."""
    with trio.CancelScope() as inner:
        inner.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


# async handlers: (task, what it raises, how last_error must begin)
ASYNC_POISON: dict[str, tuple[Callable[[], BaseException], str]] = {
    "a_asyncio_cancelled": (lambda: asyncio.CancelledError("x"), "CancelledError: x"),
    "a_keyboard_interrupt": (lambda: KeyboardInterrupt("ki"), "KeyboardInterrupt: ki"),
    "a_generator_exit": (lambda: GeneratorExit("ge"), "GeneratorExit: ge"),
    "a_user_base": (lambda: Poison("pb"), "Poison: pb"),
    "a_bare_keyboard_interrupt": (KeyboardInterrupt, "KeyboardInterrupt\n"),
    "a_group": (
        lambda: BaseExceptionGroup("grp", [KeyboardInterrupt("inner"), ValueError("v")]),
        "BaseExceptionGroup: grp (2 sub-exceptions)",
    ),
}
# the same, raised in a thread by a plain function
SYNC_POISON = {f"s{name[1:]}": spec for name, spec in ASYNC_POISON.items()}


def _async_handler(make: Callable[[], BaseException]) -> Callable[..., Any]:
    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.lowlevel.checkpoint()
        raise make()

    return handler


def _sync_handler(make: Callable[[], BaseException]) -> Callable[..., Any]:
    def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        raise make()

    return handler


async def nursery_child_raises_cancelled_error(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    async def child() -> None:
        await trio.lowlevel.checkpoint()
        raise asyncio.CancelledError("from a child")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child)
        nursery.start_soon(trio.sleep_forever)


async def stale_cancelled(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    raise await _grab_cancelled()


async def error_while_cancelled(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    """Its own cancel scope is cancelled, and a child raises while unwinding: the
    handler raises a group of ``trio.Cancelled`` and a real error."""

    async def raises_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise KeyboardInterrupt("while cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(raises_on_cancel)
        nursery.start_soon(trio.sleep_forever)
        await trio.lowlevel.checkpoint()
        ctx.cancel_scope.cancel()


EXTRA_POISON: dict[str, tuple[Callable[..., Any], str]] = {
    "a_nursery_child": (nursery_child_raises_cancelled_error, "BaseExceptionGroup: "),
    "a_stale_cancelled": (stale_cancelled, "Cancelled: "),
    "a_error_while_cancelled": (error_while_cancelled, "Job was cancelled\n"),
}


async def _settled(db: Database, ids: list[int], attempts: int) -> bool:
    n = await db.fetchval(
        f"select count(*) from {J} where id = any($1) and attempts = $2 and locked_by is null",
        ids,
        attempts,
    )
    return bool(n == len(ids))


async def test_poison_handlers_fail_only_their_job(tdb: Database, worker_dsn: str) -> None:
    tasks: dict[str, Any] = {}
    expected: dict[str, str] = {}
    for name, (make, text) in ASYNC_POISON.items():
        tasks[name], expected[name] = _async_handler(make), text
    for name, (make, text) in SYNC_POISON.items():
        tasks[name], expected[name] = _sync_handler(make), text
    for name, (handler, text) in EXTRA_POISON.items():
        tasks[name], expected[name] = handler, text
    ordinary_done: list[int] = []

    async def ordinary(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.lowlevel.checkpoint()
        ordinary_done.append(job.id)

    tasks["ordinary"] = ordinary
    poison = {await add_job_row(tdb, name, max_attempts=2): name for name in expected}
    ids = sorted(poison)
    ordinary_ids = [await add_job_row(tdb, "ordinary") for _ in range(20)]
    async with kongtask.open_worker(worker_dsn, tasks, concurrency=4, poll_interval=0.2) as w:
        await wait_until(lambda: _settled(tdb, ids, 1), limit=30)
        await wait_until(lambda: len(ordinary_done) == len(ordinary_ids), limit=30)
        rows = await tdb.fetch(f"select id, last_error from {J} where id = any($1)", ids)
        for row in rows:
            name = poison[row["id"]]
            assert row["last_error"].startswith(expected[name]), (name, row["last_error"])
        errors = {poison[r["id"]]: r["last_error"] for r in rows}
        assert "CancelledError: from a child" in errors["a_nursery_child"]
        assert "KeyboardInterrupt: while cancelled" in errors["a_error_while_cancelled"]
        # due again at once: the second attempt is the last
        await tdb.execute(f"update {J} set run_at = now() where id = any($1)", ids)
        await wait_until(lambda: _settled(tdb, ids, 2), limit=30)
        assert not w.stopping
        assert w.statistics().failed == 2 * len(ids)
        # the pool still runs jobs
        late = await add_job_row(tdb, "ordinary")
        await wait_until(lambda: late in ordinary_done, limit=30)
        assert not w.stopping
    assert sorted(ordinary_done) == sorted([*ordinary_ids, late])
    left = await tdb.fetchval(f"select count(*) from {J} where not (id = any($1))", ids)
    assert left == 0
    await assert_clean(tdb)


async def test_a_real_sigint_in_a_handler_stops_the_pool(tdb: Database, worker_dsn: str) -> None:
    """A SIGINT whose ``KeyboardInterrupt`` trio raises inside a running handler (the host
    owns signals, trio's default delivery) stops the pool; the job is not failed."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        pytest.skip("trio's KeyboardInterrupt delivery is not installed here")
    reached = trio.Event()

    async def interrupted(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        reached.set()
        # delivered in this frame by trio's SIGINT handler (this code is not protected);
        # where the pool receives signals itself, this returns and the pool stops gracefully
        signal.raise_signal(signal.SIGINT)

    job_id = await add_job_row(tdb, "interrupted")
    interrupted_by_ki = False
    try:
        async with kongtask.open_worker(worker_dsn, {"interrupted": interrupted}) as w:
            with trio.fail_after(20):
                await reached.wait()
                await w.wait_stopped()
    except KeyboardInterrupt:
        interrupted_by_ki = True
    row = await tdb.fetchrow(
        f"select attempts, last_error, locked_by from {J} where id = $1", job_id
    )
    # gone (the handler returned in a graceful shutdown) or handed back, never failed
    assert row is None or (row["last_error"], row["locked_by"]) == (None, None)
    if row is not None:
        assert interrupted_by_ki
    await assert_clean(tdb)


POISON_MODULE = """
import asyncio

class Poison(BaseException):
    pass

async def cancelled(job, ctx):
    raise asyncio.CancelledError("x")

async def interrupt(job, ctx):
    raise KeyboardInterrupt("from the handler")

def thread_poison(job, ctx):
    raise Poison("in a thread")

async def ok(job, ctx):
    pass

tasks = {"cancelled": cancelled, "interrupt": interrupt, "thread_poison": thread_poison,
         "ok": ok}
"""


async def test_run_once_with_poison_jobs_exits_0(
    tdb: Database, worker_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "poison_tasks.py").write_text(POISON_MODULE)
    poison = {
        await add_job_row(tdb, name, max_attempts=2): name
        for name in ("cancelled", "interrupt", "thread_poison")
    }
    ok = [await add_job_row(tdb, "ok") for _ in range(3)]
    with trio.fail_after(60):
        proc = await trio.run_process(
            kongtask_argv("run", "-c", worker_dsn, "--tasks", "poison_tasks", "--once"),
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    rows = await tdb.fetch(f"select id, attempts, last_error, locked_by from {J}")
    assert sorted(r["id"] for r in rows) == sorted(poison)  # the ok jobs completed
    assert not set(ok) & {r["id"] for r in rows}
    texts = {poison[r["id"]]: r["last_error"].split("\n", 1)[0] for r in rows}
    assert texts == {
        "cancelled": "CancelledError: x",
        "interrupt": "KeyboardInterrupt: from the handler",
        "thread_poison": "Poison: in a thread",
    }
    assert all((r["attempts"], r["locked_by"]) == (1, None) for r in rows)
    await assert_clean(tdb)


async def test_outer_cancellation_is_not_a_job_failure(tdb: Database, worker_dsn: str) -> None:
    """A scope around the pool cancelled: handlers get that scope's ``trio.Cancelled``, the
    pool is torn down and the job goes back unfailed."""
    reached = trio.Event()

    async def waits(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        reached.set()
        await trio.sleep_forever()

    job_id = await add_job_row(tdb, "waits")
    with trio.fail_after(30), trio.CancelScope() as outer:
        async with kongtask.open_worker(worker_dsn, {"waits": waits}):
            await reached.wait()
            outer.cancel()
            await trio.sleep_forever()
    assert outer.cancelled_caught
    row = await tdb.fetchrow(
        f"select attempts, last_error, locked_by from {J} where id = $1", job_id
    )
    assert row is not None
    assert (row["last_error"], row["locked_by"]) == (None, None)
    await assert_clean(tdb)
