"""One step on the database: one crossing into the harness's loop."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .._portal import Connections
from ._statements import MachineStatements


@dataclass
class StepResult:
    """What one step brought back: its result or error, its notifications, the snapshot."""

    now: datetime | None  # the step's now(), when it returns it
    value: Any  # "fused"/"fn": the JSON text; "stmt": a list of row dicts
    error: tuple[str, str] | None  # (sqlstate, message)
    notifications: list[str]
    snapshot: str


async def run_step(
    conns: Connections,
    snapshot_sql: str,
    kind: str,
    sql: str,
    args: tuple[Any, ...],
    blocker: tuple[str, str, list[int], list[str]] | None = None,
) -> StepResult:
    actor = conns.actor
    conns.notifications.clear()
    now: datetime | None = None
    value: Any = None
    error: tuple[str, str] | None = None
    try:
        if blocker is not None:
            lock_jobs, lock_queues, job_ids, queue_names_ = blocker
            await conns.blocker.execute("begin")
            try:
                await conns.blocker.fetch(lock_jobs, job_ids)
                await conns.blocker.fetch(lock_queues, queue_names_)
                value = [dict(r) for r in await actor.fetch(sql, *args)]
            finally:
                await conns.blocker.execute("rollback")
        elif kind == "fused":  # the statement brings its own snapshot (one round trip)
            row = await actor.fetchrow(sql, *args)
            if row is None:
                raise RuntimeError(f"no row from {sql}")
            return StepResult(row[0], row[1], None, list(conns.notifications), row[2])
        elif kind == "fn":
            row = await actor.fetchrow(sql, *args)
            if row is None:
                raise RuntimeError(f"no row from {sql}")
            now, value = row[0], row[1]
        else:  # "stmt": a worker statement
            value = [dict(r) for r in await actor.fetch(sql, *args)]
    except asyncpg.PostgresError as exc:
        error = (str(exc.sqlstate), str(exc))
    snapshot = await actor.fetchval(snapshot_sql)
    return StepResult(now, value, error, list(conns.notifications), snapshot)


async def reset_rows(
    conns: Connections, sql: MachineStatements, register: str, identifiers: list[str], first: bool
) -> tuple[list[dict[str, Any]], str]:
    if first:
        await conns.actor.execute(sql.create_snapshot_function)
    await conns.actor.execute(sql.reset)
    rows = [dict(r) for r in await conns.actor.fetch(register, identifiers)]
    conns.notifications.clear()
    snapshot = await conns.actor.fetchval(sql.snapshot)
    return rows, snapshot


async def fetchval(conns: Connections, query: str) -> Any:
    return await conns.actor.fetchval(query)
