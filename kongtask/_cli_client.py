"""The client's CLI verbs: ``add``, ``cleanup`` and ``unlock``.

They live apart from ``_cli.py`` (which only registers them) so the argument handling of
the client stays next to nothing else; every failure a user can cause becomes a
:class:`ConfigError` and so one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any, cast

from ._client import CLEANUP_TASKS, CleanupTask, add_job, open_client
from ._config import resolve_dsn
from ._errors import ConfigError
from ._job import Job
from ._settings import AddConnectionOptions
from ._validate import JobKeyMode


def add_client_verbs(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser],
    add_connection_options: AddConnectionOptions,
) -> None:
    """Register ``add``, ``cleanup`` and ``unlock`` on the CLI's subparsers."""
    add = verbs.add_parser("add", help="add a job, print it as JSON")
    add_connection_options(add)
    add.add_argument("identifier", metavar="IDENTIFIER", help="the task name")
    add.add_argument(
        "payload", metavar="PAYLOAD_JSON", nargs="?", help="the payload as JSON (default: {})"
    )
    add.add_argument("--queue", dest="queue_name", help="named queue (jobs in it run one by one)")
    add.add_argument("--run-at", help="ISO 8601 time with an offset, e.g. 2030-01-01T09:00:00Z")
    add.add_argument("--max-attempts", type=int, help="attempt limit (default 25)")
    add.add_argument("--job-key", help="unique key for replacing or de-duplicating the job")
    add.add_argument(
        "--job-key-mode",
        help="replace (default), preserve_run_at or unsafe_dedupe",
    )
    add.add_argument("--priority", type=int, help="lower runs first (default 0)")
    add.add_argument(
        "--flag", dest="flags", action="append", help="a flag name (repeat for several)"
    )
    add.set_defaults(func=_add_verb)

    cleanup = verbs.add_parser("cleanup", help="delete rows no job needs any more")
    add_connection_options(cleanup)
    cleanup.add_argument(
        "--task",
        dest="tasks",
        action="append",
        metavar="TASK",
        help=f"{', '.join(CLEANUP_TASKS)} (repeat for several; default GC_JOB_QUEUES)",
    )
    cleanup.add_argument(
        "--keep-task-identifier",
        dest="keep",
        action="append",
        default=[],
        metavar="IDENTIFIER",
        help="a task name GC_TASK_IDENTIFIERS must keep (repeat for several)",
    )
    cleanup.set_defaults(func=_cleanup_verb)

    unlock = verbs.add_parser(
        "unlock", help="release the jobs and queues locked by dead worker pools"
    )
    add_connection_options(unlock)
    unlock.add_argument(
        "pool_ids", metavar="POOL_ID", nargs="+", help="e.g. pool-16bf8f36ad00b4482e"
    )
    unlock.set_defaults(func=_unlock_verb)


def _parse_payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"PAYLOAD_JSON is not valid JSON: {exc}") from None


def _parse_run_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--run-at {text!r} is not an ISO 8601 date and time") from None
    if value.tzinfo is None:
        raise ConfigError(f"--run-at {text!r} needs a UTC offset such as Z or +02:00")
    return value


def job_as_json(job: Job) -> str:
    """One line of JSON describing ``job`` (datetimes in ISO 8601, flags sorted)."""
    fields: dict[str, Any] = {}
    for name in Job.__match_args__:
        value = getattr(job, name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, frozenset):
            value = sorted(value)
        fields[name] = value
    return json.dumps(fields, ensure_ascii=False)


async def _add_verb(args: argparse.Namespace) -> int:
    # The one-shot add_job checks every option before it connects.
    job = await add_job(
        args.identifier,
        _parse_payload(args.payload),
        dsn=resolve_dsn(args.connection),
        schema=args.schema,
        queue_name=args.queue_name,
        run_at=_parse_run_at(args.run_at),
        max_attempts=args.max_attempts,
        job_key=args.job_key,
        # add_job rejects a typo with the list of valid modes.
        job_key_mode=cast(JobKeyMode | None, args.job_key_mode),
        priority=args.priority,
        flags=args.flags,
    )
    print(job_as_json(job))
    return 0


async def _cleanup_verb(args: argparse.Namespace) -> int:
    tasks = cast(list[CleanupTask], args.tasks or ["GC_JOB_QUEUES"])
    async with open_client(
        resolve_dsn(args.connection), schema=args.schema, max_connections=1
    ) as c:
        deleted = await c.cleanup(tasks, keep_task_identifiers=args.keep)
    for task, count in deleted.items():
        print(f"{task}: deleted {count}")
    return 0


async def _unlock_verb(args: argparse.Namespace) -> int:
    async with open_client(
        resolve_dsn(args.connection), schema=args.schema, max_connections=1
    ) as c:
        released = await c.force_unlock_workers(args.pool_ids)
    jobs = sum(j for j, _ in released.values())
    queues = sum(q for _, q in released.values())
    for pool_id, (pool_jobs, pool_queues) in released.items():
        if pool_jobs or pool_queues:
            print(f"{pool_id}: released {pool_jobs} job(s) and {pool_queues} queue(s)")
        else:
            print(
                f"kongtask: warning: {pool_id} holds no job and no queue "
                "(a mistyped id, or released already)",
                file=sys.stderr,
            )
    print(f"Released {jobs} job(s) and {queues} queue(s) of {len(released)} pool id(s)")
    return 0
