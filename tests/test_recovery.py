"""Fast crash recovery: marked pool ids, liveness locks, releasing provably dead pools.

Test rules: a real PostgreSQL; no sleeps to wait for results (events, or polling under
an absolute ``trio.fail_after``). The end-to-end test kills a real ``kongtask run``
process with SIGKILL and times how long its jobs take to run elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import trio
from test_worker import wait_until

import kongtask
from kongtask._liveness import (
    LOCK_CLASS,
    DeadPoolSweeper,
    hold_liveness_lock,
    is_marked_pool_id,
    liveness_lock_key,
    new_pool_id,
)
from kongtask._liveness_sql import LOCK_HELD
from kongtask._pg import Database
from kongtask.testing import WorkerTiming

S = "graphile_worker"


@pytest.fixture
def ldb(db: Database) -> Database:
    """A database migrated by kongtask."""
    return db


def test_pool_id_format_and_marker() -> None:
    fmt = re.compile(r"^(ot)?pool-[0-9a-f]{18}$")
    ids = {new_pool_id() for _ in range(200)}
    assert len(ids) == 200
    for pool_id in ids:
        assert fmt.match(pool_id)
        assert pool_id.startswith("pool-6b6f6e67")
        assert is_marked_pool_id(pool_id)
    once = new_pool_id(once=True)
    assert once.startswith("otpool-6b6f6e67")
    assert is_marked_pool_id(once)
    for _ in range(200):
        plain = new_pool_id(marked=False)
        assert fmt.match(plain)
        assert not is_marked_pool_id(plain)
    # Node-style ids, and near misses, are not ours.
    for other in [
        "pool-16bf8f36ad00b4482e",
        "worker-6b6f6e670000000000",
        "pool-6b6f6e67000000000",  # 17 digits
        "pool-6b6f6e6700000000000",  # 19 digits
        "pool-6B6F6E670000000000",  # uppercase
        "xpool-6b6f6e670000000000",
    ]:
        assert not is_marked_pool_id(other), other
    with pytest.raises(ValueError, match="not a kongtask pool id"):
        liveness_lock_key("pool-16bf8f36ad00b4482e")


async def test_lock_key_matches_pg_locks(ldb: Database) -> None:
    pool_id = "pool-6b6f6e6700ffffffff"  # the second key is negative as an int4
    assert LOCK_CLASS == 1802464871 == 0x6B6F6E67  # as the docs say
    assert liveness_lock_key(pool_id) == (LOCK_CLASS, -1)
    conn = await ldb.connect()
    try:
        await ldb.run(hold_liveness_lock, conn, pool_id)
        rows = await ldb.fetch(
            "select classid::bigint, objid::bigint, objsubid from pg_locks "
            "where locktype = 'advisory' and pid = $1",
            conn.get_server_pid(),
        )
        assert [tuple(r) for r in rows] == [(LOCK_CLASS, 0xFFFFFFFF, 2)]
        assert await ldb.fetchval(LOCK_HELD, pool_id) is True
        assert await ldb.fetchval(LOCK_HELD, "pool-6b6f6e6700fffffffe") is False
        # The session holding the lock has short TCP keepalives: a vanished client's
        # session (and lock) goes in seconds, not the OS default of two hours.
        assert await ldb.run(conn.fetchval, "show tcp_keepalives_idle") in ("10", "10s")
    finally:
        await ldb.close_connection(conn)
    assert await ldb.fetchval(LOCK_HELD, pool_id) is False


async def _add_locked_jobs(db: Database, pool_id: str, n: int, queue: str | None) -> list[int]:
    """Add ``n`` jobs and mark them claimed by ``pool_id``, as a claim would."""
    ids: list[int] = []
    for i in range(n):
        job_id = await db.fetchval(
            f"select id from {S}.add_job('t', json_build_object('i', $1::int), $2::text)",
            i,
            queue if i == 0 else None,
        )
        ids.append(job_id)
    await db.execute(
        f"update {S}._private_jobs set locked_by = $1, locked_at = now() - interval '1 minute', "
        "attempts = attempts + 1, run_at = now() - interval '2 minutes' where id = any($2)",
        pool_id,
        ids,
    )
    if queue is not None:
        await db.execute(
            f"update {S}._private_job_queues set locked_by = $1, locked_at = now() "
            "where queue_name = $2",
            pool_id,
            queue,
        )
    return ids


async def _locks(db: Database, ids: list[int]) -> list[tuple[str | None, int]]:
    rows = await db.fetch(
        f"select locked_by, attempts from {S}._private_jobs where id = any($1) order by id", ids
    )
    return [(r["locked_by"], r["attempts"]) for r in rows]


async def test_only_provably_dead_pools_are_released(ldb: Database) -> None:
    alive, dead, node = new_pool_id(), new_pool_id(), "pool-16bf8f36ad00b4482e"
    alive_jobs = await _add_locked_jobs(ldb, alive, 2, "qa")
    dead_jobs = await _add_locked_jobs(ldb, dead, 3, "qd")
    node_jobs = await _add_locked_jobs(ldb, node, 2, "qn")
    holder = await ldb.connect()
    try:
        await ldb.run(hold_liveness_lock, holder, alive)
        sweeper = DeadPoolSweeper(S, restart_grace=0)
        async with _listen(ldb) as notes:
            first = await sweeper.check(ldb)
            assert first.pools == ()  # one observation is not enough
            second = await sweeper.check(ldb)
            assert second.pools == (dead,)
            assert (second.jobs, second.queues) == (3, 1)
            with trio.fail_after(5):
                payload = await notes.receive()
            assert re.fullmatch(r'\{"r":[0-9.e-]+,"count":3\}', payload)
        # Released: lock columns cleared, attempts kept (the lost attempt counts),
        # run_at moved up to now.
        assert await _locks(ldb, dead_jobs) == [(None, 1)] * 3
        assert await ldb.fetchval(
            f"select bool_and(run_at >= now() - interval '5 seconds' and locked_at is null) "
            f"from {S}._private_jobs where id = any($1)",
            dead_jobs,
        )
        # The live kongtask pool and the Node pool keep their rows (Node: the 4 h rule).
        assert await _locks(ldb, alive_jobs) == [(alive, 1)] * 2
        assert await _locks(ldb, node_jobs) == [(node, 1)] * 2
        queues = {
            r["queue_name"]: r["locked_by"]
            for r in await ldb.fetch(f"select queue_name, locked_by from {S}._private_job_queues")
        }
        assert queues == {"qa": alive, "qd": None, "qn": node}
        # Released jobs are claimable again: they are available.
        assert (
            await ldb.fetchval(
                f"select count(*) from {S}._private_jobs where is_available and id = any($1)",
                dead_jobs,
            )
            == 3
        )
        # Once the live pool's connection goes, it is dead too (two more checks).
    finally:
        await ldb.close_connection(holder)
    assert (await sweeper.check(ldb)).pools == ()
    assert (await sweeper.check(ldb)).pools == (alive,)
    assert await _locks(ldb, alive_jobs) == [(None, 1)] * 2
    assert await _locks(ldb, node_jobs) == [(node, 1)] * 2


async def test_a_pool_that_comes_back_between_checks_is_kept(ldb: Database) -> None:
    pool_id = new_pool_id()
    jobs = await _add_locked_jobs(ldb, pool_id, 2, None)
    sweeper = DeadPoolSweeper(S, restart_grace=0)
    assert (await sweeper.check(ldb)).pools == ()  # now a suspect
    conn = await ldb.connect()  # e.g. its listener reconnected
    try:
        await ldb.run(hold_liveness_lock, conn, pool_id)
        assert (await sweeper.check(ldb)).pools == ()
        assert (await sweeper.check(ldb)).pools == ()
        assert await _locks(ldb, jobs) == [(pool_id, 1)] * 2
    finally:
        await ldb.close_connection(conn)


async def test_nothing_is_released_right_after_a_server_restart(ldb: Database) -> None:
    pool_id = new_pool_id()
    jobs = await _add_locked_jobs(ldb, pool_id, 1, None)
    uptime = await ldb.fetchval("select now() - pg_postmaster_start_time()")
    assert isinstance(uptime, timedelta)
    sweeper = DeadPoolSweeper(S, restart_grace=uptime.total_seconds() + 3600)
    for _ in range(3):
        assert (await sweeper.check(ldb)).pools == ()
    assert await _locks(ldb, jobs) == [(pool_id, 1)]


async def test_nothing_is_released_while_every_live_pool_reconnected_recently(
    ldb: Database,
) -> None:
    """After a crash restart the postmaster's start time stays old, but every live
    pool's lock session is new: that also holds releases back."""
    dead = new_pool_id()
    jobs = await _add_locked_jobs(ldb, dead, 1, None)
    # the server must be clearly older than the lock session opened below (a test run
    # may begin with this test, right after its cluster started)
    seen: list[timedelta] = []

    async def server_two_seconds_old() -> bool:
        uptime = await ldb.fetchval("select now() - pg_postmaster_start_time()")
        assert isinstance(uptime, timedelta)
        seen[:] = [uptime]
        return uptime.total_seconds() >= 2

    await wait_until(server_two_seconds_old)
    grace = seen[0].total_seconds() * 0.9  # the server is older than that...
    fresh = await ldb.connect()  # ...but the only live pool's lock session is not
    try:
        await ldb.run(hold_liveness_lock, fresh, new_pool_id())
        sweeper = DeadPoolSweeper(S, restart_grace=grace)
        for _ in range(3):
            assert (await sweeper.check(ldb)).pools == ()
        assert await _locks(ldb, jobs) == [(dead, 1)]
    finally:
        await ldb.close_connection(fresh)
    # With no live pool left, the grace no longer applies: the suspect kept during the
    # grace is released.
    assert (await sweeper.check(ldb)).pools == (dead,)


