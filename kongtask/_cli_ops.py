"""The operator's CLI verbs: ``status`` and ``jobs list|retry|reschedule|fail|complete|remove``.

Tables are drawn by rich; every verb has ``--json`` with the shape documented in
docs/operations.md (tests check it). Actions that change jobs select them by id or by the
listing's filters and ask for confirmation when they would touch more than
``--confirm-above`` jobs, unless ``--yes`` is given; without a terminal to ask on they
refuse instead of guessing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import trio

from ._cli_client import _parse_run_at
from ._client import Client, open_client
from ._config import resolve_dsn
from ._errors import ConfigError
from ._inspect import JobInfo, PoolInfo, QueueCounts
from ._inspect_sql import JOB_STATES
from ._job import Job
from ._job_actions import JOB_ACTIONS, JobFilter, apply_job_action, select_jobs
from ._migrate import check_schema
from ._pg import open_database
from ._settings import AddConnectionOptions

#: Actions touching more jobs than this ask first (``--confirm-above`` changes it).
DEFAULT_CONFIRM_ABOVE: Final = 10
ACTIONS: Final = JOB_ACTIONS


def add_ops_verbs(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser],
    add_connection_options: AddConnectionOptions,
) -> None:
    """Register ``status`` and ``jobs`` on the CLI's subparsers."""
    status = verbs.add_parser("status", help="jobs per task and queue by state, and the pools")
    add_connection_options(status)
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="redraw every SECONDS until interrupted (with --json: one document per line)",
    )
    status.add_argument(
        "--count", type=int, metavar="N", help="with --watch: stop after N refreshes"
    )
    status.set_defaults(func=_status_verb)

    health = verbs.add_parser(
        "healthcheck",
        help="exit 0 when healthy, 1 otherwise (for a Docker HEALTHCHECK)",
        description=(
            "With --port: ask the pool's /readyz on that port (kongtask run --metrics-port). "
            "Without: check that the database answers and the schema is installed."
        ),
    )
    add_connection_options(health)
    health.add_argument("--port", type=int, help="the pool's --metrics-port")
    health.add_argument("--host", default="127.0.0.1", help="the pool's address (127.0.0.1)")
    health.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for an answer (5)"
    )
    health.set_defaults(func=_healthcheck_verb)

    jobs = verbs.add_parser("jobs", help="list jobs, or retry, reschedule, fail, complete them")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list jobs with their derived state")
    add_connection_options(listing)
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=50, help="page size (default 50)")
    listing.add_argument("--after-id", type=int, help="continue after this id (the last shown)")
    listing.add_argument("--desc", action="store_true", help="newest first")
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    listing.set_defaults(func=_list_verb)

    helps = {
        "retry": "run now, with the attempt count reset (revives permanently failed jobs)",
        "reschedule": "change run_at, priority, attempts or max_attempts",
        "fail": "mark as permanently failed",
        "complete": "delete as if they had succeeded",
        "remove": "remove keyed jobs by key (remove_job); a running one is retired",
    }
    for name in ACTIONS:
        action = actions.add_parser(name, help=helps[name])
        add_connection_options(action)
        action.add_argument("ids", metavar="JOB_ID", type=int, nargs="*", help="job ids")
        _add_filters(action)
        action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        action.add_argument(
            "--confirm-above",
            type=int,
            default=DEFAULT_CONFIRM_ABOVE,
            metavar="N",
            help=f"ask before touching more than N jobs (default {DEFAULT_CONFIRM_ABOVE})",
        )
        action.add_argument("--json", action="store_true", help="print one JSON document")
        if name == "reschedule":
            action.add_argument("--run-at", help="ISO 8601 time with an offset")
            action.add_argument("--priority", type=int)
            action.add_argument("--attempts", type=int)
            action.add_argument("--max-attempts", type=int)
        if name == "fail":
            action.add_argument("--message", help="stored as last_error")
        action.set_defaults(func=_action_verb)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", dest="tasks", action="append", help="task (repeatable)")
    parser.add_argument("--queue", dest="queues", action="append", help="queue (repeatable)")
    parser.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=JOB_STATES,
        help="derived state (repeatable)",
    )
    parser.add_argument("--key", help="job key")
    parser.add_argument("--min-id", type=int, help="smallest id")
    parser.add_argument("--max-id", type=int, help="largest id")


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tasks": args.tasks,
        "queues": args.queues,
        "states": args.states,
        "key": args.key,
        "min_id": args.min_id,
        "max_id": args.max_id,
    }


def _client(args: argparse.Namespace) -> Any:
    return open_client(resolve_dsn(args.connection), schema=args.schema, max_connections=2)


# --- JSON shapes ------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def job_dict(job: Job) -> dict[str, Any]:
    """A job as JSON-ready values (datetimes in ISO 8601, flags sorted)."""
    fields: dict[str, Any] = {}
    for name in Job.__match_args__:
        value = getattr(job, name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, frozenset):
            value = sorted(value)
        fields[name] = value
    return fields


