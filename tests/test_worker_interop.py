"""kongtask workers next to Node graphile-worker 0.18.0 on one database.

Rules: as in test_worker.py. Handlers of every pool (ours and Node's) write their start
and end times with the database clock into one table, so intervals are comparable.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_worker import assert_clean, wait_until

import kongtask
from kongtask._pg import Database, open_database
from kongtask.testing import WorkerTiming

pytestmark = pytest.mark.oracle

S = "graphile_worker"
J = f"{S}._private_jobs"

SERIAL_JOBS = (
    f"select {S}.add_jobs(array_agg(('rec', json_build_object('i', i, 'q', 'serial'), "
    f"'serial', null, null, null, null, null)::{S}.job_spec)) from generate_series(1, $1) i"
)

NODE_SCRIPT = r"""
const path = require("path");
const gw = require(path.join(process.env.ORACLE_DIR, "node_modules", "graphile-worker"));
const [mode, dsn, ...rest] = process.argv.slice(2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  if (mode === "add") {
    const [task, count, queue] = rest;
    const utils = await gw.makeWorkerUtils({ connectionString: dsn });
    try {
      for (let i = 0; i < Number(count); i++) {
        await utils.addJob(task, { i, q: queue || null }, queue ? { queueName: queue } : {});
      }
    } finally {
      await utils.release();
    }
    return;
  }
  // mode === "work": record start/end of each job with the database clock
  const rec = async (payload, helpers) => {
    const q = payload.q || null;
    await helpers.query(
      "insert into rec(pool, job_id, queue, ev) values ('node', $1, $2, 'start')",
      [helpers.job.id, q]);
    await sleep(20);
    await helpers.query(
      "insert into rec(pool, job_id, queue, ev) values ('node', $1, $2, 'end')",
      [helpers.job.id, q]);
  };
  const runner = await gw.run({
    connectionString: dsn,
    concurrency: 4,
    pollInterval: 50,
    noHandleSignals: false,
    taskList: { rec },
    preset: { worker: { localQueue: { size: 50 } } },
  });
  console.log("READY");
  await runner.promise;
}
main().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture
def node_script(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    from oracle import node_for, require_oracle

    folder = require_oracle("0.18.0")
    script = tmp_path / "gw.js"
    script.write_text(NODE_SCRIPT)
    return [node_for("0.18.0"), str(script)], {**os.environ, "ORACLE_DIR": str(folder)}


@pytest.fixture
async def tdb(worker_dsn: str) -> AsyncIterator[Database]:
    settings = {"application_name": "kongtask-test"}
    async with open_database(worker_dsn, server_settings=settings) as d:
        await d.execute(
            "create table rec(pool text, job_id bigint, queue text, ev text, "
            "t timestamptz not null default clock_timestamp())"
        )
        yield d


async def node_add(cmd: tuple[list[str], dict[str, str]], dsn: str, *args: str) -> None:
    argv, env = cmd
    proc = await trio.run_process(
        [*argv, "add", dsn, *args], env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()


async def _record(conn: Any, pool: str, job_id: int, queue: str | None, ev: str) -> None:
    await conn.execute(
        "insert into rec(pool, job_id, queue, ev) values ($1, $2, $3, $4)", pool, job_id, queue, ev
    )


def recorder(pool: str) -> Any:
    async def rec(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        q = job.payload.get("q") if isinstance(job.payload, dict) else None
        ctx.logger.info("start")
        await ctx.with_connection(_record, pool, job.id, q, "start")
        await trio.sleep(0.02)
        await ctx.with_connection(_record, pool, job.id, q, "end")
        ctx.logger.info("end")

    return rec


async def test_jobs_added_by_node_run_exactly_once(
    tdb: Database, worker_dsn: str, node_script: tuple[list[str], dict[str, str]]
) -> None:
    await node_add(node_script, worker_dsn, "rec", "10", "nq")
    await node_add(node_script, worker_dsn, "rec", "10")
    ids = sorted(r["id"] for r in await tdb.fetch(f"select id from {J}"))
    assert len(ids) == 20
    async with kongtask.open_worker(worker_dsn, {"rec": recorder("kong")}, concurrency=4) as w:
        await wait_until(lambda: w.statistics().completed == 20)
    rows = await tdb.fetch("select job_id from rec where ev = 'start' order by job_id")
    assert [r["job_id"] for r in rows] == ids  # each exactly once
    await assert_clean(tdb)


async def test_named_queue_is_serial_across_kongtask_and_node_pools(
    tdb: Database, worker_dsn: str, node_script: tuple[list[str], dict[str, str]]
) -> None:
    # a named queue with jobs from Node and from SQL, plus fillers that fill local queues
    await node_add(node_script, worker_dsn, "rec", "30", "serial")
    await tdb.execute(SERIAL_JOBS, 50)
    total = 80
    await tdb.execute(
        f"select {S}.add_jobs(array_agg(('rec', json_build_object('i', i), null, null, null, "
        f"null, null, null)::{S}.job_spec)) from generate_series(1, 200) i"
    )
    argv, env = node_script

    async def serial_left() -> int:
        return int(
            await tdb.fetchval(
                f"select count(*) from {S}.jobs "
                "where queue_name = 'serial' and attempts < max_attempts"
            )
        )

    async def ran(pool: str) -> bool:
        return bool(
            await tdb.fetchval(
                "select count(*) from rec where pool = $1 and queue = 'serial' and ev = 'end'", pool
            )
        )

    async with trio.open_nursery() as nursery:
        run_node = functools.partial(
            trio.run_process,
            [*argv, "work", worker_dsn],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
        )
        node = await nursery.start(run_node)
        await wait_until(lambda: ran("node"), limit=30)
        tasks = {"rec": recorder("kongA")}
        # a large local queue in our pools while the serial queue drains (the prefetch of
        # a 5,000 jobs/s rate)
        ahead = WorkerTiming(min_prefetch=500)
        async with (
            kongtask.open_worker(
                worker_dsn, tasks, concurrency=4, poll_interval=0.05, timing=ahead
            ),
            kongtask.open_worker(
                worker_dsn,
                {"rec": recorder("kongB")},
                concurrency=4,
                poll_interval=0.05,
                timing=ahead,
            ),
        ):
            # The pool that finishes a queue's job learns of the unlock first, so one
            # pool may keep a serial queue to itself for a while (fair enough, but this
            # test wants every pool in it): top the queue up until both of ours ran some.
            with trio.fail_after(60):
                while not (await ran("kongA") and await ran("kongB")):
                    if await serial_left() == 0:
                        await tdb.execute(SERIAL_JOBS, 20)
                        total += 20
                    await trio.sleep(0.02)
            await wait_until(lambda: _zero(serial_left), limit=60)
        node.terminate()
    rows = await tdb.fetch(
        "select pool, job_id, min(t) filter (where ev = 'start') as s, "
        "max(t) filter (where ev = 'end') as e from rec where queue = 'serial' "
        "group by pool, job_id order by s"
    )
    assert len(rows) == total  # each serial job ran exactly once
    for prev, cur in itertools.pairwise(rows):
        assert prev["e"] is not None
        assert cur["s"] >= prev["e"], f"overlap: {dict(prev)} and {dict(cur)}"
    pools = {r["pool"] for r in rows}
    assert pools == {"node", "kongA", "kongB"}  # every pool ran jobs of the queue
    locks = await tdb.fetchval(
        f"select count(*) from {S}._private_job_queues where locked_by is not null"
    )
    assert locks == 0


async def _zero(fn: Any) -> bool:
    return bool(await fn() == 0)