async def test_a_reconnecting_pool_waits_for_its_old_session(ldb: Database) -> None:
    """The lock passes from the old session to the new one with no gap in between."""
    pool_id = new_pool_id()
    old = await ldb.connect()
    new = await ldb.connect()
    try:
        await ldb.run(hold_liveness_lock, old, pool_id)
        got_it = trio.Event()

        async def reconnecting() -> None:
            await ldb.run(hold_liveness_lock, new, pool_id, wait=10)
            got_it.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reconnecting)
            # The waiting request is visible in pg_locks: it counts as alive.
            await _poll(
                ldb,
                "select exists (select 1 from pg_locks where locktype = 'advisory' "
                "and not granted and pid = $1)",
                new.get_server_pid(),
            )
            assert not got_it.is_set()
            await ldb.close_connection(old)
            with trio.fail_after(5):
                await got_it.wait()
        assert await ldb.fetchval(LOCK_HELD, pool_id) is True
    finally:
        await ldb.close_connection(old)
        await ldb.close_connection(new)


async def test_lock_wait_gives_up(ldb: Database) -> None:
    pool_id = new_pool_id()
    a, b = await ldb.connect(), await ldb.connect()
    try:
        await ldb.run(hold_liveness_lock, a, pool_id)
        with pytest.raises(TimeoutError):
            await ldb.run(hold_liveness_lock, b, pool_id, wait=0.2)
        # No lock request stays queued on b (the server-side cancel lands a little
        # later than the client's timeout:
        # docs/design/stack.md#server-side-cancel-is-asynchronous), and b still works.
        await _poll(
            ldb,
            "select not exists (select 1 from pg_locks where pid = $1 and locktype = 'advisory')",
            b.get_server_pid(),
        )
        assert await ldb.run(b.fetchval, "select 1") == 1
    finally:
        await ldb.close_connection(a)
        await ldb.close_connection(b)


