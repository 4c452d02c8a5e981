"""The ``kongtask run`` and ``kongtask demo`` verbs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from ._client import open_client
from ._config import quote_ident, resolve_dsn, resolve_schema
from ._connect_wait import wait_for_database
from ._cron import load_crontab_file
from ._errors import ConfigError
from ._fleet import run_fleet_from_cli
from ._job import JobSpec
from ._migrate import migrate
from ._pg import open_database
from ._settings import (
    LOG_KEYS,
    RUN_OPTIONS,
    AddConnectionOptions,
    SettingsError,
    add_config_options,
    add_log_options,
    add_option,
)

log = logging.getLogger("kongtask")


def add_run_verbs(
    verbs: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_connection_options: AddConnectionOptions,
) -> None:
    run = verbs.add_parser(
        "run",
        help="import the tasks, migrate, then run a worker until SIGINT/SIGTERM",
        description=(
            "Import the tasks, wait for the database (--connect-timeout), migrate the "
            "schema, then run jobs. Options also come from $KONGTASK_* variables and TOML "
            "(--print-config shows where each came from). SIGINT/SIGTERM stop gracefully (running "
            "jobs get --grace seconds); a second signal stops at once. Exits 57 when a "
            "breaking migration of the schema is detected."
        ),
    )
    for option in RUN_OPTIONS:
        add_option(run, option)
    add_config_options(run)
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print each option's value and where it came from (flag, environment, "
        "config file or default), then exit 0 without connecting",
    )
    run.set_defaults(settings_keys=tuple(option.key for option in RUN_OPTIONS))
    run.set_defaults(func=_run_verb)

    demo = verbs.add_parser(
        "demo",
        help="run a worker on a throwaway PostgreSQL and show what it does",
        description=(
            "Starts a throwaway PostgreSQL (as the tests do), migrates it, adds a few "
            "hundred sample jobs (one that fails once and retries, one that always fails, "
            "one delayed), runs a worker with progress, prints a summary and cleans up."
        ),
    )
    demo.add_argument("--jobs-count", type=int, default=300, help="sample jobs (default 300)")
    demo.add_argument("-j", "--jobs", type=int, default=8, help="concurrency (default 8)")
    add_log_options(demo)
    add_config_options(demo)
    demo.set_defaults(func=_demo_verb, settings_keys=LOG_KEYS)


# ---------------------------------------------------------------------------
# loading tasks


def load_tasks_module(spec: str) -> dict[str, Any]:
    """``pkg.module[:attr]`` -> the mapping it names (attr default ``tasks``, then ``TASKS``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigError(f"--tasks {spec!r}: expected MODULE[:ATTR]")
    # as `python -m` does: tasks next to where the command runs are importable
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--tasks {spec!r}: cannot import {module_name!r}: {exc}") from exc
    names = [attr] if attr else ["tasks", "TASKS"]
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"--tasks {spec!r}: {name} is not a mapping")
            return dict(value)
    raise ConfigError(f"--tasks {spec!r}: module {module_name!r} has no {' or '.join(names)}")


def load_task_directory(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """One task per ``*.py`` file under ``directory``; ``a/b/c.py`` is task ``a/b/c``.

    Files and folders whose name starts with ``_`` or ``.`` are skipped (helpers).
    """
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--task-directory {str(directory)!r} is not a directory")
    tasks: dict[str, Any] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        if any(part.startswith(("_", ".")) for part in rel.parts):
            continue
        identifier = "/".join(rel.parts)
        module_name = "kongtask_tasks." + ".".join(rel.parts)
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{path}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"{path}: importing it failed: {exc!r}") from exc
        handler = getattr(module, "task", None) or getattr(module, "handler", None)
        if handler is None:
            raise ConfigError(f"{path}: defines neither `task` nor `handler`")
        tasks[identifier] = handler
    return tasks


# ---------------------------------------------------------------------------
# run