def job_info_dict(info: JobInfo) -> dict[str, Any]:
    return {**job_dict(info.job), "state": info.state, "lock_age": info.lock_age}


def counts_dict(counts: QueueCounts) -> dict[str, Any]:
    return {
        "task": counts.task,
        "queue": counts.queue,
        **{state: counts.count(state) for state in JOB_STATES},
        "oldest_ready_age": counts.oldest_ready_age,
        "oldest_lock_age": counts.oldest_lock_age,
    }


def pool_dict(pool: PoolInfo) -> dict[str, Any]:
    return {
        "kind": pool.kind,
        "pool_id": pool.pool_id,
        "id_suffix": pool.id_suffix,
        "alive": pool.alive,
        "jobs": pool.jobs,
        "queues": pool.queues,
        "oldest_lock_age": pool.oldest_lock_age,
        "connected_at": _iso(pool.connected_at),
        "client_addr": pool.client_addr,
    }


async def status_document(client: Client) -> dict[str, Any]:
    """What ``kongtask status --json`` prints (three statements, read at one moment each)."""
    counts = await client.queue_counts()
    oldest = await client.oldest_ready_age()
    pools = await client.list_pools()
    return {
        "schema": client.schema,
        "at": datetime.now(UTC).isoformat(),
        "totals": {state: sum(c.count(state) for c in counts) for state in JOB_STATES},
        "oldest_ready_age": oldest,
        "queues": [counts_dict(c) for c in counts],
        "pools": [pool_dict(p) for p in pools],
    }


# --- rendering ----------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


# Column titles of the states (the JSON keys are the full names).
_SHORT: Final = {
    "ready": "ready",
    "waiting_on_queue": "waiting",
    "scheduled": "scheduled",
    "retrying": "retrying",
    "running": "running",
    "permanently_failed": "failed",
}


def _status_renderable(doc: dict[str, Any]) -> Any:
    # rich and urllib.request load only in the verbs that print tables or probe a port:
    # together they cost more start-up than the rest of the command line.
    from rich.console import Group
    from rich.table import Table

    queues = Table(title=f"Jobs in schema {doc['schema']}", title_justify="left")
    queues.add_column("task")
    queues.add_column("queue")
    for state in JOB_STATES:
        queues.add_column(_SHORT[state], justify="right")
    queues.add_column("oldest ready", justify="right")
    queues.add_column("oldest lock", justify="right")
    for row in doc["queues"]:
        queues.add_row(
            row["task"],
            row["queue"] or "",
            *(str(row[state]) for state in JOB_STATES),
            _age(row["oldest_ready_age"]),
            _age(row["oldest_lock_age"]),
        )
    queues.add_row(
        "total",
        "",
        *(str(doc["totals"][state]) for state in JOB_STATES),
        _age(doc["oldest_ready_age"]),
        "",
        style="bold",
    )
    pools = Table(title="Pools", title_justify="left")
    for name in ("kind", "pool", "alive", "jobs", "queues", "oldest lock", "connected at"):
        pools.add_column(name)
    for pool in doc["pools"]:
        alive = {True: "yes", False: "DEAD", None: "unknown"}[pool["alive"]]
        pools.add_row(
            pool["kind"],
            pool["pool_id"] or f"…{pool['id_suffix']} (idle)",
            alive,
            str(pool["jobs"]),
            str(pool["queues"]),
            _age(pool["oldest_lock_age"]),
            pool["connected_at"] or "",
        )
    return Group(queues, pools)


def _console() -> Any:
    from rich.console import Console

    # Piped output has no terminal width; rich would fold the tables to 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(file=sys.stdout, width=160 if wide else None)


