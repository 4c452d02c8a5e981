"""Held jobs in a mixed fleet: a kongtask pool holds keyed jobs unstarted, Node
graphile-worker 0.18's WorkerUtils removes and replaces some of them, and a Node worker
runs next to (or after) the kongtask pool. The removed and replaced jobs never run, in
either kind of pool; the replacements and the untouched jobs run exactly once."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from _worker_helpers import add_job_row
from oracle import node_command
from test_held_jobs import CLAIM, RECHECK_ALWAYS, Runs, locked_by, wait_until

import kongtask
from kongtask._pg import open_database

pytestmark = pytest.mark.oracle
# (WorkerUtils of 0.18 has addJob but no removeJob: Node code calls the SQL function)

S = "graphile_worker"
J = f"{S}._private_jobs"

NODE_SCRIPT = r"""
const path = require("path");
const gw = require(path.join(process.env.ORACLE_DIR, "node_modules", "graphile-worker"));
const [mode, dsn, ...rest] = process.argv.slice(2);

async function main() {
  if (mode === "admin") {
    // remove k1..k3, replace k4..k6 with a new payload
    const utils = await gw.makeWorkerUtils({ connectionString: dsn });
    try {
      for (const n of [1, 2, 3]) {
        const sql = "select graphile_worker.remove_job($1)";
        await utils.withPgClient((c) => c.query(sql, [`k${n}`]));
      }
      for (const n of [4, 5, 6]) {
        await utils.addJob("rec", { v: `new${n}` }, { jobKey: `k${n}`, priority: 1 });
      }
    } finally {
      await utils.release();
    }
    return;
  }
  // mode === "work": record each run in the table `ran`
  const rec = async (payload, helpers) => {
    await helpers.query("insert into ran(pool, job_id, v) values ('node', $1, $2)",
      [helpers.job.id, payload.v || null]);
  };
  const runner = await gw.run({
    connectionString: dsn, concurrency: 2, pollInterval: 50, noHandleSignals: false,
    taskList: { rec },
  });
  await runner.promise;
}
main().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture
def node(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return node_command(NODE_SCRIPT, tmp_path)


async def _record(conn: Any, job_id: int, value: str | None) -> None:
    await conn.execute("insert into ran(pool, job_id, v) values ('kong', $1, $2)", job_id, value)


@pytest.mark.parametrize("shutdown", [False, True], ids=["carry-on", "shutdown"])
async def test_node_removes_and_replaces_jobs_a_kongtask_pool_holds(
    worker_dsn: str,
    node: tuple[list[str], dict[str, str]],
    shutdown: bool,
) -> None:
    argv, env = node
    runs = Runs()

    async def rec(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await ctx.with_connection(_record, job.id, job.payload.get("v"))

    tasks = {"block": runs.block, "rec": rec}
    async with open_database(worker_dsn) as db:
        await db.execute("create table ran(pool text, job_id bigint, v text)")
        await add_job_row(db, "block", priority=0)
        old = {
            n: await add_job_row(db, "rec", f'{{"v": "old{n}"}}', key=f"k{n}", priority=1)
            for n in range(1, 11)
        }
        async with trio.open_nursery() as nursery:
            # held for as long as the test wants: the Node admin script may start later
            # than the default TTL, which would hand the jobs back (and let add_job
            # update an unlocked row in place) before it runs
            async with kongtask.open_worker(
                worker_dsn, tasks, batch_size=CLAIM, local_queue_ttl=60, timing=RECHECK_ALWAYS
            ) as pool:
                with trio.fail_after(20):
                    await runs.blocking.wait()
                assert set(old.values()) <= await locked_by(db, pool.pool_id)
                admin = await trio.run_process(
                    [*argv, "admin", worker_dsn], env=env, capture_stderr=True, check=False
                )
                assert admin.returncode == 0, admin.stderr.decode()
                # a Node worker joins the fleet
                run_node = functools.partial(
                    trio.run_process,
                    [*argv, "work", worker_dsn],
                    env=env,
                    check=False,
                    stdout=subprocess.DEVNULL,
                )
                node_proc = await nursery.start(run_node)
                runs.release.set()
                if shutdown:
                    await pool.shutdown()

            async def settled() -> bool:
                left = await db.fetchval(
                    f"select count(*) from {J} where attempts < max_attempts "
                    "or locked_by is not null"
                )
                return int(left) == 0

            await wait_until(settled, limit=60)
            node_proc.terminate()
        rows = await db.fetch("select pool, job_id, v from ran")
    ran = [r["job_id"] for r in rows]
    assert len(ran) == len(set(ran)), f"a job ran twice: {[dict(r) for r in rows]}"
    values = sorted(r["v"] for r in rows)
    assert values == sorted([f"new{n}" for n in (4, 5, 6)] + [f"old{n}" for n in range(7, 11)]), [
        dict(r) for r in rows
    ]
    for n in range(1, 7):
        assert old[n] not in ran
