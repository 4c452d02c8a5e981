"""The asyncio loop kongtask runs asyncpg on (kongtask._aio_loop).

Its callbacks run in fewer trio scheduling rounds, in the same order, none lost, and
never so many in one round that trio's own tasks starve. Rounds are counted with a trio
instrument (one ``before_io_wait`` per round).
"""

from __future__ import annotations

import asyncio
from typing import Any

import trio
import trio_asyncio

from kongtask._aio_loop import MAX_CALLBACKS_PER_ROUND, run_ready_callbacks_together
from kongtask._pg import open_database


class _Rounds(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def test_a_statement_takes_four_scheduling_rounds(kongtask_dsn: str) -> None:
    # the send, the reply's reader, the resumed coroutine with the caller's wake-up, and
    # the caller (trio-asyncio alone: 7)
    async with open_database(kongtask_dsn, keep_spare=True) as db:
        for _ in range(5):
            assert await db.fetchval("select 1") == 1
        rounds = _Rounds()
        trio.lowlevel.add_instrument(rounds)
        try:
            for _ in range(50):
                await db.fetchval("select 1")
        finally:
            trio.lowlevel.remove_instrument(rounds)
    assert rounds.count <= 4 * 50, rounds.count


async def test_callbacks_run_in_order_none_lost_and_trio_keeps_running() -> None:
    ran: list[int] = []
    trio_progress: list[int] = []
    seen_by_chain: list[int] = []
    total = 20 * MAX_CALLBACKS_PER_ROUND
    async with trio_asyncio.open_loop() as loop:
        assert run_ready_callbacks_together(loop)
        done = trio.Event()

        def chain(n: int) -> None:
            # a callback that schedules the next one: asyncio's busiest pattern
            ran.append(n)
            seen_by_chain.append(len(trio_progress))
            if n + 1 < total:
                loop.call_soon(chain, n + 1)
            else:
                done.set()

        # a batch queued at once, then the chain behind it
        for n in range(-10, 0):
            loop.call_soon(ran.append, n)
        loop.call_soon(chain, 0)

        async def trio_task() -> None:
            while not done.is_set():
                trio_progress.append(1)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_task)
            with trio.fail_after(30):
                await done.wait()
    assert ran == list(range(-10, total))
    # trio's task ran while the chain went on, many times: no round ran all of it (a
    # round runs at most MAX_CALLBACKS_PER_ROUND; scheduling decides where rounds split)
    assert seen_by_chain[0] < seen_by_chain[-1]
    assert len(set(seen_by_chain)) >= total // MAX_CALLBACKS_PER_ROUND // 2


async def test_asyncio_timers_and_tasks_still_work() -> None:
    async with trio_asyncio.open_loop() as loop:
        assert run_ready_callbacks_together(loop)

        async def sleeper() -> str:
            await asyncio.sleep(0.01)
            await asyncio.sleep(0)
            return "slept"

        result: Any = await trio_asyncio.aio_as_trio(sleeper)()
        assert result == "slept"
        fired = trio.Event()
        loop.call_later(0.01, fired.set)
        with trio.fail_after(10):
            await fired.wait()


def test_an_unknown_loop_is_left_alone() -> None:
    class NotTrioAsyncio:
        pass

    loop = NotTrioAsyncio()
    assert not run_ready_callbacks_together(loop)
    assert not hasattr(loop, "_main_loop_one")
