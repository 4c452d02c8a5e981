"""``kongtask.task(fn, process=True)``: CPU-bound sync handlers in worker processes.

Rules: real PostgreSQL, real trio-parallel worker processes; waits bounded by fail_after.
"""

from __future__ import annotations

import os

import pytest
import trio
from process_tasks import crunch, stall
from test_worker import wait_until

import kongtask
from kongtask._pg import open_database
from kongtask._worker import open_worker

J = "graphile_worker._private_jobs"


async def test_process_handlers_run_in_another_process_and_fail_there(worker_dsn: str) -> None:
    async with open_database(worker_dsn) as db:
        await db.execute("select graphile_worker.add_job('crunch') from generate_series(1, 5)")
        await db.execute("""select graphile_worker.add_job('crunch', '{"fail": true}')""")
        async with open_worker(
            worker_dsn, {"crunch": kongtask.task(crunch, process=True)}, concurrency=3
        ) as worker:
            await wait_until(lambda: worker.statistics().completed == 5, limit=60)
            await wait_until(lambda: worker.statistics().failed == 1, limit=60)
        row = await db.fetchrow(f"select attempts, last_error, locked_by from {J}")
        assert row is not None
        assert (row["attempts"], row["locked_by"]) == (1, None)
        message = row["last_error"].splitlines()[0]
        assert message.startswith("failed in pid ")
        assert int(message.split()[3]) != os.getpid()


async def test_a_timeout_kills_a_process_handler_that_never_yields(worker_dsn: str) -> None:
    async with open_database(worker_dsn) as db:
        await db.execute("select graphile_worker.add_job('stall')")
        async with open_worker(
            worker_dsn, {"stall": kongtask.task(stall, timeout=0.5, process=True)}
        ) as worker:
            # a thread could not be stopped: this would wait ten minutes
            await wait_until(lambda: worker.statistics().failed == 1, limit=30)
        last_error = await db.fetchval(f"select last_error from {J}")
        assert last_error.startswith("timed out after 0.5 s")


async def _async_handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
    return None


def test_process_handlers_are_checked_when_declared() -> None:
    with pytest.raises(kongtask.ConfigError, match="plain function"):
        kongtask.task(_async_handler, process=True)
    with pytest.raises(kongtask.ConfigError, match="cannot be pickled"):
        kongtask.task(lambda job: None, process=True)
    with pytest.raises(kongtask.ConfigError, match=r"called as handler\(job\)"):
        trio.run(_open_with, {"t": kongtask.task(_two_args, process=True)})


def _two_args(job: kongtask.Job, ctx: object, extra: object) -> None:
    return None


async def _open_with(tasks: dict[str, kongtask.TaskSpec]) -> None:
    async with open_worker("postgresql://nowhere.invalid/x", tasks):
        pass
