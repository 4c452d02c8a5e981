"""The inspection API against rows made by kongtask workers and by Node graphile-worker 0.18.

Rules: as in test_worker.py. Every state is produced by a real worker (ours or Node's)
where a worker produces it; only the attempt count of the "retrying" jobs is raised by an
admin call first, so their backoff (e**attempts seconds) outlasts the test on any machine.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from oracle import node_command
from test_worker import wait_until

import kongtask
from kongtask import ConfigError
from kongtask._liveness_sql import MARKER

S = "graphile_worker"
J = f"{S}._private_jobs"
FAR = datetime.now(UTC) + timedelta(days=1)


async def _state_of(client: kongtask.Client) -> dict[int, str]:
    return {info.job.id: info.state for info in await client.list_jobs(limit=1000)}


def _by_pair(counts: list[kongtask.QueueCounts]) -> dict[tuple[str, str | None], dict[str, int]]:
    return {
        (c.task, c.queue): {
            s: c.count(s)
            for s in (
                "ready",
                "waiting_on_queue",
                "scheduled",
                "retrying",
                "running",
                "permanently_failed",
            )
            if c.count(s)
        }
        for c in counts
    }


async def test_states_of_rows_made_by_a_kongtask_pool(worker_dsn: str) -> None:
    release = trio.Event()
    started = trio.Event()

    async def hang(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started.set()
        await release.wait()

    async def fail(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        raise RuntimeError("boom")

    async with kongtask.open_client(worker_dsn) as client:
        running = await client.add_job("hang", queue_name="q1")
        waiting = await client.add_job("hang", queue_name="q1")
        scheduled = await client.add_job("hang", run_at=FAR)
        dead = await client.add_job("fail", max_attempts=1)
        retry = await client.add_job("fail", max_attempts=25)
        # e**10 seconds of backoff after the next failure: "retrying" for hours.
        await client.reschedule_jobs([retry.id], attempts=9)
        ready = await client.add_job("nobody_runs_this")
        async with kongtask.open_worker(
            worker_dsn, {"hang": hang, "fail": fail}, concurrency=4, poll_interval=0.1
        ) as worker:
            await started.wait()

            async def failures_written() -> bool:
                rows = await client.list_jobs(tasks="fail")
                return all(i.job.last_error for i in rows) and len(rows) == 2

            await wait_until(failures_written, limit=30)
            states = await _state_of(client)
            assert states == {
                running.id: "running",
                waiting.id: "waiting_on_queue",
                scheduled.id: "scheduled",
                dead.id: "permanently_failed",
                retry.id: "retrying",
                ready.id: "ready",
            }
            for job_id, state in states.items():  # the state filter finds exactly these
                found = await client.list_jobs(states=state, descending=True)
                assert [i.job.id for i in found] == [job_id], state
            (info,) = await client.list_jobs(states="running")
            assert info.job.locked_by == worker.pool_id
            assert info.lock_age is not None
            assert info.lock_age >= 0
            assert _by_pair(await client.queue_counts()) == {
                ("fail", None): {"retrying": 1, "permanently_failed": 1},
                ("hang", None): {"scheduled": 1},
                ("hang", "q1"): {"running": 1, "waiting_on_queue": 1},
                ("nobody_runs_this", None): {"ready": 1},
            }
            age = await client.oldest_ready_age()
            assert age is not None
            assert age >= 0
            pools = await client.list_pools()
            (mine,) = [p for p in pools if p.pool_id == worker.pool_id]
            assert (mine.kind, mine.alive, mine.jobs, mine.queues) == ("kongtask", True, 1, 1)
            assert mine.id_suffix == worker.pool_id[-8:]
            assert mine.connected_at is not None
            release.set()
            await wait_until(lambda: worker.statistics().completed == 2, limit=30)
        # The pool is gone: it holds no lock and no row any more.
        assert not [p for p in await client.list_pools() if p.id_suffix == worker.pool_id[-8:]]


async def test_idle_pool_listed_by_its_lock_and_dead_marked_pool(worker_dsn: str) -> None:
    async with (
        kongtask.open_client(worker_dsn) as client,
        kongtask.open_worker(worker_dsn, {}, poll_interval=0.1) as worker,
    ):
        job = await client.add_job("t", queue_name="qd")
        dead_id = f"pool-{MARKER}00000000ab"
        await client._db.execute(
            f"update {J} set locked_at = now() - interval '1 hour', locked_by = $1",
            dead_id,
        )
        await client._db.execute(
            f"update {S}._private_job_queues set locked_at = now(), locked_by = $1", dead_id
        )

        async def listed() -> list[kongtask.PoolInfo]:
            return [p for p in await client.list_pools() if p.id_suffix == worker.pool_id[-8:]]

        # The pool takes its lock as it starts; wait for it without assuming an order.
        await wait_until(listed, limit=30)
        (idle,) = await listed()
        assert (idle.pool_id, idle.alive, idle.jobs, idle.queues) == (None, True, 0, 0)
        (dead,) = [p for p in await client.list_pools() if p.pool_id == dead_id]
        assert (dead.kind, dead.alive, dead.jobs, dead.queues) == ("kongtask", False, 1, 1)
        assert dead.oldest_lock_age is not None
        assert dead.oldest_lock_age >= 3599
        assert await _state_of(client) == {job.id: "running"}


async def test_listing_filters_and_keyset_pages(worker_dsn: str) -> None:
    async with kongtask.open_client(worker_dsn) as client:
        jobs = await client.add_jobs(
            [
                kongtask.JobSpec("a" if i % 2 else "b", {"i": i}, queue_name=f"q{i % 3}")
                for i in range(25)
            ]
        )
        keyed = await client.add_job("a", job_key="the-key")
        ids = [j.id for j in jobs]
        seen: list[int] = []
        after = None
        while True:
            page = await client.list_jobs(tasks=["a", "b"], after_id=after, limit=7)
            if not page:
                break
            seen += [i.job.id for i in page]
            after = page[-1].job.id
        assert seen == [*ids, keyed.id]
        down = await client.list_jobs(descending=True, after_id=ids[5], limit=3)
        assert [i.job.id for i in down] == ids[4:1:-1]
        a_q1 = await client.list_jobs(tasks="a", queues="q1")
        assert [i.job.id for i in a_q1] == [
            j.id for j in jobs if j.task_identifier == "a" and j.queue_name == "q1"
        ]
        assert [i.job.id for i in await client.list_jobs(key="the-key")] == [keyed.id]
        window = await client.list_jobs(min_id=ids[3], max_id=ids[6])
        assert [i.job.id for i in window] == ids[3:7]
        assert await client.list_jobs(states=["running", "scheduled"]) == []
        # distinct queues: every job's queue is unlocked, so every one is ready
        assert len(await client.list_jobs(states="ready", limit=100)) == 26
        with pytest.raises(ConfigError, match="unknown job state"):
            await client.list_jobs(states="done")
        with pytest.raises(ConfigError, match="limit"):
            await client.list_jobs(limit=0)
        with pytest.raises(ConfigError, match="after_id"):
            await client.list_jobs(after_id="7")  # type: ignore[arg-type]


async def test_empty_database(worker_dsn: str) -> None:
    async with kongtask.open_client(worker_dsn) as client:
        assert await client.queue_counts() == []
        assert await client.oldest_ready_age() is None
        assert await client.list_jobs() == []
        assert await client.list_pools() == []


# --- Node graphile-worker 0.18 --------------------------------------------------------

NODE_SCRIPT = r"""
const path = require("path");
const gw = require(path.join(process.env.ORACLE_DIR, "node_modules", "graphile-worker"));
const [mode, dsn] = process.argv.slice(2);

