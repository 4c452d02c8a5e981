"""A ``jobs:insert`` notification that arrives while the pool waits for jobs sends the
claim itself, from the asyncio side (``FetchWakeup.arm`` / ``jobs_inserted`` in
kongtask._worker._fetcher); the fetcher wakes to take the reply.

Rules: real PostgreSQL and real notifications; the pool's polls are made too rare to
wake the fetcher during a test, so every claim here is one a notification caused.
"""

from __future__ import annotations

from typing import Any

import trio
from test_worker import wait_until

import kongtask
from kongtask._pg import Database
from kongtask._worker._claim_sizing import ClaimSizer
from kongtask._worker._fetcher import FetchWakeup

S = "graphile_worker"


def test_an_armed_claim_is_sent_once_then_the_fetcher_is_woken() -> None:
    wakeup = FetchWakeup(ClaimSizer(1, 10, lookahead=0.1))
    sent: list[int] = []
    wakeup.arm(lambda: sent.append(1))
    wakeup.jobs_inserted()
    wakeup.jobs_inserted()  # disarmed by the first: a nudge only
    assert sent == [1]
    assert wakeup.pending()
    wakeup.forget()
    wakeup.arm(lambda: sent.append(2))
    wakeup.arm(None)
    wakeup.jobs_inserted()
    assert sent == [1]
    assert wakeup.pending()


def _ids(event: kongtask.Event) -> list[int]:
    ids = event["job_ids"]
    assert isinstance(ids, list | tuple), event
    return [int(i) for i in ids]


async def _waiting(worker: kongtask.Worker) -> None:
    await wait_until(lambda: worker.statistics().fetcher == "waiting for jobs", limit=30)


async def test_a_job_added_to_a_waiting_pool_is_claimed_by_its_notification(
    kongtask_dsn: str,
) -> None:
    started: list[int] = []
    ran = trio.Event()

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started.append(job.id)
        ran.set()

    async with (
        kongtask.open_worker(kongtask_dsn, {"t": handler}, poll_interval=3600) as worker,
        kongtask.open_client(kongtask_dsn) as client,
    ):
        await _waiting(worker)
        io: Any = worker._io
        before = io.claims_sent_on_notify
        job = await client.add_job("t", {})
        with trio.fail_after(30):
            await ran.wait()
        assert started == [job.id]
        assert io.claims_sent_on_notify == before + 1


async def test_a_claim_sent_as_the_pool_stops_is_handed_back(
    kongtask_dsn: str, db: Database
) -> None:
    """Here the fetcher takes the reply in its loop and holds the job; when the stop
    reaches it first, it takes the reply on its way out (``_take_sent_at_exit``), and
    behind both the pool's final release unlocks whatever is still locked."""
    events: list[kongtask.Event] = []

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        raise AssertionError("a job claimed during the shutdown must not start")

    async with kongtask.open_worker(
        kongtask_dsn, {"t": handler}, poll_interval=3600, on_event=events.append
    ) as worker:
        await _waiting(worker)
        # a row without add_job's notification: the notification below is the only one
        job_id = await db.fetchval(
            f"insert into {S}._private_jobs (task_id, payload) "
            f"select id, '{{}}'::json from {S}._private_tasks where identifier = 't' "
            "returning id"
        )
        wake: Any = worker._wakeup
        wake.jobs_inserted()  # sends the claim (it locks the row) ...
        worker.shutdown_nowait()  # ... and the pool stops before the fetcher has the reply
        await worker.wait_stopped()
    row = await db.fetchrow(f"select attempts, locked_by from {S}._private_jobs")
    assert row is not None
    assert (row["attempts"], row["locked_by"]) == (0, None)
    returned = [e for e in events if e.name == "job:returned" and job_id in _ids(e)]
    assert [e["reason"] for e in returned] == ["shutdown"]


async def test_forbidden_flags_that_raise_leave_nothing_armed(kongtask_dsn: str) -> None:
    """The armed claim reads the forbidden flags when the fetcher starts to wait: an
    error there (user code) arms nothing and raises nothing; the claim sent on waking
    reads them again, reports the error and retries, as for any claim."""
    broken = False

    def flags() -> list[str]:
        if broken:
            raise RuntimeError("flags unavailable")
        return []

    async def handler(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        pass

    async with kongtask.open_worker(
        kongtask_dsn, {"t": handler}, poll_interval=3600, forbidden_flags=flags
    ) as worker:
        await _waiting(worker)
        fetcher: Any = worker._fetcher
        wakeup: Any = worker._wakeup
        assert wakeup._armed is not None  # armed by the waiting fetcher
        wakeup.arm(None)
        broken = True
        fetcher._arm_claim(object())  # what the fetcher does before each wait
        assert wakeup._armed is None
        broken = False
        fetcher._arm_claim(object())
        assert wakeup._armed is not None
        wakeup.arm(None)
        assert not worker.stopping
