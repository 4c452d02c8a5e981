"""Bugs the lifecycle machine found, pinned as small deterministic tests.

Each test states the specification it checks. A bug not fixed yet is marked
``xfail(strict=True)``: the suite stays green, and the marker must go when the fix lands.

- ``test_claim_is_not_starved_by_a_row_locked_queue``: found by the machine (invariant
  ``claim_progress_row_locked_queues``) in kongtask's first claim; fixed in 716c697.
"""

from __future__ import annotations

from kongtask._pg import Database
from kongtask._sql import WorkerQueries

S = "graphile_worker"


async def test_claim_is_not_starved_by_a_row_locked_queue(db: Database) -> None:
    """A job whose queue row cannot be row-locked without waiting is not a candidate
    (docs/design/database.md#claiming). So while another claimer holds queue q1's row, a claim with
    limit 1 must still take the free queue-less job, not come back empty.
    """
    q = WorkerQueries(S)
    task_id = (await db.fetch(q.register_tasks, ["t"]))[0]["id"]
    await db.execute(f"select {S}.add_job('t', queue_name => 'q1', priority => -1)")
    free = await db.fetchval(f"select id from {S}.add_job('t')")
    blocker = await db.connect()
    try:
        await db.run(blocker.execute, "begin")
        await db.run(
            blocker.execute,
            f"select 1 from {S}._private_job_queues where queue_name = 'q1' for update",
        )
        rows = await db.fetch(q.claim, "pool-000000000000000000", [task_id], 1, None, None)
    finally:
        await db.run(blocker.execute, "rollback")
        await db.close_connection(blocker)
    assert [r["id"] for r in rows] == [free]