async def _poll(db: Database, query: str, *args: object) -> None:
    """Poll ``query`` until it returns true, failing after 5 s."""
    with trio.fail_after(5):
        while True:
            if await db.fetchval(query, *args):
                return
            await trio.sleep(0.01)


class _Notes:
    def __init__(self, recv: trio.MemoryReceiveChannel[str]) -> None:
        self._recv = recv

    async def receive(self) -> str:
        return await self._recv.receive()


@asynccontextmanager
async def _listen(db: Database) -> AsyncIterator[_Notes]:
    send, recv = trio.open_memory_channel[str](100)
    conn = await db.connect()

    def on_notify(_c: object, _pid: int, _chan: str, payload: object) -> None:
        send.send_nowait(str(payload))

    try:
        await db.run(conn.add_listener, "jobs:insert", on_notify)
        yield _Notes(recv)
    finally:
        await db.close_connection(conn)


# --- end to end: kill -9 a worker process, its jobs run elsewhere within seconds ----------

# The tasks module of the `kongtask run` process under test: a handler that says it
# started and then blocks until the process is killed.
_BLOCKER = """
import trio

async def block(job, ctx):
    print(f"started {job.id} {ctx.pool_id}", flush=True)
    await trio.sleep_forever()

TASKS = {"block": block}
"""
_CLI = "import sys, trio, kongtask; sys.exit(trio.run(kongtask.main))"