def _load_run_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Import the tasks and read the crontab (errors name the option, nothing is touched)."""
    tasks: dict[str, Any] = {}
    for spec in args.tasks:
        tasks.update(load_tasks_module(spec))
    if args.task_directory:
        tasks.update(load_task_directory(args.task_directory))
    if not tasks:
        raise ConfigError("no tasks: give --tasks MODULE[:ATTR] and/or --task-directory DIR")
    # The worker loads only for the verbs that run one: every other command (add-job,
    # status, --help) starts without it.
    from ._worker import runners_of

    runners_of(tasks)  # the checks open_worker makes: identifiers, callables, signatures
    crontab_path = args.crontab or _default_crontab()
    crontab = None
    if crontab_path:
        crontab = load_crontab_file(crontab_path)
    return tasks, crontab


def _default_crontab() -> str | None:
    # graphile-worker reads ./crontab when present
    return "crontab" if Path("crontab").is_file() else None


async def _wait_for_database_or_signal(args: argparse.Namespace, dsn: str | None) -> bool:
    """Wait for the database (``--connect-timeout``); ``False`` if SIGINT/SIGTERM came first."""
    stopped_by: list[str] = []
    failure: Exception | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    stopped_by.append(signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            try:
                await wait_for_database(
                    dsn, args.connect_timeout, prepared_statements=args.prepared_statements
                )
            except Exception as exc:  # raised below as it is, not in a nursery's group
                failure = exc
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if stopped_by:
        log.info("%s: stopping before the database was reached (nothing was done)", stopped_by[0])
        return False
    return True


async def _run_verb(args: argparse.Namespace) -> int:
    from ._worker import open_worker  # see _load_run_inputs

    if args.print_config:
        print(args.resolved_settings.render(), end="")
        return 0
    if args.processes > 1 and args.metrics_port:
        # every child would bind the same port: all but one would fail to start
        raise SettingsError(
            f"metrics_port {args.metrics_port} with processes {args.processes}: one port "
            "serves one process; run one process per container (or host) instead"
        )
    schema = resolve_schema(args.schema)
    dsn = resolve_dsn(args.connection)
    tasks: dict[str, Any] = {}
    crontab = None
    if not args.schema_only:
        # everything the worker will need is checked before the database is touched
        tasks, crontab = _load_run_inputs(args)
    if not await _wait_for_database_or_signal(args, dsn):
        return 0
    async with open_database(dsn, max_size=1, prepared_statements=args.prepared_statements) as db:
        await migrate(db, schema)
    if args.schema_only:
        print(f"Schema {schema!r} is up to date")
        return 0
    flags = args.forbidden_flags
    if args.processes > 1:
        return await run_fleet_from_cli(args)
    log.info(
        "kongtask worker: %d task(s), concurrency %d, schema %r",
        len(tasks),
        args.concurrency,
        schema,
    )
    # open_worker stops gracefully on SIGINT/SIGTERM (a second one stops at once)
    async with open_worker(
        dsn,
        tasks,
        schema=schema,
        concurrency=args.concurrency,
        poll_interval=args.poll_interval / 1000,  # the CLI's milliseconds
        batch_size=args.batch_size,
        forbidden_flags=flags or None,
        crontab=crontab,
        max_pool_size=args.max_pool_size,
        prepared_statements=args.prepared_statements,
        grace=args.grace,
        once=args.once,
        migrate=False,  # done above
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        tracing=args.tracing,
        propagate_trace_context=args.propagate_trace_context,
    ) as worker:
        log.info("pool %s ready", worker.pool_id)
        await worker.wait_stopped()
    stats = worker.statistics()
    log.info(
        "pool %s stopped: %d completed, %d failed",
        worker.pool_id,
        stats.completed,
        stats.failed,
    )
    return worker.exit_code or 0


# ---------------------------------------------------------------------------
# demo


async def _demo_greet(job: Any, ctx: Any) -> None:
    await trio.sleep(0.005)


async def _demo_fragile(job: Any, ctx: Any) -> None:
    await trio.sleep(0.005)
    if job.attempts < 2:
        raise RuntimeError("flaky network (this attempt fails on purpose; the retry succeeds)")


async def _demo_broken(job: Any, ctx: Any) -> None:
    raise ValueError("this job always fails (max_attempts=1, so it fails permanently)")


async def _demo_verb(args: argparse.Namespace) -> int:
    # The test server loads only for the demo: every other command starts without it.
    from .testing import provide_postgres

    print("Starting a throwaway PostgreSQL ...", flush=True)
    # A blocking start: nothing else runs yet, so the trio loop may wait for it.
    with provide_postgres() as server:
        return await _demo(server.dsn, args.jobs_count, args.jobs)


async def _demo(maintenance_dsn: str, count: int, concurrency: int) -> int:
    from ._worker import open_worker  # see _load_run_inputs
    from .testing._postgres import dsn_with_database  # see _demo_verb

    name = f"kongtask_demo_{os.getpid()}"
    async with open_database(maintenance_dsn, max_size=1) as admin:
        await admin.execute(f"create database {quote_ident(name)}")
    dsn = dsn_with_database(maintenance_dsn, name)
    try:
        async with open_database(dsn, max_size=1) as db:
            await migrate(db)
        print(f"Migrated {dsn}")
        async with open_client(dsn) as client:
            specs = [JobSpec("greet", {"n": i}) for i in range(max(0, count - 3))]
            await client.add_jobs(specs)
            await client.add_job("fragile", {"what": "fails once, then succeeds"})
            await client.add_job("broken", {"what": "always fails"}, max_attempts=1)
            await client.add_job(
                "greet",
                {"what": "delayed by 2 s"},
                run_at=datetime.now(UTC) + timedelta(seconds=2),
            )
        print(f"Added {count} jobs: greetings, one fragile, one broken, one delayed by 2 s")
        tasks = {"greet": _demo_greet, "fragile": _demo_fragile, "broken": _demo_broken}
        # one line per job would bury the progress lines; failures still show
        logging.getLogger("kongtask.worker").setLevel(logging.WARNING)
        started = time.monotonic()
        async with open_worker(dsn, tasks, concurrency=concurrency, poll_interval=0.5) as worker:
            with trio.move_on_after(60):
                while True:
                    stats = worker.statistics()
                    print(
                        f"  {time.monotonic() - started:5.1f} s  completed {stats.completed:4d}"
                        f"  failed attempts {stats.failed}  running {stats.running}"
                        f"  queued locally {stats.queued_locally}",
                        flush=True,
                    )
                    if stats.completed >= count - 1:
                        break
                    await trio.sleep(0.5)
            stats = worker.statistics()
        elapsed = time.monotonic() - started
        async with open_database(dsn, max_size=1) as db:
            left = await db.fetch(
                "select task_identifier, attempts, max_attempts, last_error "
                "from graphile_worker.jobs order by id"
            )
        print()
        print(f"Summary after {elapsed:.1f} s (concurrency {concurrency}):")
        print(f"  completed:          {stats.completed} of {count}")
        print(f"  failed attempts:    {stats.failed} (the fragile job retried after ~2.7 s)")
        for row in left:
            first_line = (row["last_error"] or "").split("\n", 1)[0]
            print(
                f"  left in the table:  {row['task_identifier']} "
                f"(attempts {row['attempts']}/{row['max_attempts']}): {first_line}"
            )
        print("Cleaning up.")
        return 0 if stats.completed == count - 1 else 1
    finally:
        with trio.CancelScope(shield=True):
            async with open_database(maintenance_dsn, max_size=1) as admin:
                await admin.execute(f"drop database if exists {quote_ident(name)} with (force)")
