"""Run the machine against a database, scratch or existing schema, and report."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..._migrate import MigrationQueries, migrate_sync
from .._postgres import run_sync_sql
from ._harness import open_lifecycle_harness
from ._invariants import SchemaFlavour
from ._machine import run_lifecycle_machine
from ._statements import MachineStatements, ProtocolStatements


@dataclass
class LifecycleReport:
    """The outcome of :func:`run_lifecycle`.

    Attributes:
      examples: machines (examples) run, shrinking included.
      seconds: wall time of the hypothesis run.
      seed: the seed used.
      failure: the violation found, or ``None``.
      flavour: the schema flavour the rules were chosen for.
    """

    examples: int
    seconds: float
    seed: int
    flavour: SchemaFlavour
    failure: BaseException | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        """Examples per second of wall time."""
        return self.examples / self.seconds if self.seconds else 0.0


def refuse_if_workers_listen(dsn: str) -> None:
    """Migrating a scratch schema sends ``worker:migrate`` notifications with
    ``"breaking": true`` to the whole database; graphile-worker and kongtask workers on it
    would take them for their own schema and shut down (exit 57). Refuse when another
    session looks like a worker (its last statement LISTENed, or it is a kongtask pool)."""
    rows = run_sync_sql(
        dsn,
        "select count(*) as n from pg_stat_activity where datname = current_database() "
        "and pid <> pg_backend_pid() and (query ilike 'listen%' "
        "or application_name like 'kongtask%')",
    )
    if rows[0][0]["n"]:  # type: ignore[index]
        raise RuntimeError(
            "other sessions on this database look like workers (LISTEN or kongtask); "
            "migrating a scratch schema would send them worker:migrate notifications and "
            "make them shut down. Use a separate database, or --existing on a schema "
            "migrated beforehand."
        )


def describe_failure(exc: BaseException) -> list[str]:
    """Lines that explain a failed run: the violations and the steps hypothesis printed.

    Hypothesis attaches the (shrunk) steps to the exception as notes; a flaky replay comes
    as an exception group whose members are the original violations.
    """
    lines = [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())]
    for sub in getattr(exc, "exceptions", ()):
        lines += ["  " + line for line in describe_failure(sub)]
    return lines


def detect_flavour(dsn: str, schema: str) -> SchemaFlavour:
    """Guess the flavour of an existing schema: 19 migrations means graphile-worker 0.17."""
    rows = run_sync_sql(dsn, MigrationQueries(schema).latest)
    top = rows[0][0]["max"]  # type: ignore[index]
    return (
        SchemaFlavour.GRAPHILE_WORKER_0_17
        if top is not None and top < 20
        else SchemaFlavour.GRAPHILE_WORKER
    )


def run_lifecycle(
    dsn: str,
    *,
    examples: int = 100,
    steps: int = 30,
    seed: int | None = None,
    schema: str | None = None,
    existing: bool = False,
    flavour: SchemaFlavour | None = None,
    statements: ProtocolStatements | None = None,
    skip: frozenset[str] | set[str] = frozenset(),
    out: Callable[[str], None] = print,
) -> LifecycleReport:
    """Run the machine against ``dsn``; the engine behind ``python -m kongtask.testing.lifecycle``.

    Without ``existing``, creates a scratch schema, migrates it with kongtask, and drops it
    afterwards. With ``existing``, tests the already-migrated ``schema`` and deletes only
    its job, queue and task rows between examples; it refuses a schema that holds jobs.

    Args:
      dsn: the database.
      examples, steps, seed: as for :func:`run_lifecycle_machine` (a seed is drawn and
        printed when ``None``).
      schema: the schema (scratch mode: its name; default a random one).
      existing: test an existing schema instead of a scratch one.
      flavour: default: kongtask for a scratch schema, detected for an existing one.
      statements: worker statements (default kongtask's).
      skip: invariants not to enforce (see :data:`INVARIANTS`).
      out: where progress lines go.
    """
    if seed is None:
        seed = secrets.randbelow(2**32)
    scratch = not existing
    if schema is None:
        schema = "graphile_worker" if existing else f"kongtask_lifecycle_{secrets.token_hex(4)}"
    if scratch:
        refuse_if_workers_listen(dsn)
        migrate_sync(dsn, schema)
        flavour = flavour or SchemaFlavour.KONGTASK
    else:
        flavour = flavour or detect_flavour(dsn, schema)
    report = LifecycleReport(0, 0.0, seed, flavour)
    try:
        with open_lifecycle_harness(
            dsn, schema, flavour=flavour, statements=statements, skip=skip
        ) as harness:
            if existing and harness.job_count():
                raise RuntimeError(
                    f"schema {schema!r} holds jobs; the machine deletes every row of its jobs, "
                    "queues and tasks tables, so point it at a schema made for testing"
                )
            out(
                f"lifecycle: schema {schema!r} ({'scratch' if scratch else 'existing'}), "
                f"flavour {flavour.value}, seed {seed}, {examples} examples of up to {steps} steps"
            )
            for line in flavour.rules():
                out(f"  rule: {line}")
            for name in sorted(skip):
                out(f"  skipped invariant: {name}")
            start = time.perf_counter()
            try:
                run_lifecycle_machine(harness, examples=examples, steps=steps, seed=seed)
            except Exception as exc:
                report.failure = exc
            finally:
                report.seconds = time.perf_counter() - start
                report.examples = harness.examples
                if existing:
                    harness.reset()  # leave the rows empty, as found
    finally:
        if scratch:
            run_sync_sql(dsn, MachineStatements(schema).drop_schema)
    out(
        f"lifecycle: {report.examples} examples in {report.seconds:.1f} s "
        f"= {report.per_second:.1f} examples/s (seed {seed})"
    )
    if report.failure is not None:
        out("lifecycle: FAILED")
        for line in describe_failure(report.failure):
            out(line)
    return report