async def test_killed_worker_jobs_run_elsewhere_within_seconds(
    kongtask_dsn: str, ldb: Database, tmp_path: Path
) -> None:
    """kill -9 a real ``kongtask run`` holding jobs: the live pool's dead-pool sweep
    releases them (a ``pool:sweep`` event naming the dead pool) and they run there.
    The limit below is a safety net; the recovery time is printed, and measured in
    ``stress/chaos.py``."""
    import os
    import signal
    import subprocess
    import sys

    from kongtask import Client
    from kongtask._worker import open_worker

    # The test server may have started moments ago; the restart grace protects
    # reconnecting pools after a server restart and is not what this test is about.
    no_restart_grace = WorkerTiming(dead_pool_restart_grace=0.0)
    client = Client(ldb, S)
    jobs = [
        (await client.add_job("block", {"i": i}, queue_name="serial" if i == 0 else None)).id
        for i in range(3)
    ]
    # A Node pool's job (no marker, fresh lock): it must keep the 4-hour rule.
    node_pool = "pool-16bf8f36ad00b4482e"
    node_job = (await client.add_job("block", {"node": True})).id
    await ldb.execute(
        f"update {S}._private_jobs set locked_by = $1, locked_at = now(), attempts = 1 "
        "where id = $2",
        node_pool,
        node_job,
    )

    (tmp_path / "blocker.py").write_text(_BLOCKER)
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            _CLI,
            "--log-level",
            "WARNING",
            "run",
            "-c",
            kongtask_dsn,
            "--tasks",
            "blocker:TASKS",
            "-j",
            "4",
            "--poll-interval",
            "100",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.stdout is not None
    try:
        buffer = b""
        with trio.fail_after(20):
            while buffer.count(b"started") < 3:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "kongtask run exited early"
                buffer += chunk
        pool_id = buffer.split()[2].decode()
        assert is_marked_pool_id(pool_id)
        assert await _locks(ldb, jobs) == [(pool_id, 1)] * 3

        ran: dict[int, float] = {}
        all_ran = trio.Event()

        async def block(job: object, ctx: object) -> None:
            ran[job.id] = trio.current_time()  # type: ignore[attr-defined]
            if set(jobs) <= set(ran):
                all_ran.set()

        sweeps: list[object] = []
        swept = trio.Event()

        def on_event(event: object) -> None:
            if event.name == "pool:sweep":  # type: ignore[attr-defined]
                sweeps.append(event)
                swept.set()

        async with open_worker(
            kongtask_dsn,
            {"block": block},
            poll_interval=0.2,
            on_event=on_event,
            timing=no_restart_grace,
        ):
            proc.send_signal(signal.SIGKILL)
            killed_at = trio.current_time()
            with trio.fail_after(30):
                await all_ran.wait()
                # The sweeper reports a release once its statement's reply is back on the
                # trio side; the poll may find the released jobs and run them first.
                await swept.wait()
        recovery = max(ran[j] for j in jobs) - killed_at
        print(f"\nkill -9 -> all 3 jobs running elsewhere: {recovery:.2f} s")
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert node_job not in ran
    # released by the dead-pool sweep (not by the 4-hour rule): the event names the pool
    assert [e["pools"] for e in sweeps] == [(pool_id,)]  # type: ignore[index]
    assert sweeps[0]["jobs"] == 3  # type: ignore[index]
    rows = await ldb.fetch(f"select id, locked_by, attempts from {S}._private_jobs order by id")
    # The three ran a second time (attempts 2: the killed attempt counts) and completed;
    # the Node pool's job is still locked by it.
    assert [tuple(r) for r in rows] == [(node_job, node_pool, 1)]