async function main() {
  if (mode === "add") {
    const utils = await gw.makeWorkerUtils({ connectionString: dsn });
    try {
      const far = new Date(Date.now() + 86400000);
      const ids = {};
      ids.running = (await utils.addJob("hang", {}, { queueName: "nq" })).id;
      ids.waiting = (await utils.addJob("hang", {}, { queueName: "nq" })).id;
      ids.scheduled = (await utils.addJob("hang", {}, { runAt: far })).id;
      ids.dead = (await utils.addJob("fail", {}, { maxAttempts: 1 })).id;
      ids.retry = (await utils.addJob("fail", {}, { maxAttempts: 25 })).id;
      ids.ready = (await utils.addJob("nobody_runs_this", {})).id;
      await utils.rescheduleJobs([ids.retry], { attempts: 9 });
      console.log(JSON.stringify(ids));
    } finally {
      await utils.release();
    }
    return;
  }
  const runner = await gw.run({
    connectionString: dsn,
    concurrency: 4,
    pollInterval: 100,
    taskList: {
      hang: () => new Promise(() => {}),
      fail: async () => { throw new Error("boom"); },
    },
  });
  await runner.promise;
}
main().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture
def node_script(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return node_command(NODE_SCRIPT, tmp_path)


@pytest.fixture
async def gw_client(gw_dsn: str) -> AsyncIterator[kongtask.Client]:
    async with kongtask.open_client(gw_dsn) as client:
        yield client


@pytest.mark.oracle
async def test_states_of_rows_made_by_a_node_pool_that_died(
    gw_dsn: str, gw_client: kongtask.Client, node_script: tuple[list[str], dict[str, str]]
) -> None:
    argv, env = node_script
    added = await trio.run_process(
        [*argv, "add", gw_dsn], env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    assert added.returncode == 0, added.stderr.decode()
    ids = {name: int(i) for name, i in json.loads(added.stdout).items()}
    client = gw_client
    async with trio.open_nursery() as nursery:
        node = await nursery.start(
            functools.partial(
                trio.run_process,
                [*argv, "work", gw_dsn],
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
            )
        )

        async def node_did_its_part() -> bool:
            states = await _state_of(client)
            return (
                states[ids["running"]] == "running"
                and states[ids["dead"]] == "permanently_failed"
                and states[ids["retry"]] == "retrying"
            )

        await wait_until(node_did_its_part, limit=60)
        # A Node pool that dies (SIGKILL: no cleanup) keeps its job and queue locked.
        node.send_signal(signal.SIGKILL)
    assert await _state_of(client) == {
        ids["running"]: "running",
        ids["waiting"]: "waiting_on_queue",
        ids["scheduled"]: "scheduled",
        ids["dead"]: "permanently_failed",
        ids["retry"]: "retrying",
        ids["ready"]: "ready",
    }
    (running,) = await client.list_jobs(states="running")
    pools = await client.list_pools()
    assert [(p.kind, p.pool_id, p.alive, p.jobs, p.queues) for p in pools] == [
        ("unmarked", running.job.locked_by, None, 1, 1)
    ]
    assert running.job.locked_by is not None
    assert running.job.locked_by.startswith("pool-")
    assert _by_pair(await client.queue_counts()) == {
        ("fail", None): {"retrying": 1, "permanently_failed": 1},
        ("hang", None): {"scheduled": 1},
        ("hang", "nq"): {"running": 1, "waiting_on_queue": 1},
        ("nobody_runs_this", None): {"ready": 1},
    }


async def test_needs_the_schema(kongtask_database_factory: object) -> None:
    dsn: str = await trio.to_thread.run_sync(
        lambda: kongtask_database_factory(migrated=False)  # type: ignore[operator]
    )
    async with kongtask.open_client(dsn) as client:
        with pytest.raises(kongtask.KongtaskError, match="migrate"):
            await client.queue_counts()


async def test_oldest_ready_age_over_priorities_skips_locked_queues(worker_dsn: str) -> None:
    now = datetime.now(UTC)
    async with kongtask.open_client(worker_dsn) as client:
        await client.add_job("t", run_at=now - timedelta(minutes=10), priority=-3)
        await client.add_job("t", run_at=now - timedelta(hours=1), priority=5)
        await client.add_job("t", run_at=now - timedelta(hours=9), priority=7, max_attempts=1)
        await client.add_job("t", run_at=now + timedelta(hours=9), priority=8)
        locked = await client.add_job("t", run_at=now - timedelta(hours=2), queue_name="busy")
        # the oldest of all is permanently failed, so not ready
        await client._db.execute(f"update {J} set attempts = 1 where max_attempts = 1")
        assert await client.oldest_ready_age() == pytest.approx(7200, abs=120)
        await client._db.execute(
            f"update {S}._private_job_queues set locked_at = now(), locked_by = 'pool-x'"
        )
        assert await client.oldest_ready_age() == pytest.approx(3600, abs=120)
        (counts,) = [c for c in await client.queue_counts() if c.queue is None]
        assert counts.oldest_ready_age == pytest.approx(3600, abs=120)
        assert (await client.list_jobs(states="waiting_on_queue"))[0].job.id == locked.id