async def _status_verb(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        raise ConfigError("--watch needs a positive number of seconds")
    if args.count is not None and (args.watch is None or args.count < 1):
        raise ConfigError("--count needs --watch and a positive number")
    async with _client(args) as client:
        if args.watch is None:
            doc = await status_document(client)
            if args.json:
                print(json.dumps(doc, ensure_ascii=False))
            else:
                _console().print(_status_renderable(doc))
            return 0
        if args.json:
            shown = 0
            while args.count is None or shown < args.count:
                print(json.dumps(await status_document(client), ensure_ascii=False), flush=True)
                shown += 1
                if args.count is None or shown < args.count:
                    await trio.sleep(args.watch)
            return 0
        from rich.live import Live

        console = _console()
        with Live(console=console, auto_refresh=False, transient=False) as live:
            shown = 0
            while args.count is None or shown < args.count:
                live.update(_status_renderable(await status_document(client)), refresh=True)
                shown += 1
                if args.count is None or shown < args.count:
                    await trio.sleep(args.watch)
    return 0


async def _list_verb(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        infos = await client.list_jobs(
            **_filters(args), after_id=args.after_id, limit=args.limit, descending=args.desc
        )
    next_after = infos[-1].job.id if len(infos) == args.limit else None
    if args.json:
        doc = {"jobs": [job_info_dict(i) for i in infos], "next_after_id": next_after}
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    from rich.table import Table

    table = Table()
    for name in ("id", "task", "queue", "state", "prio", "run_at", "attempts", "key", "locked"):
        table.add_column(name)
    table.add_column("last error", overflow="ellipsis", max_width=40)
    for info in infos:
        job = info.job
        locked = f"{job.locked_by} {_age(info.lock_age)}" if job.locked_by else ""
        table.add_row(
            str(job.id),
            job.task_identifier,
            job.queue_name or "",
            info.state,
            str(job.priority),
            job.run_at.isoformat(timespec="seconds"),
            f"{job.attempts}/{job.max_attempts}",
            job.key or "",
            locked,
            (job.last_error or "").splitlines()[0] if job.last_error else "",
        )
    console = _console()
    console.print(table)
    if next_after is not None:
        console.print(f"More: --after-id {next_after}")
    return 0


# --- actions ------------------------------------------------------------------------------


async def _select(client: Client, args: argparse.Namespace) -> list[JobInfo]:
    """The jobs an action applies to: the ids given (that exist), or every job the filters
    match."""
    where = JobFilter(**_filters(args))
    if args.ids and not where.is_empty():
        raise ConfigError("give job ids or filters, not both")
    if not args.ids and where.is_empty():
        raise ConfigError("give job ids or at least one filter (--task, --state, …)")
    return await select_jobs(client, ids=args.ids or (), where=where)


def _confirm(action: str, count: int, args: argparse.Namespace) -> bool:
    if args.yes or count <= args.confirm_above:
        return True
    if not sys.stdin.isatty():
        raise ConfigError(
            f"{action} would touch {count} jobs (more than --confirm-above "
            f"{args.confirm_above}); pass --yes to go ahead without a terminal"
        )
    answer = input(f"{action} {count} jobs? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


async def _apply(client: Client, args: argparse.Namespace, infos: Sequence[JobInfo]) -> list[Job]:
    action = args.action
    if action == "reschedule":
        return await apply_job_action(
            client,
            action,
            infos,
            run_at=_parse_run_at(args.run_at),
            priority=args.priority,
            attempts=args.attempts,
            max_attempts=args.max_attempts,
        )
    if action == "fail":
        return await apply_job_action(client, action, infos, message=args.message)
    return await apply_job_action(client, action, infos)


async def _action_verb(args: argparse.Namespace) -> int:
    action: str = args.action
    if action == "reschedule" and all(
        v is None for v in (args.run_at, args.priority, args.attempts, args.max_attempts)
    ):
        raise ConfigError("reschedule needs --run-at, --priority, --attempts or --max-attempts")
    if action == "reschedule":
        _parse_run_at(args.run_at)  # fail before connecting
    async with _client(args) as client:
        infos = await _select(client, args)
        if action == "remove":
            unkeyed = [i.job.id for i in infos if i.job.key is None]
            infos = [i for i in infos if i.job.key is not None]
        else:
            unkeyed = []
        if not _confirm(action, len(infos), args):
            print("Nothing done.", file=sys.stderr)
            return 1
        changed = await _apply(client, args, infos) if infos else []
    changed_ids = {job.id for job in changed}
    skipped = [i.job.id for i in infos if i.job.id not in changed_ids]
    if args.ids:
        found = {i.job.id for i in infos} | set(unkeyed)
        missing = sorted(set(args.ids) - found)
    else:
        missing = []
    if args.json:
        doc = {
            "action": action,
            "selected": len(infos),
            "changed": [job_dict(job) for job in changed],
            "skipped_locked": skipped,
            "skipped_without_key": unkeyed,
            "not_found": missing,
        }
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    print(f"{action}: {len(changed)} of {len(infos)} selected job(s) changed")
    if skipped:
        print(f"  left alone (locked by a pool): {' '.join(map(str, skipped))}")
    if unkeyed:
        print(f"  no job key, so not removable by key: {' '.join(map(str, unkeyed))}")
    if missing:
        print(f"  no such job: {' '.join(map(str, missing))}")
    return 0


# --- healthcheck -------------------------------------------------------------------------


def _probe(host: str, port: int, timeout: float) -> tuple[int, str]:
    # loaded here, not at the top: see _status_renderable
    import urllib.error
    import urllib.request

    url = f"http://{host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


async def _healthcheck_verb(args: argparse.Namespace) -> int:
    if args.port is not None:
        try:
            code, body = await trio.to_thread.run_sync(_probe, args.host, args.port, args.timeout)
        except OSError as exc:
            print(f"kongtask: unhealthy: no answer on port {args.port}: {exc}", file=sys.stderr)
            return 1
        if code == 200:
            return 0
        try:
            reasons = "; ".join(json.loads(body).get("reasons", [])) or body.strip()
        except ValueError:
            reasons = body.strip()
        print(f"kongtask: unready (HTTP {code}): {reasons}", file=sys.stderr)
        return 1
    with trio.fail_after(args.timeout):
        async with open_database(resolve_dsn(args.connection), max_size=1) as db:
            await check_schema(db, args.schema)
    return 0