async def test_pool_retakes_its_lock_after_losing_its_listener(
    kongtask_dsn: str, ldb: Database
) -> None:
    """Kill the backend of the pool's LISTEN connection: the lock comes back, jobs run."""
    from kongtask import Client
    from kongtask._worker import open_worker

    ran = trio.Event()

    async def job(job: object, ctx: object) -> None:
        ran.set()

    holder = (
        "select pid from pg_locks where locktype = 'advisory' and objsubid = 2 "
        f"and classid = {LOCK_CLASS}::oid and granted"
    )
    async with open_worker(kongtask_dsn, {"job": job}, poll_interval=0.2) as worker:
        assert await ldb.fetchval(LOCK_HELD, worker.pool_id) is True
        old_pid = await ldb.fetchval(holder)
        assert await ldb.fetchval("select pg_terminate_backend($1)", old_pid)
        with trio.fail_after(10):
            while True:
                pid = await ldb.fetchval(holder)
                if pid is not None and pid != old_pid:
                    break
                await trio.sleep(0.05)
        await Client(ldb, S).add_job("job", {})
        with trio.fail_after(10):
            await ran.wait()


class FailingClaims:
    """``forbidden_flags`` for a pool whose next claim fails, on demand: what a claim whose
    reply was lost looks like to the pool (it cannot tell whether it committed)."""

    def __init__(self) -> None:
        self._fail = False

    def fail_next(self) -> None:
        self._fail = True

    def flags(self) -> list[str]:
        if self._fail:
            self._fail = False
            raise ConnectionError("the claim's reply was lost (simulated)")
        return []


async def test_jobs_of_a_lost_claim_reply_are_returned(kongtask_dsn: str, ldb: Database) -> None:
    """A claim that committed although its reply was lost leaves jobs locked by a live
    pool that does not know them: the pool finds them and gives them back."""
    from datetime import datetime, timedelta

    from kongtask import Client
    from kongtask._worker import open_worker

    async def job(job: object, ctx: object) -> None:
        raise AssertionError("not due yet: never runs")

    later = datetime.now(UTC) + timedelta(hours=1)
    claim_fails = FailingClaims()
    async with open_worker(
        kongtask_dsn, {"job": job}, poll_interval=0.2, forbidden_flags=claim_fails.flags
    ) as worker:
        job_id = (await Client(ldb, S).add_job("job", {}, run_at=later)).id
        # Simulate the lost reply: lock the job for this pool behind its back, as a claim
        # that committed would have.
        await ldb.execute(
            f"update {S}._private_jobs set locked_by = $1, locked_at = now(), "
            "attempts = attempts + 1 where id = $2",
            worker.pool_id,
            job_id,
        )
        claim_fails.fail_next()  # a failed claim: the pool looks for jobs it lost
        await _poll(
            ldb,
            f"select locked_by is null and attempts = 0 from {S}._private_jobs where id = $1",
            job_id,
        )


async def test_pgbouncer_mode_pools_are_unmarked_and_keep_the_4_hour_rule(
    kongtask_dsn: str, ldb: Database
) -> None:
    """Without prepared statements (pgBouncer) a pool takes no lock and is never 'dead'."""
    from kongtask._worker import open_worker

    async def job(job: object, ctx: object) -> None:
        raise AssertionError("not reached")

    async with open_worker(
        kongtask_dsn, {"job": job}, prepared_statements=False, poll_interval=0.2
    ) as worker:
        assert not is_marked_pool_id(worker.pool_id)
        assert (
            await ldb.fetchval(
                "select count(*) from pg_locks where locktype = 'advisory' "
                f"and classid = {LOCK_CLASS}::oid"
            )
            == 0
        )
        # Rows it holds are not released by any sweeper, though it holds no lock.
        jobs = await _add_locked_jobs(ldb, worker.pool_id, 1, "pgb")
        sweeper = DeadPoolSweeper(S, restart_grace=0)
        for _ in range(3):
            assert (await sweeper.check(ldb)).pools == ()
        assert await _locks(ldb, jobs) == [(worker.pool_id, 1)]
        await ldb.execute(f"update {S}._private_jobs set locked_by = null, locked_at = null")
        await ldb.execute(f"update {S}._private_job_queues set locked_by = null, locked_at = null")


