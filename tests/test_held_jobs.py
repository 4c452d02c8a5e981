"""Held jobs (claimed by a pool, not started yet): a job removed, replaced or administered
while held never starts, and no hand-back path resurrects it (issue: "a removed or
replaced job must never run").

How a job is held deterministically: one worker (concurrency 1) runs a "block" job whose
handler waits on a trio.Event, and the pool's claim size is pinned (``PINNED``: a minimum
prefetch) so that its first claim takes every ready job at once. The keyed jobs are then
locked by the pool and unstarted for as long as the test wants. The recheck threshold is
set to 1 ms (``RECHECK_ALWAYS``) where a test needs every held job rechecked before it
starts (the real threshold is a trade of round trips against a window, see
docs/reliability.md, and is tested as pure logic).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
from _worker_helpers import add_job_row
from test_recovery import FailingClaims

import kongtask
from kongtask import _held
from kongtask._held import needs_recheck
from kongtask._pg import Database, open_database
from kongtask._sql import WorkerQueries
from kongtask.testing import WorkerTiming

S = "graphile_worker"
J = f"{S}._private_jobs"
JQ = f"{S}._private_job_queues"
#: what the pinned claim takes at once (more than any test adds)
CLAIM = 40


#: Pools claim up to CLAIM jobs whatever their measured rate (with ``batch_size=CLAIM``).
PINNED = WorkerTiming(min_prefetch=CLAIM)
#: Pinned claims, and held jobs are rechecked unless claimed or rechecked within the last
#: millisecond (every job of these tests waits far longer while the block job holds the
#: worker).
RECHECK_ALWAYS = WorkerTiming(min_prefetch=CLAIM, recheck_after=0.001)


class Runs:
    """The "block" and "rec" handlers: block waits for ``release``; rec records runs."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.blocking = trio.Event()
        self.ran: list[tuple[int, str | None, Any]] = []
        self.events: list[kongtask.Event] = []

    async def block(self, job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        self.blocking.set()
        await self.release.wait()

    async def rec(self, job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        self.ran.append((job.id, job.key, job.payload))

    def tasks(self) -> dict[str, Any]:
        return {"block": self.block, "rec": self.rec}

    def on_event(self, event: kongtask.Event) -> None:
        self.events.append(event)


async def wait_until(pred: Any, limit: float = 20) -> None:
    with trio.fail_after(limit):
        while True:
            value = pred()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await trio.sleep(0.01)


async def jobs_left(db: Database) -> int:
    return int(await db.fetchval(f"select count(*) from {J}"))


async def locked_by(db: Database, pool_id: str) -> set[int]:
    rows = await db.fetch(f"select id from {J} where locked_by = $1", pool_id)
    return {int(r["id"]) for r in rows}


async def add_scenario(db: Database, keys: int = 10) -> dict[str, int]:
    """One block job (priority 0) and keyed jobs k1..k<keys> (priority 1): key -> id."""
    await add_job_row(db, "block", priority=0)
    ids = {}
    for n in range(1, keys + 1):
        ids[f"k{n}"] = await add_job_row(db, "rec", f'{{"v": "old{n}"}}', key=f"k{n}", priority=1)
    return ids


async def remove_and_replace(client: kongtask.Client) -> dict[str, int]:
    """remove_job k1..k3; add_job again (new payload) for k4..k6: key -> new id."""
    for n in (1, 2, 3):
        removed = await client.remove_job(f"k{n}")
        assert removed is not None
    new = {}
    for n in (4, 5, 6):
        job = await client.add_job("rec", {"v": f"new{n}"}, job_key=f"k{n}", priority=1)
        new[f"k{n}"] = job.id
    return new


def check_runs(runs: Runs, old: dict[str, int], new: dict[str, int]) -> None:
    ran_ids = [job_id for job_id, _, _ in runs.ran]
    assert len(ran_ids) == len(set(ran_ids)), f"a job ran twice: {runs.ran}"
    for key in ("k1", "k2", "k3", "k4", "k5", "k6"):
        assert old[key] not in ran_ids, f"removed or replaced {key} ran: {runs.ran}"
    for key, job_id in new.items():
        assert ran_ids.count(job_id) == 1, f"replacement {key} did not run once: {runs.ran}"
    payloads = {p["v"] for _, _, p in runs.ran}
    assert not payloads & {"old1", "old2", "old3", "old4", "old5", "old6"}
    for key in ("k7", "k8", "k9", "k10"):
        assert ran_ids.count(old[key]) == 1, f"untouched {key} did not run once: {runs.ran}"


# ---------------------------------------------------------------------------
# pure logic: when a held job is rechecked


def test_recheck_policy() -> None:
    after = _held.RECHECK_AFTER
    # a job that starts soon after its claim is never rechecked
    assert not needs_recheck(10.0, 10.0 - after / 2, -1e9, -1e9)
    # one that waited longer is
    assert needs_recheck(10.0, 10.0 - after, -1e9, -1e9)
    # ... unless a recent recheck covered it (claimed no later than the newest it covered)
    assert not needs_recheck(10.0, 9.0, 9.0, 10.0 - after / 2)
    # a recheck that did not cover it (claimed later) does not count
    assert needs_recheck(10.0, 9.5, 9.0, 10.0 - after / 2)
    # and a covering recheck grows old too
    assert needs_recheck(10.0, 9.0, 9.5, 10.0 - after)


# ---------------------------------------------------------------------------
# the reproduction, both paths


@pytest.mark.parametrize("shutdown", [False, True], ids=["carry-on", "shutdown"])
async def test_removed_or_replaced_held_job_never_runs(worker_dsn: str, shutdown: bool) -> None:
    await _reproduction(worker_dsn, shutdown)


@pytest.mark.oracle
@pytest.mark.parametrize("shutdown", [False, True], ids=["carry-on", "shutdown"])
async def test_removed_or_replaced_held_job_never_runs_on_graphile_workers_schema(
    gw_dsn: str, shutdown: bool
) -> None:
    await _reproduction(gw_dsn, shutdown)


async def _reproduction(dsn: str, shutdown: bool) -> None:
    runs = Runs()
    async with open_database(dsn) as db, kongtask.open_client(dsn) as client:
        old = await add_scenario(db)
        async with kongtask.open_worker(
            dsn, runs.tasks(), batch_size=CLAIM, on_event=runs.on_event, timing=RECHECK_ALWAYS
        ) as worker:
            with trio.fail_after(20):
                await runs.blocking.wait()
            # every keyed job is held: locked by the pool, not started
            assert set(old.values()) <= await locked_by(db, worker.pool_id)
            assert runs.ran == []
            new = await remove_and_replace(client)
            if shutdown:
                runs.release.set()
                await worker.shutdown()
            else:
                runs.release.set()
                await wait_until(lambda: len(runs.ran) == 4 + 3)
                # and nothing else is left that could run
                await wait_until(lambda: worker.statistics().queued_locally == 0)
        if shutdown:
            assert len(runs.ran) == 0
            # a later pool drains what is runnable
            async with kongtask.open_worker(
                dsn, runs.tasks(), once=True, timing=RECHECK_ALWAYS
            ) as again:
                await again.wait_stopped()
        check_runs(runs, old, new)
        # the removed and replaced old rows are left as graphile-worker intends: no key,
        # attempts = max_attempts, unlocked (never run again)
        rows = await db.fetch(
            f"select id, key, attempts, max_attempts, locked_by from {J} where id = any($1)",
            [old[f"k{n}"] for n in range(1, 7)],
        )
        assert len(rows) == 6
        for r in rows:
            assert (r["key"], r["locked_by"]) == (None, None)
            assert r["attempts"] == r["max_attempts"]


# ---------------------------------------------------------------------------
# hand-back paths


async def test_ttl_hand_back_does_not_resurrect(worker_dsn: str) -> None:
    """TTL expiry returns a removed held job with attempts = max_attempts, and gives an
    untouched one its attempt back (also on its final attempt)."""
    runs = Runs()
    async with open_database(worker_dsn) as db, kongtask.open_client(worker_dsn) as client:
        await add_job_row(db, "block", priority=0)
        removed = await add_job_row(db, "rec", key="gone", priority=1, max_attempts=3)
        final_removed = await add_job_row(db, "rec", key="gone1", priority=1, max_attempts=1)
        kept = await add_job_row(db, "rec", key="kept", priority=1, max_attempts=3)
        final = await add_job_row(db, "rec", priority=1, max_attempts=1)
        async with kongtask.open_worker(
            worker_dsn,
            runs.tasks(),
            batch_size=CLAIM,
            local_queue_ttl=0.5,
            on_event=runs.on_event,
            timing=PINNED,
        ) as worker:
            with trio.fail_after(20):
                await runs.blocking.wait()
            assert {removed, final_removed, kept, final} <= await locked_by(db, worker.pool_id)
            await client.remove_job("gone")
            await client.remove_job("gone1")
            await wait_until(
                lambda: any(
                    e.name == "job:returned" and e.get("reason") == "ttl" for e in runs.events
                )
            )
            rows = {
                int(r["id"]): (r["attempts"], r["locked_by"])
                for r in await db.fetch(f"select id, attempts, locked_by from {J}")
            }
            assert rows[removed] == (3, None)
            assert rows[final_removed] == (1, None)
            assert rows[kept] == (0, None)
            assert rows[final] == (0, None)
            runs.release.set()
        # the untouched ones run once; the removed ones never
        async with kongtask.open_worker(
            worker_dsn, runs.tasks(), once=True, timing=PINNED
        ) as again:
            await again.wait_stopped()
        ran = sorted(job_id for job_id, _, _ in runs.ran)
        assert ran == sorted([kept, final])


@pytest.mark.parametrize("how", ["return_jobs", "return_unknown", "release_pool"])
async def test_hand_back_statements_do_not_resurrect(db: Database, how: str) -> None:
    """Each hand-back statement on rows claimed as one pool: removed and replaced rows keep
    attempts = max_attempts, untouched ones get their attempt back (final attempt too)."""
    from kongtask._held import claim_snapshot
    from kongtask._job import Job
    from kongtask._sql import claim_jobs, register_tasks, return_jobs, return_unknown

    q = WorkerQueries(S)
    pool = "pool-6b6f6e67" + "0123456789"
    client = kongtask.Client(db, S)
    removed = await add_job_row(db, "rec", key="r", max_attempts=2)
    replaced = await add_job_row(db, "rec", key="p", max_attempts=2)
    final_removed = await add_job_row(db, "rec", key="f", max_attempts=1)
    untouched = await add_job_row(db, "rec", key="u", max_attempts=2)
    final = await add_job_row(db, "rec", max_attempts=1)
    task_ids = await db.with_own_connection(register_tasks, q, ["rec"])
    rows = await db.with_own_connection(claim_jobs, q, pool, list(task_ids.values()), 10)
    assert len(rows) == 5
    await client.remove_job("r")
    replacement = await client.add_job("rec", {"new": True}, job_key="p")
    await client.remove_job("f")
    if how == "return_jobs":
        jobs = [Job.from_claim(r, "rec") for r in rows]
        await db.with_own_connection(return_jobs, q, pool, claim_snapshot(jobs))
    elif how == "return_unknown":
        await db.with_own_connection(return_unknown, q, pool, [int(r["id"]) for r in rows])
    else:
        await db.fetchrow(q.release_pool, pool)
    state = {
        int(r["id"]): (r["attempts"], r["max_attempts"], r["locked_by"])
        for r in await db.fetch(f"select id, attempts, max_attempts, locked_by from {J}")
    }
    assert state[removed] == (2, 2, None)
    assert state[replaced] == (2, 2, None)
    assert state[final_removed] == (1, 1, None)
    assert state[untouched] == (0, 2, None)
    assert state[final] == (0, 1, None)
    assert state[replacement.id] == (0, 25, None)


async def test_dead_pool_release_and_force_unlock_keep_attempts(db: Database) -> None:
    """Neither the dead-pool release nor ``kongtask unlock`` gives an attempt back, so
    neither resurrects a removed held job (the interrupted attempt counts)."""
    from kongtask._liveness_sql import LivenessQueries
    from kongtask._sql import claim_jobs, register_tasks

    q = WorkerQueries(S)
    client = kongtask.Client(db, S)
    task_ids = await db.with_own_connection(register_tasks, q, ["rec"])
    for n, pool in enumerate(("pool-6b6f6e67" + "00000000a1", "pool-6b6f6e67" + "00000000a2")):
        gone = await add_job_row(db, "rec", key=f"gone{n}", max_attempts=2)
        kept = await add_job_row(db, "rec", max_attempts=2)
        rows = await db.with_own_connection(claim_jobs, q, pool, list(task_ids.values()), 10)
        assert {int(r["id"]) for r in rows} == {gone, kept}
        await client.remove_job(f"gone{n}")
        if n == 0:
            # nobody holds this pool's liveness lock: it is dead
            release = LivenessQueries(S).release_dead_pools
            row = await db.fetchrow(release, [pool], 0.0, [])
            assert row is not None
            assert list(row["pools"]) == [pool]
        else:
            await client.force_unlock_workers([pool])
        state = {
            int(r["id"]): (r["attempts"], r["locked_by"])
            for r in await db.fetch(
                f"select id, attempts, locked_by from {J} where id = any($1)", [gone, kept]
            )
        }
        assert state == {gone: (2, None), kept: (1, None)}
        await db.execute(f"delete from {J}")


# ---------------------------------------------------------------------------
# operator actions on held jobs


async def test_admin_actions_reach_held_jobs(
    worker_dsn: str,
) -> None:
    runs = Runs()
    later = datetime.now(UTC) + timedelta(days=1)
    async with open_database(worker_dsn) as db, kongtask.open_client(worker_dsn) as client:
        await add_job_row(db, "block", priority=0)
        completed = await add_job_row(db, "rec", priority=1, queue="q1")
        failed = await add_job_row(db, "rec", priority=1)
        rescheduled = await add_job_row(db, "rec", priority=1)
        reprioritised = await add_job_row(db, "rec", priority=1)
        untouched = await add_job_row(db, "rec", priority=2)
        queued_next = await add_job_row(db, "rec", priority=3, queue="q1")
        async with kongtask.open_worker(
            worker_dsn,
            runs.tasks(),
            batch_size=CLAIM,
            on_event=runs.on_event,
            timing=RECHECK_ALWAYS,
        ) as worker:
            with trio.fail_after(20):
                await runs.blocking.wait()
            held = await locked_by(db, worker.pool_id)
            assert {completed, failed, rescheduled, reprioritised, untouched} <= held
            done = await client.complete_jobs([completed])
            assert [j.id for j in done] == [completed]
            done = await client.permanently_fail_jobs([failed], "by hand")
            assert [(j.id, j.last_error) for j in done] == [(failed, "by hand")]
            done = await client.reschedule_jobs([rescheduled], run_at=later)
            assert [(j.id, j.attempts) for j in done] == [(rescheduled, 0)]
            done = await client.reschedule_jobs([reprioritised], priority=5)
            assert [j.id for j in done] == [reprioritised]
            runs.release.set()
            # the untouched job, the reprioritised one (returned, claimed again) and the
            # next job of q1 (its queue was unlocked although its held job was deleted)
            await wait_until(lambda: len(runs.ran) == 3)
            await wait_until(lambda: worker.statistics().queued_locally == 0)
        ran = sorted(job_id for job_id, _, _ in runs.ran)
        assert ran == sorted([untouched, reprioritised, queued_next])
        state = {
            int(r["id"]): r
            for r in await db.fetch(
                f"select id, attempts, max_attempts, last_error, run_at, locked_by from {J}"
            )
        }
        assert completed not in state
        assert state[failed]["attempts"] == state[failed]["max_attempts"]
        assert state[failed]["last_error"] == "by hand"
        assert state[failed]["locked_by"] is None
        assert state[rescheduled]["run_at"] == later
        assert (state[rescheduled]["attempts"], state[rescheduled]["locked_by"]) == (0, None)
        assert await db.fetchval(f"select count(*) from {JQ} where locked_by is not null") == 0


async def test_admin_action_on_a_running_job_lets_it_finish(worker_dsn: str) -> None:
    """complete_jobs on a job that is already running: the row goes, the run finishes,
    and the named queue it held is unlocked when it ends."""
    runs = Runs()
    async with open_database(worker_dsn) as db, kongtask.open_client(worker_dsn) as client:
        running = await add_job_row(db, "block", queue="q")
        after = await add_job_row(db, "rec", queue="q")
        async with kongtask.open_worker(worker_dsn, runs.tasks(), batch_size=CLAIM, timing=PINNED):
            with trio.fail_after(20):
                await runs.blocking.wait()
            done = await client.complete_jobs([running])
            assert [j.id for j in done] == [running]
            runs.release.set()
            await wait_until(lambda: len(runs.ran) == 1)
        assert [job_id for job_id, _, _ in runs.ran] == [after]
        assert await jobs_left(db) == 0


# ---------------------------------------------------------------------------
# hold less


async def test_a_slow_job_after_fast_ones_does_not_hold_the_rest(worker_dsn: str) -> None:
    """3,000 fast jobs, then one slow job, then 20 keyed ones, with one worker: while the
    slow job runs, the pool soon holds nothing else (the prefetch sized for the fast jobs
    goes back), so remove_job deletes the keyed jobs outright; the rest run exactly once."""
    runs = Runs()
    fast_done = 0

    async def fast(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        nonlocal fast_done
        fast_done += 1

    async with open_database(worker_dsn) as db, kongtask.open_client(worker_dsn) as client:
        await client.add_jobs([kongtask.JobSpec("fast", priority=0) for _ in range(3000)])
        slow = await add_job_row(db, "block", priority=1)
        keyed = {
            n: await add_job_row(db, "rec", f'{{"v": {n}}}', key=f"k{n}", priority=2)
            for n in range(1, 21)
        }
        async with kongtask.open_worker(
            worker_dsn, {**runs.tasks(), "fast": fast}, on_event=runs.on_event
        ) as worker:
            with trio.fail_after(60):
                await runs.blocking.wait()
            assert fast_done == 3000
            # the slow job is still running (it waits for `release`)
            await wait_until(lambda: _only(locked_by(db, worker.pool_id), slow), limit=30)
            assert worker.statistics().queued_locally == 0
            for n in range(1, 6):
                removed = await client.remove_job(f"k{n}")
                assert removed is not None
            # unlocked, so deleted (not retired)
            assert (
                await db.fetchval(
                    f"select count(*) from {J} where id = any($1)", [keyed[n] for n in range(1, 6)]
                )
                == 0
            )
            runs.release.set()
            await wait_until(lambda: len(runs.ran) == 15)
        ran = sorted(job_id for job_id, _, _ in runs.ran)
        assert ran == sorted(keyed[n] for n in range(6, 21))
        assert await jobs_left(db) == 0


async def _only(ids: Any, job_id: int) -> bool:
    return bool(await ids == {job_id})


async def test_lost_claim_reconcile_does_not_resurrect(worker_dsn: str) -> None:
    """Rows locked by a pool that never saw the claim (its reply was lost) are returned
    by the pool's reconcile: a removed one keeps attempts = max_attempts."""
    from kongtask._sql import claim_jobs, register_tasks

    q = WorkerQueries(S)
    async with open_database(worker_dsn) as db, kongtask.open_client(worker_dsn) as client:
        gone = await add_job_row(db, "rec", key="gone", max_attempts=2)
        kept = await add_job_row(db, "rec", max_attempts=2)
        rec_id = (await db.with_own_connection(register_tasks, q, ["rec"]))["rec"]
        # the pool runs another task only, so it never claims these itself
        claim_fails = FailingClaims()
        async with kongtask.open_worker(
            worker_dsn, {"other": Runs().rec}, forbidden_flags=claim_fails.flags
        ) as pool:
            rows = await db.with_own_connection(claim_jobs, q, pool.pool_id, [rec_id], 10)
            assert {int(r["id"]) for r in rows} == {gone, kept}
            await client.remove_job("gone")
            claim_fails.fail_next()  # the pool's next claim fails: it looks for lost jobs
            await wait_until(lambda: _only_empty(locked_by(db, pool.pool_id)))
            state = {
                int(r["id"]): (r["attempts"], r["locked_by"])
                for r in await db.fetch(f"select id, attempts, locked_by from {J}")
            }
        assert state == {gone: (2, None), kept: (0, None)}


async def _only_empty(ids: Any) -> bool:
    return not await ids


async def test_the_real_threshold_rechecks_jobs_held_longer(worker_dsn: str) -> None:
    """Without a patched threshold: jobs held longer than RECHECK_AFTER are rechecked
    before they start (the sleep only ages the held jobs; nothing waits on a result)."""
    runs = Runs()
    async with open_database(worker_dsn) as db, kongtask.open_client(worker_dsn) as client:
        old = await add_scenario(db, keys=8)
        async with kongtask.open_worker(
            worker_dsn, runs.tasks(), batch_size=CLAIM, local_queue_ttl=60, timing=PINNED
        ) as worker:
            with trio.fail_after(20):
                await runs.blocking.wait()
            assert set(old.values()) <= await locked_by(db, worker.pool_id)
            await trio.sleep(_held.RECHECK_AFTER)
            await client.remove_job("k1")
            new = await client.add_job("rec", {"v": "new2"}, job_key="k2", priority=1)
            runs.release.set()
            await wait_until(lambda: len(runs.ran) == 7)
            await wait_until(lambda: worker.statistics().queued_locally == 0)
        ran = sorted(job_id for job_id, _, _ in runs.ran)
        assert ran == sorted([new.id, *(old[f"k{n}"] for n in range(3, 9))])