async def test_jobs_of_a_lost_claim_that_commits_late_are_returned(
    kongtask_dsn: str, ldb: Database
) -> None:
    """The statement of a claim given up on may commit on the server after the pool's
    first look for its jobs: the pool looks again later and gives them back then."""
    from datetime import datetime, timedelta

    from kongtask import Client, open_worker

    async def job(job: object, ctx: object) -> None:
        raise AssertionError("not due yet: never runs")

    later = datetime.now(UTC) + timedelta(hours=1)
    claim_fails = FailingClaims()
    async with open_worker(
        kongtask_dsn,
        {"job": job},
        poll_interval=0.2,
        forbidden_flags=claim_fails.flags,
        timing=WorkerTiming(reconcile_again_after=(2.0,)),
    ) as worker:
        job_id = (await Client(ldb, S).add_job("job", {}, run_at=later)).id
        assert worker.statistics().lost_claim_checks == 0
        claim_fails.fail_next()  # a failed claim: a look now, and one 2 s later
        with trio.fail_after(10):  # until the first look is done
            while True:
                if worker.statistics().lost_claim_checks == 1:
                    break
                await trio.sleep(0.01)
        # now the lost claim commits
        await ldb.execute(
            f"update {S}._private_jobs set locked_by = $1, locked_at = now(), "
            "attempts = attempts + 1 where id = $2",
            worker.pool_id,
            job_id,
        )
        await _poll(
            ldb,
            f"select locked_by is null and attempts = 0 from {S}._private_jobs where id = $1",
            job_id,
        )
        assert worker.statistics().lost_claim_checks == 0


async def test_outcomes_that_keep_failing_stop_the_pool_and_lose_nothing(
    kongtask_dsn: str, ldb: Database
) -> None:
    """A completion that fails with a non-transient error GIVE_UP_AFTER times in a row
    stops the pool with exit code 1; the job stays in the table and is handed back."""
    from kongtask import Client, open_worker

    timing = WorkerTiming(retry_cap=0.01, flush_timeout=0.5)
    await ldb.execute(
        f"""create function {S}.no_deletes() returns trigger language plpgsql as $$
        begin raise exception 'deleting jobs is disabled today'; end $$;
        create trigger no_deletes before delete on {S}._private_jobs
        for each row execute function {S}.no_deletes()"""
    )
    ran: list[int] = []

    async def job(job: kongtask.Job, ctx: object) -> None:
        ran.append(job.id)

    errors: list[object] = []

    def on_event(event: kongtask.Event) -> None:
        if event.name == "worker:completeJob:error":
            errors.append(event.get("error"))

    job_id = (await Client(ldb, S).add_job("job", {})).id
    async with open_worker(
        kongtask_dsn, {"job": job}, poll_interval=0.2, on_event=on_event, timing=timing
    ) as worker:
        with trio.fail_after(20):
            await worker.wait_stopped()
    assert ran == [job_id]
    assert worker.exit_code == 1
    assert len(errors) >= timing.give_up_after
    assert "deleting jobs is disabled today" in str(errors[-1])
    # nothing lost: the job is still there, locked by the stopped pool (its handler ran,
    # so it is not handed back to run again while the database refuses the outcome)
    query = f"select locked_by, attempts from {S}._private_jobs where id = $1"
    row = await ldb.fetchrow(query, job_id)
    assert row is not None
    assert (row["locked_by"], row["attempts"]) == (worker.pool_id, 1)
    # once the database is fixed, `kongtask unlock` hands it to the next pool
    await ldb.execute(f"drop trigger no_deletes on {S}._private_jobs")
    await Client(ldb, S).force_unlock_workers([worker.pool_id])
    async with open_worker(kongtask_dsn, {"job": job}, poll_interval=0.2):
        await _poll(ldb, f"select not exists (select 1 from {S}._private_jobs)")
    assert ran == [job_id, job_id]
